"""Local transformers backend: the embedded default on a CPU machine.

Prompts are rendered and tokenized as in `cai.engine.tokens` (shared with the
vLLM backend, so both see the same token ids). Requests are sorted by length
and run in left-padded sub-batches of `max_batch_size`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import torch

from cai.engine.base import TOP_ALTERNATIVES, ChoiceScores, TokenLogprob
from cai.engine.common import (
    context_error,
    derive_seed,
    error_completion,
    tokenizer_controls,
    truncate_at_stop,
)
from cai.engine.models import local_model_ref, resolve_model
from cai.engine.tokens import encode, plan_or_error, render_prompt
from cai.records import Chat, Completion, ErrorCode, ErrorInfo, SamplingParams

__all__ = ["TransformersEngine", "encode", "render_prompt"]


# ---- engine ------------------------------------------------------------------------


class TransformersEngine:
    """Batched generation and exact option scoring with a local transformers model.

    Sampling (temperature > 0) seeds torch's RNG once per sub-batch from the
    seed of the sub-batch's first request, so a run is reproducible for the same
    inputs and `max_batch_size`, but a request's sample depends on its batch
    mates (unlike vLLM, whose seeds are per request).
    """

    backend = "transformers"

    def __init__(
        self,
        model: str | None = None,
        max_batch_size: int = 16,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        max_model_len: int | None = None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model(model)
        if dtype is None:
            dtype = torch.float32 if device == "cpu" else "auto"
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tokenizer.padding_side = "left"
        self.hf_model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=dtype
        ).to(device)
        self.hf_model.eval()
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len or _context_size(self.hf_model.config)
        self.eos_ids = _eos_ids(self.hf_model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        self.model = local_model_ref(model, self.backend, path)

    @cached_property
    def control_tokens(self) -> tuple[str, ...]:
        """The tokenizer's control-token strings (see tokenizer_controls); the judge breaks them up."""
        return tokenizer_controls(self.tokenizer)

    # -- generate --

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Completion]:
        results: list[Completion | None] = [None] * len(chats)
        prompts: dict[int, list[int]] = {}
        for i, chat in enumerate(chats):
            try:
                ids = encode(self.tokenizer, render_prompt(self.tokenizer, chat))
            except Exception as exc:  # a malformed chat fails alone
                results[i] = error_completion(ErrorCode.BAD_REQUEST, f"cannot render chat: {exc}")
                continue
            if len(ids) >= self.max_model_len:
                err = context_error(len(ids), self.max_model_len)
                results[i] = Completion(finish_reason="error", prompt_tokens=len(ids), error=err)
            else:
                prompts[i] = ids
        for batch in self._sub_batches(prompts):
            for i, completion in zip(batch, self._generate_isolated(batch, prompts, params)):
                results[i] = completion
        return results  # type: ignore[return-value]

    def _sub_batches(self, rows: dict[int, list[int]]) -> list[list[int]]:
        order = sorted(rows, key=lambda i: len(rows[i]), reverse=True)
        size = self.max_batch_size
        return [order[k : k + size] for k in range(0, len(order), size)]

    def _generate_isolated(self, batch, prompts, params) -> list[Completion]:
        """Run a sub-batch; if it fails, retry its requests one by one so a bad
        request becomes one error row instead of failing its neighbours."""
        try:
            return self._generate_batch([prompts[i] for i in batch], params, batch[0])
        except Exception as exc:
            if len(batch) == 1:
                n = len(prompts[batch[0]])
                return [error_completion(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}", n)]
        return [c for i in batch for c in self._generate_isolated([i], prompts, params)]

    @torch.inference_mode()
    def _generate_batch(self, rows: list[list[int]], params: SamplingParams, first: int):
        enc = self.tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        room = self.max_model_len - max(len(r) for r in rows)
        kwargs = dict(
            max_new_tokens=min(params.max_tokens, room),
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            repetition_penalty=1.0,
        )
        if params.temperature > 0:
            kwargs.update(
                do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0
            )
            seed = derive_seed(params.seed, first)
            if seed is not None:
                torch.manual_seed(seed)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        out = self.hf_model.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        limit = kwargs["max_new_tokens"]
        return [self._to_completion(r, toks, params, limit) for r, toks in zip(rows, new)]

    def _to_completion(self, prompt, tokens, params, limit) -> Completion:
        ends = {*self.eos_ids, self.pad_id}
        end = next((k for k, t in enumerate(tokens) if t in ends), None)
        hit_eos = end is not None and tokens[end] in self.eos_ids
        kept = tokens if end is None else tokens[:end]
        text, stopped = truncate_at_stop(
            self.tokenizer.decode(kept, skip_special_tokens=True), params.stop
        )
        n_generated = len(kept) + (1 if hit_eos else 0)
        finish = "stop" if hit_eos or stopped or n_generated < limit else "length"
        return Completion(
            text=text,
            finish_reason=finish,
            prompt_tokens=len(prompt),
            completion_tokens=n_generated,
        )

    # -- choice_logprobs --

    def choice_logprobs(
        self, chats: Sequence[Chat], options: Sequence[str], prefix: str = ""
    ) -> list[ChoiceScores]:
        """log P(option | chat, prefix) summed over the option's tokens, exactly:
        every (chat, option) sequence is scored by one left-padded forward pass.
        Token boundaries: see `plan_options`. `top` comes from the full distribution
        at the first option position."""
        results: list[ChoiceScores | None] = [None] * len(chats)
        rows, spans = self._choice_rows(chats, options, prefix, results)
        scores: dict[int, dict[str, float]] = {}
        tops: dict[int, list[TokenLogprob]] = {}
        for batch in self._sub_batches(rows):
            try:
                values = self._score_batch([rows[r] for r in batch], [spans[r][2] for r in batch])
            except Exception as exc:  # e.g. out of memory: fails these chats only
                err = ErrorInfo(code=ErrorCode.INTERNAL, message=f"{type(exc).__name__}: {exc}")
                for r in batch:
                    results[spans[r][0]] = ChoiceScores(error=err)
                continue
            for r, (value, top) in zip(batch, values):
                chat_i, option, _ = spans[r]
                scores.setdefault(chat_i, {})[option] = value
                tops.setdefault(chat_i, self._top_tokens(top))
        for i, logprobs in scores.items():
            if results[i] is None:
                results[i] = ChoiceScores(logprobs={o: logprobs[o] for o in options}, top=tops[i])
        return results  # type: ignore[return-value]

    def _choice_rows(self, chats, options, prefix, results):
        """Token rows to score, and per row (chat index, option, n option tokens);
        chats that cannot be scored get their error in `results`."""
        rows: dict[int, list[int]] = {}
        spans: dict[int, tuple[int, str, int]] = {}
        for i, chat in enumerate(chats):
            plan = plan_or_error(self.tokenizer, chat, options, prefix)
            if isinstance(plan, ErrorInfo):
                results[i] = ChoiceScores(error=plan)
                continue
            longest = max(len(seq) for _, seq, _ in plan.rows())
            if longest > self.max_model_len:
                results[i] = ChoiceScores(error=context_error(longest, self.max_model_len))
                continue
            for option, seq, n_opt in plan.rows():
                rows[len(rows)] = seq
                spans[len(spans)] = (i, option, n_opt)
        return rows, spans

    def _top_tokens(self, top: list[tuple[int, float]]) -> list[TokenLogprob]:
        return [TokenLogprob(token=self.tokenizer.decode([t]), logprob=v) for t, v in top]

    @torch.inference_mode()
    def _score_batch(self, rows: list[list[int]], n_option: list[int]):
        """Per row: (summed log-prob of its last n tokens, top tokens before the first of them)."""
        enc = self.tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
        ids = enc["input_ids"].to(self.device)
        mask = enc["attention_mask"].to(self.device)
        # Explicit positions so left padding does not shift the real tokens.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = max(n_option) + 1  # left padding puts every option at the end
        logits = self.hf_model(
            input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep
        ).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        out = []
        for b, n in enumerate(n_option):
            targets = ids[b, -n:]
            steps = logp[b, keep - n - 1 : keep - 1]
            best = steps[0].topk(min(TOP_ALTERNATIVES, steps.shape[-1]))
            top = list(zip(best.indices.tolist(), best.values.tolist()))
            out.append((float(steps.gather(-1, targets[:, None]).sum()), top))
        return out

    def close(self) -> None:
        self.hf_model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _context_size(config) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        for v in value if isinstance(value, list) else [value]:
            if v is not None and v not in ids:
                ids.append(int(v))
    if not ids:
        raise ValueError("the model defines no EOS token")
    return ids
