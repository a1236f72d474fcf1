"""PPO's rollouts: prompts, sampling with fully explicit settings, and scoring.

Sampling. transformers fills every generation setting that the `generation_config` passed to
`generate()` leaves unset (None) from the model's own `generation_config` (a checkpoint's
`repetition_penalty=1.05`, `top_k=50`, `no_repeat_ngram_size`, ...). Those settings would make the
tokens come from another distribution than the one PPO's ratio and KL compute. So a rollout sets
every sampling setting itself and, for the call, swaps the model's generation_config for a blank
one: nothing is inherited. The last logits processor applies the temperature and records the
log-probability each token was sampled with; the update's first forward pass must agree with it
(`first_ratio`, checked in cai.train.ppo_core).

Scoring. A completion that ended (a turn-end token) is scored as a finished assistant turn,
rendered by the chat template as `cai train rm` saw its pairs. A completion cut at max_new_tokens
is not: it is the prompt with the generation prompt and the raw text, no turn end, so the reward
model is not told that a cut-off answer was a complete one.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cai.train.common import (
    TrainError,
    check_chat_format,
    describe,
    load_data,
    load_model,
    load_tokenizer,
    without_discarded,
)
from cai.train.ppo_config import PPOConfig
from cai.train.ppo_core import autocast

RewardFn = Callable[[list[list[dict]], list[str]], Sequence[float]]
Scorer = Callable[[list[list[dict]], list[str], list[bool]], Sequence[float]]

# Every setting that would add a logits processor or warper, at its neutral value. Left unset, each
# would be filled from the model's generation_config or transformers' global defaults (top_k=50).
NEUTRAL_SAMPLING: dict[str, Any] = dict(
    do_sample=True, num_beams=1, num_return_sequences=1, temperature=1.0, top_k=0, top_p=1.0, min_p=None,
    top_h=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0,
    encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, length_penalty=1.0,
    bad_words_ids=None, sequence_bias=None, suppress_tokens=None, begin_suppress_tokens=None,
    forced_bos_token_id=None, forced_eos_token_id=None, min_length=0, min_new_tokens=None,
    exponential_decay_length_penalty=None, renormalize_logits=False, remove_invalid_values=False,
    watermarking_config=None, guidance_scale=None, stop_strings=None, use_cache=True,
    output_scores=False, output_logits=False, return_dict_in_generate=False,
)


# ---- prompts -----------------------------------------------------------------------


def load_prompts(path: str | Path) -> list[list[dict]]:
    """Unique prompts (chats) from a preference dataset's `prompt` column, an SFT
    `messages` column (the turns before the last assistant turn) or a prompt
    JSONL whose `prompt` is a string."""
    ds = load_data(path)
    ds = without_discarded(ds, "prefs" if "chosen" in ds.column_names else "sft", describe(path))
    column = next((c for c in ("prompt", "messages") if c in ds.column_names), None)
    if column is None:
        raise TrainError(f"PPO needs a `prompt` or `messages` column; got {ds.column_names}")
    seen: dict[str, list[dict]] = {}
    for value in ds[column]:
        chat = [{"role": "user", "content": value}] if isinstance(value, str) else [dict(m) for m in value]
        if column == "messages" and chat and chat[-1]["role"] == "assistant":
            chat = chat[:-1]
        chat = [{"role": m["role"], "content": m["content"]} for m in chat]
        seen.setdefault(json.dumps(chat, sort_keys=True), chat)
    return list(seen.values())


def chat_ids(tokenizer, chat: list[dict], generation_prompt: bool = True) -> list[int]:
    """Ids as TRL tokenizes a chat: the template's own special tokens, no extra BOS."""
    enc = tokenizer.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True)
    return list(enc["input_ids"])


def prompt_batch(n: int, step: int, size: int, seed: int) -> list[int]:
    """Indices for `step`: consecutive slices of a fresh seeded permutation per epoch (resume-safe)."""
    out = []
    for k in range(step * size, (step + 1) * size):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + k // n))
        out.append(int(perm[k % n]))
    return out


# ---- sampling ----------------------------------------------------------------------


def generation_config(cfg: PPOConfig, tokenizer, end_ids: list[int]):
    """A GenerationConfig with every sampling setting explicit; the temperature is applied by SampledLogProbs."""
    from transformers import GenerationConfig

    return GenerationConfig(**NEUTRAL_SAMPLING, max_new_tokens=cfg.max_new_tokens, eos_token_id=end_ids,
                            pad_token_id=tokenizer.pad_token_id)


@contextlib.contextmanager
def blank_model_generation_config(model):
    """The transformers model's own generation_config replaced by a blank one for the call."""
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a LoRA wrapper
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


class SampledLogProbs:
    """The last logits processor: divides by the temperature and keeps log pi_sample of each sampled
    token (read at the next call, from input_ids, so only one vocabulary row per sequence is held)."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.previous: torch.Tensor | None = None
        self.logps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1:])
        scores = scores / self.temperature
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        if self.previous is not None:
            self.logps.append(self.previous.gather(-1, tokens).squeeze(-1))

    def finish(self, seq: torch.Tensor, n_new: int) -> torch.Tensor:
        self._take(seq[:, -1:])
        self.previous = None
        logps = torch.stack(self.logps, 1) if self.logps else seq.new_zeros((len(seq), 0), dtype=torch.float)
        logps = logps[:, :n_new]  # a step transformers ran and undid (a deferred stop check) comes last
        if logps.shape[1] != n_new:
            raise TrainError(f"rollout: recorded {logps.shape[1]} sampling log-probs for {n_new} tokens "
                             "(another logits processor or a generate() override changed the sampling loop)")
        return logps


@torch.no_grad()
def rollout(run: dict[str, Any], chats: list[list[dict]]) -> dict[str, Any]:
    """Sample one completion per chat. Tokens after the first turn end are padding (mask 0)."""
    from transformers import LogitsProcessorList

    cfg, tokenizer, end_ids, policy = run["cfg"], run["tokenizer"], run["end_ids"], run["policy"]
    device = run["device"]
    enc = tokenizer.pad({"input_ids": [chat_ids(tokenizer, c) for c in chats]}, padding=True, return_tensors="pt").to(device)
    recorder = SampledLogProbs(cfg.temperature)
    policy.eval()
    with blank_model_generation_config(policy), autocast(cfg, device):
        seq = policy.generate(**enc, generation_config=run["generation_config"], logits_processor=LogitsProcessorList([recorder]))
    n_prompt = enc["input_ids"].shape[1]
    new = seq[:, n_prompt:]
    sample_logp = recorder.finish(seq, new.shape[1])
    is_end = torch.isin(new, torch.tensor(end_ids, device=device))
    after_end = (is_end.long().cumsum(-1) - is_end.long()) > 0
    new = new.masked_fill(after_end, tokenizer.pad_token_id)
    cmask = (~after_end).float()
    texts = [tokenizer.decode(row[m.bool() & ~e], skip_special_tokens=True) for row, m, e in zip(new, cmask, is_end)]
    return {
        "seq": torch.cat([enc["input_ids"], new], 1), "mask": torch.cat([enc["attention_mask"], cmask.long()], 1),
        "cmask": cmask, "n_prompt": n_prompt, "texts": texts, "ended": is_end.any(-1), "sample_logp": sample_logp,
    }


# ---- scoring -----------------------------------------------------------------------


def reward_ids(tokenizer, prompt: list[dict], text: str, ended: bool) -> list[int]:
    """A finished completion as a finished assistant turn; a cut-off one as the generation prompt
    plus its raw text, with no turn end."""
    if ended:
        return chat_ids(tokenizer, prompt + [{"role": "assistant", "content": text}], generation_prompt=False)
    return chat_ids(tokenizer, prompt) + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def reward_model_scorer(path: str, device: str, batch_size: int = 16) -> Scorer:
    """Score chats with an AutoModelForSequenceClassification saved by `cai train rm`."""
    tok = load_tokenizer(path, padding_side="right")
    check_chat_format(tok)
    rm = load_model(path, "reward", pad_token_id=tok.pad_token_id).to(device).eval()

    @torch.no_grad()
    def score(prompts: list[list[dict]], texts: list[str], ended: list[bool]) -> list[float]:
        ids = [reward_ids(tok, p, t, e) for p, t, e in zip(prompts, texts, ended)]
        out = []
        for k in range(0, len(ids), batch_size):
            enc = tok.pad({"input_ids": ids[k : k + batch_size]}, padding=True, return_tensors="pt")
            out += rm(**enc.to(rm.device)).logits[:, 0].float().tolist()
        return out

    return score


def function_scorer(reward_fn: RewardFn) -> Scorer:
    """A `reward_fn(prompts, completions)` as a scorer; it sees the texts, cut off or not."""
    return lambda prompts, texts, ended: reward_fn(prompts, texts)


def score_rollout(scorer: Scorer, chats: list[list[dict]], batch: dict[str, Any]) -> torch.Tensor:
    """The raw scores, checked: one finite number per completion."""
    scores = list(scorer(chats, batch["texts"], batch["ended"].tolist()))
    if len(scores) != len(chats):
        raise TrainError(f"the reward returned {len(scores)} scores for {len(chats)} completions")
    values = []
    for s in scores:
        try:
            values.append(float(s))
        except (TypeError, ValueError):
            raise TrainError(f"the reward returned a non-numeric score: {s!r}") from None
        if not math.isfinite(values[-1]):
            raise TrainError(f"the reward returned a non-finite score ({s!r}) for: {batch['texts'][len(values) - 1]!r}")
    return torch.tensor(values, device=batch["cmask"].device)
