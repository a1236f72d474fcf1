"""Log-probabilities of given completions under a local causal LM (the human-grounded measures).

A completion is scored after its conversation rendered with the model's own chat template
(`cai.engine.tokens.render_prompt`: the shared turns as the prompt, ending with the assistant
header, or inside an assistant message that starts with `prefix`), tokenized as the engines
tokenize it (`add_special_tokens=False`). Its tokens are the ones the tokenizer produces for
prompt + completion after their longest shared start with the prompt's own tokens, so a merge
across the boundary makes the last prompt token part of the completion rather than replacing
it (as `plan_options` does for the judge's options). The turn-end token is not scored: the
measure is of the text that people labelled, and both answers of a pair are treated alike.

Requests of one `group` (the two answers of a pair, the four of a two-option question) share
most of their tokens: their common start runs once, and the rest of every request runs in one
batch on its key-value cache (right-padded); only the logits of scored tokens are kept. A group
that fails is retried request by request, so a bad row becomes one error row. One model is held
at a time: `close()` frees it.

torch and transformers are imported when a scorer is built, never when this module is imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel, Field

from cai.engine.models import resolve_model
from cai.engine.tokens import common_start, encode, render_prompt
from cai.records import Chat


@dataclass(frozen=True)
class ScoreRequest:
    chat: Chat
    completion: str
    prefix: str = ""
    group: str | None = None  # requests of one group share their common start: it runs once


class SeqScore(BaseModel):
    """log P(completion | prompt) summed over its `tokens` tokens, or why it has none."""

    logp: float | None = None
    tokens: int = 0
    error: str | None = Field(None, description="'code: detail'; codes render, empty, too_long, internal")

    @property
    def mean(self) -> float | None:
        return None if self.logp is None or not self.tokens else self.logp / self.tokens


class Scorer(Protocol):
    model_id: str

    def score(self, requests: Sequence[ScoreRequest]) -> list[SeqScore]: ...

    def close(self) -> None: ...


@dataclass
class _Row:
    ids: list[int]
    n: int  # completion tokens at the end of ids
    index: int


def completion_ids(tokenizer, request: ScoreRequest) -> tuple[list[int], int]:
    """(prompt + completion token ids, the number of completion tokens at the end)."""
    prompt_text = render_prompt(tokenizer, request.chat, request.prefix)
    prompt = encode(tokenizer, prompt_text)
    full = encode(tokenizer, prompt_text + request.completion)
    shared = common_start(prompt, full)
    return full, len(full) - shared


class LogprobScorer:
    """Sums of completion token log-probs with a local transformers model (a folder, or the embedded model)."""

    def __init__(self, model: str | None = None, device: str | None = None, max_batch: int = 16,
                 max_model_len: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_model(model)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float32 if self.device == "cpu" else torch.bfloat16
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.hf_model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype).to(self.device)
        self.hf_model.eval()
        self.model_id = str(model or "embedded")
        self.max_batch = max_batch
        config = self.hf_model.config
        self.max_model_len = max_model_len or getattr(config, "max_position_embeddings", None) or 2048
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    def score(self, requests: Sequence[ScoreRequest]) -> list[SeqScore]:
        results: list[SeqScore | None] = [None] * len(requests)
        groups: dict[object, list[_Row]] = {}
        for i, request in enumerate(requests):
            try:
                ids, n = completion_ids(self.tokenizer, request)
            except Exception as exc:  # a chat the template cannot render fails alone
                results[i] = SeqScore(error=f"render: {type(exc).__name__}: {exc}")
                continue
            if n == 0:
                results[i] = SeqScore(error="empty: the completion has no tokens")
            elif len(ids) > self.max_model_len:
                results[i] = SeqScore(error=f"too_long: {len(ids)} tokens > {self.max_model_len}")
            else:
                key = ("request", i) if request.group is None else ("group", request.group)
                groups.setdefault(key, []).append(_Row(ids, n, i))
        for rows in groups.values():
            for k in range(0, len(rows), self.max_batch):
                chunk = rows[k:k + self.max_batch]
                for row, result in zip(chunk, self._score_isolated(chunk)):
                    results[row.index] = result
        return results  # type: ignore[return-value]

    def _score_isolated(self, rows: list[_Row]) -> list[SeqScore]:
        try:
            return [SeqScore(logp=v, tokens=r.n) for r, v in zip(rows, self._score_group(rows))]
        except Exception as exc:  # e.g. out of memory: retry the rows one by one
            if len(rows) == 1:
                return [SeqScore(error=f"internal: {type(exc).__name__}: {exc}")]
            return [s for r in rows for s in self._score_isolated([r])]

    def _score_group(self, rows: list[_Row]) -> list[float]:
        """Rows sharing their first P tokens: the prefix runs once, the tails in one batch on its cache.

        Logits at position j predict token j + 1: the prefix run keeps those from the first scored
        token's predecessor on, the tail run gives the rest."""
        import torch

        shared = min(common_start(rows[0].ids, r.ids) for r in rows)
        p = min(shared, min(len(r.ids) for r in rows) - 1)  # every row keeps one token after the prefix
        if p < 1:
            if len(rows) == 1:
                raise ValueError("nothing to condition on")
            return [v for r in rows for v in self._score_group([r])]
        first = min(len(r.ids) - r.n for r in rows)
        keep = max(1, p - first + 1)
        with torch.inference_mode():
            out = self.hf_model(input_ids=torch.tensor([rows[0].ids[:p]], device=self.device), use_cache=True,
                                logits_to_keep=keep)
            head = torch.log_softmax(out.logits[0].float(), dim=-1)  # positions p - keep .. p - 1
            tail = None
            if any(len(r.ids) - 2 >= p for r in rows):  # some scored token is predicted past the prefix
                cache = out.past_key_values
                if len(rows) > 1:
                    cache.batch_repeat_interleave(len(rows))
                width = max(len(r.ids) for r in rows) - p
                ids = torch.tensor([r.ids[p:] + [self.pad_id] * (width + p - len(r.ids)) for r in rows],
                                   device=self.device)
                mask = torch.tensor([[1] * len(r.ids) + [0] * (width + p - len(r.ids)) for r in rows],
                                    device=self.device)
                tail = self.hf_model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=False).logits
            return [self._row_logp(r, b, p, keep, head, tail) for b, r in enumerate(rows)]

    @staticmethod
    def _row_logp(row: _Row, b: int, p: int, keep: int, head, tail) -> float:
        import torch

        start, end = len(row.ids) - row.n, len(row.ids)
        total = 0.0
        split = min(end, p + 1)  # tokens start..split-1 are predicted inside the prefix
        if start < split:
            targets = torch.tensor(row.ids[start:split], device=head.device)
            total += float(head[start - 1 - (p - keep): split - 1 - (p - keep)].gather(-1, targets[:, None]).sum())
        lo = max(start, p + 1)
        if lo < end:
            steps = torch.log_softmax(tail[b, lo - 1 - p: end - 1 - p].float(), dim=-1)
            targets = torch.tensor(row.ids[lo:end], device=steps.device)
            total += float(steps.gather(-1, targets[:, None]).sum())
        return total

    def close(self) -> None:
        self.hf_model = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass
