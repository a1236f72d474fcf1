"""The dataset rows cai exports, how a human review changes a row, and which records are exported.

Every module that writes or reads these rows (cai.export, serve/results.py, the trainers' data
preparation) goes through this one: nothing else builds or interprets them. Field by field, with
example rows: docs/formats.md.

Formats (each with a version; a data card names the versions of its rows):

- SFT row, ``SFT_FORMAT_VERSION``: TRL's conversational language-modelling format,
  ``{"messages": [{"role", "content"}, ...], "metadata": {...}}``: the prompt's turns, then the
  final revision as the last (assistant) turn. ``metadata`` is cai's lineage and the trajectory.
- Preference row, ``PREFERENCE_FORMAT_VERSION``: TRL's conversational preference format with an
  explicit prompt, ``{"prompt": [...], "chosen": [assistant turn], "rejected": [assistant turn]}``,
  plus ``score`` = P(chosen preferred) in [0.5, 1], ``margin`` = 2·score − 1 in [0, 1] (TRL's
  reward-model ``margin`` column), ``consistent`` (the judge's orders agree; null with one order)
  and ``metadata``. A contrastive pair (``metadata.labeller`` contrastive or both; cai.contrastive)
  has ``score`` = ``margin`` = 1.0: a label by construction (hard), not a judged probability.
- Review, ``REVIEW_FORMAT_VERSION``: a human review applied to either row (``apply_review``).
  Every reviewed row carries ``metadata.review`` = {label, reviewer, note, reviewed_at} (empty
  strings when not reviewed). "discard" drops the row. On a preference row "agree" and "flip"
  make it a human label: chosen/rejected as the reviewer decided (flip swaps them and the
  indices), ``score`` = ``margin`` = ``metadata.confidence`` = 1.0, ``metadata.label_source``
  "human" ("judge" otherwise), and the judge's own verdict under ``metadata.judge_verdict``.
  Version 1 (exports before it) stored a flip as score = 1 − score; ``judge_row`` still reads it.

Export filters (``ExportFilters``, ``preference_exclusion``): error rows are never exported; a
judged pair is left out when it is a tie (margin 0), below ``min_confidence``, or (with
``require_consistent``) judged differently in its two orders, unless a reviewer decided it: a
human label replaces the judge's, so the filters on the judge's confidence no longer apply to it,
and a discarded record is never exported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field

from cai.errors import CaiError
from cai.records import HUMAN_LABELS, HUMAN_SCORE, Message, PreferenceRecord, SFTRecord

SFT_FORMAT_VERSION = 1
PREFERENCE_FORMAT_VERSION = 1
REVIEW_FORMAT_VERSION = 2

RowKind = Literal["sft", "prefs"]
DISCARD = "discard"
JUDGE_VERDICT_KEYS = ("chosen_index", "rejected_index", "p_a", "p_a_orders", "first_shown", "confidence")
REVIEW_KEYS = ("review", "judge_verdict", "label_source")  # what apply_review adds to metadata


class FormatError(CaiError, ValueError):
    """A row that is not in the format its reader needs; the message says what is missing."""


# ---- SFT rows ------------------------------------------------------------------------


class SFTMetadata(BaseModel):
    """Lineage of one SFT row (see docs/formats.md)."""

    id: str = Field(description="the record id in the job's shards")
    parent_ids: list[str] = Field(description="the source prompt's id")
    constitution: dict[str, Any] | None = Field(description="name, version, sha256, git_commit; null: unrevised")
    prompt_group: str | None
    principle_ids: list[str] = Field(description="the principle of each critique-revision round")
    model: dict[str, Any] = Field(description="id, revision, engine")
    sampling: dict[str, dict[str, Any]] = Field(description="per step kind: max_tokens, temperature, top_p, seed, stop")
    seed: int
    template_hash: str
    cai_version: str
    created_at: str
    trajectory: list[dict[str, Any]] = Field(description="every step: kind, principle_id, text, finish_reason, tokens")


class SFTRow(BaseModel):
    messages: list[Message] = Field(description="the prompt's turns, then the final revision (assistant)")
    metadata: SFTMetadata


def sft_row(record: SFTRecord) -> dict[str, Any]:
    """The exported SFT row of an error-free record."""
    if record.error is not None or record.final is None:
        raise ValueError(f"record {record.id} has no final revision (error: {record.error})")
    lineage = record.lineage
    metadata = SFTMetadata(
        id=record.id,
        parent_ids=record.parent_ids,
        constitution=lineage.constitution.model_dump(exclude={"path"}) if lineage.constitution else None,
        prompt_group=lineage.prompt_group,
        principle_ids=lineage.principle_ids,
        model=lineage.model.model_dump(),
        sampling={k: v.model_dump() for k, v in lineage.sampling.items()},
        seed=lineage.seed,
        template_hash=lineage.template_hash,
        cai_version=lineage.cai_version,
        created_at=lineage.created_at,
        trajectory=[s.model_dump() for s in record.trajectory],
    )
    messages = [*record.prompt, Message(role="assistant", content=record.final)]
    return SFTRow(messages=messages, metadata=metadata).model_dump()


def sft_prompt_completion(row: Mapping[str, Any]) -> dict[str, Any]:
    """An SFT row in TRL's conversational prompt-completion format: the turns before the last as
    `prompt`, the last (an assistant turn) as `completion`, so a completion-only loss trains on the
    final answer alone."""
    messages = row["messages"]
    if not messages or messages[-1]["role"] != "assistant":
        raise FormatError("every SFT row must end with an assistant message")
    return {"prompt": messages[:-1], "completion": [messages[-1]]}


# ---- preference rows -----------------------------------------------------------------


class PreferenceMetadata(BaseModel):
    """Lineage and the judge's measurements of one preference row (see docs/formats.md)."""

    id: str
    parent_ids: list[str]
    constitution: dict[str, Any]
    prompt_group: str | None
    principle_id: str | None = Field(description="the principle whose comparison question judged this pair")
    principle_ids: list[str] = Field(description="the principle of every pair judged for the prompt")
    policy_model: dict[str, Any]
    judge_model: dict[str, Any]
    judge_mode: str = Field(description="logprob, cot or structured (the mode this pair was judged in)")
    judge_config: dict[str, Any]
    sampling: dict[str, dict[str, Any]] = Field(description='{"policy": ..., "judge": ...}')
    seed: int
    template_hash: str = Field(description="hash of the judge mode's templates (cai.prompts.judge_template_hash)")
    cai_version: str
    created_at: str
    pair: list[int] = Field(description="indices of the two judged answers among the prompt's samples (A, B)")
    chosen_index: int
    rejected_index: int
    p_a: float = Field(description="P(answer A preferred), averaged over the orders")
    p_a_orders: list[float | None] = Field(description="P(answer A preferred) in each order")
    first_shown: list[str] = Field(description='per order, which answer was shown first ("A" or "B")')
    confidence: float = Field(description="abs(p_a - 0.5) * 2")
    num_samples: int = Field(description="answers sampled for the prompt (K)")
    labeller: str = Field("judge", description="who labelled the pair: judge; contrastive (by construction, "
                          "RLCD: the answer steered toward the principle is chosen); both (by construction, "
                          "also scored by the judge)")
    contrast: dict[str, Any] | None = Field(
        None, description="contrastive pairs: the principle, its toward/away instructions, the steering "
        "template's hash, and (labeller both) the judge's P(toward preferred), its consistency and error")


class PreferenceRow(BaseModel):
    prompt: list[Message]
    chosen: list[Message] = Field(description="one assistant turn: the preferred answer")
    rejected: list[Message] = Field(description="one assistant turn")
    score: float = Field(description="P(chosen preferred), in [0.5, 1]")
    margin: float = Field(description="2 * score - 1 = P(chosen) - P(rejected), in [0, 1]")
    consistent: bool | None = Field(description="the judge's orders prefer the same answer; null with one order")
    metadata: PreferenceMetadata


def preference_row(record: PreferenceRecord) -> dict[str, Any]:
    """The exported preference row of a judged record (TRL's conversational preference format)."""
    if record.chosen is None or record.rejected is None or record.judgement is None:
        raise ValueError(f"record {record.id} has no preference pair (error: {record.error})")
    lineage, j = record.lineage, record.judgement
    metadata = PreferenceMetadata(
        id=record.id,
        parent_ids=record.parent_ids,
        constitution=lineage.constitution.model_dump(exclude={"path"}),
        prompt_group=lineage.prompt_group,
        principle_id=j.principle_id,
        principle_ids=lineage.principle_ids,
        policy_model=lineage.model.model_dump(),
        judge_model=lineage.judge_model.model_dump(),
        judge_mode=j.mode,
        judge_config=lineage.judge_config,
        sampling={k: v.model_dump() for k, v in lineage.sampling.items()},
        seed=lineage.seed,
        template_hash=lineage.template_hash,
        cai_version=lineage.cai_version,
        created_at=lineage.created_at,
        pair=list(record.pair or ()),
        chosen_index=record.chosen_index,
        rejected_index=record.rejected_index,
        p_a=j.p_a,
        p_a_orders=j.p_a_orders,
        first_shown=[o.first for o in j.orders],
        confidence=j.confidence,
        num_samples=len(record.answers),
        labeller=lineage.labeller,
        contrast=record.contrast_metadata(),
    )
    return PreferenceRow(
        prompt=record.prompt,
        chosen=[Message(role="assistant", content=record.chosen)],
        rejected=[Message(role="assistant", content=record.rejected)],
        score=record.score,
        margin=record.margin,
        consistent=j.consistent,
        metadata=metadata,
    ).model_dump()


# ---- reviews -------------------------------------------------------------------------


class ReviewMeta(BaseModel):
    """`metadata.review` of a reviewed export: the review in force (empty strings: none)."""

    label: str = Field("", description='"agree", "flip", "discard" or "" (not reviewed)')
    reviewer: str = ""
    note: str = ""
    reviewed_at: str = ""

    @classmethod
    def of(cls, review: Mapping[str, Any] | None) -> ReviewMeta:
        """From a review as cai serve stores it ({label, reviewer, note, created_at, ...}), or from a row's
        `metadata.review`; None: not reviewed. Only these four fields are kept (never a key)."""
        if not review:
            return cls()
        return cls(label=_text(review.get("label")), reviewer=_text(review.get("reviewer")),
                   note=_text(review.get("note")), reviewed_at=_text(review.get("reviewed_at") or review.get("created_at")))


def _text(value: Any) -> str:
    """A review field as text: a dataset reader may have parsed a timestamp into a datetime."""
    if value is None:
        return ""
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


class JudgeVerdict(BaseModel):
    """`metadata.judge_verdict`: the judge's label of a reviewed preference row, as exported."""

    score: float | None
    margin: float | None
    consistent: bool | None
    chosen_index: int | None
    rejected_index: int | None
    p_a: float | None
    p_a_orders: list[float | None] | None
    first_shown: list[str] | None
    confidence: float | None


def review_label(metadata: Any) -> str:
    """The label a row carries in `metadata.review.label` (a reviewed export), or ""."""
    review = metadata.get("review") if isinstance(metadata, Mapping) else None
    return (review.get("label") or "") if isinstance(review, Mapping) else ""


def row_review(row: Mapping[str, Any]) -> ReviewMeta | None:
    """The review a row already carries (`metadata.review`), or None."""
    metadata = row.get("metadata")
    review = metadata.get("review") if isinstance(metadata, Mapping) else None
    return ReviewMeta.of(review) if isinstance(review, Mapping) and review.get("label") else None


def judge_verdict(row: Mapping[str, Any]) -> dict[str, Any]:
    """The judge's label of a preference row as the export wrote it (before any review)."""
    meta = row.get("metadata") or {}
    return JudgeVerdict(score=row.get("score"), margin=row.get("margin"), consistent=row.get("consistent"),
                        **{key: meta.get(key) for key in JUDGE_VERDICT_KEYS}).model_dump()


def _swap(row: dict[str, Any], meta: dict[str, Any]) -> None:
    row["chosen"], row["rejected"] = row.get("rejected"), row.get("chosen")
    if "chosen_index" in meta or "rejected_index" in meta:
        meta["chosen_index"], meta["rejected_index"] = meta.get("rejected_index"), meta.get("chosen_index")


def judge_row(row: Mapping[str, Any], kind: RowKind = "prefs") -> dict[str, Any]:
    """`row` as the export wrote it, before any review: what a review applies to.

    A reviewed row (cai serve's export) has its review taken off: the judge's verdict restored
    from `metadata.judge_verdict`, a flip swapped back. A flip from a version-1 export (no
    verdict kept; score = 1 - score) is turned back the same way. A row with no review is as is."""
    meta = dict(row.get("metadata") or {})
    prior = review_label(meta)
    verdict = meta.get("judge_verdict")
    out = {**row, "metadata": {k: v for k, v in meta.items() if k not in REVIEW_KEYS}}
    if kind != "prefs" or not prior:
        return out
    base = out["metadata"]
    if prior == "flip":
        _swap(out, base)
    if isinstance(verdict, Mapping):
        out.update({k: verdict.get(k) for k in ("score", "margin", "consistent")})
        base.update({k: verdict.get(k) for k in JUDGE_VERDICT_KEYS if k in base or verdict.get(k) is not None})
    elif prior == "flip":  # version 1: score was stored as 1 - score, margin as its negation
        if out.get("score") is not None:
            out["score"] = 1.0 - out["score"]
        if out.get("margin") is not None:
            out["margin"] = -out["margin"]
    return out


def apply_review(row: Mapping[str, Any], review: ReviewMeta | None, kind: RowKind = "prefs") -> dict[str, Any] | None:
    """The exported `row` with `review` applied (see the module docstring); None when discarded.

    `row` may be an export row or a reviewed one (its old review is taken off first, `judge_row`),
    so applying a row's own review again (`apply_review(row, row_review(row))`) keeps its chosen
    answer and only makes sure its label fields say what the review decided."""
    label = review.label if review else ""
    if label == DISCARD:
        return None
    out = judge_row(row, kind)
    meta = out["metadata"]
    meta["review"] = (review or ReviewMeta()).model_dump()
    if kind != "prefs":
        return out
    meta["judge_verdict"] = judge_verdict(out)
    meta["label_source"] = "human" if label in HUMAN_LABELS else "judge"
    if label == "flip":
        _swap(out, meta)
    if label in HUMAN_LABELS:
        out["score"] = out["margin"] = meta["confidence"] = HUMAN_SCORE
    return out


# ---- export filters ------------------------------------------------------------------


class ExportFilters(BaseModel):
    """Which judged pairs go into the preference dataset (PrefsJob.min_confidence / require_consistent)."""

    min_confidence: float = Field(0.0, ge=0.0, le=1.0)
    require_consistent: bool = True

    @classmethod
    def of(cls, settings: Mapping[str, Any]) -> ExportFilters:
        """From a job's settings (a manifest recipe, a service request)."""
        return cls(min_confidence=settings.get("min_confidence", 0.0),
                   require_consistent=settings.get("require_consistent", True))


def preference_exclusion(record: PreferenceRecord, filters: ExportFilters | None = None,
                         review: str = "") -> str | None:
    """Why `record` is not a row of the preference dataset ("error", "discarded", "tie",
    "low_confidence", "inconsistent"), or None. `review`: the label of the review in force."""
    filters = filters or ExportFilters()
    j = record.judgement
    if record.error is not None or j is None or j.error is not None or record.chosen is None:
        return "error"
    if review == DISCARD:
        return "discarded"
    if review in HUMAN_LABELS:
        return None
    if not record.margin:
        return "tie"
    if (j.confidence or 0.0) < filters.min_confidence:
        return "low_confidence"
    if filters.require_consistent and j.consistent is False:
        return "inconsistent"
    return None


def keep_for_export(record: PreferenceRecord, min_confidence: float = 0.0, require_consistent: bool = True) -> bool:
    """Whether an unreviewed record is a row of the preference dataset (see preference_exclusion).
    A pair judged in one order has consistent=None and is not excluded for it."""
    filters = ExportFilters(min_confidence=min_confidence, require_consistent=require_consistent)
    return preference_exclusion(record, filters) is None


def sft_exclusion(record: SFTRecord, review: str = "") -> str | None:
    """Why `record` is not a row of the SFT dataset ("error", "discarded"), or None."""
    if record.error is not None or record.final is None:
        return "error"
    return "discarded" if review == DISCARD else None


def exported_row(record: PreferenceRecord | SFTRecord, review: ReviewMeta | None = None,
                 filters: ExportFilters | None = None) -> dict[str, Any] | None:
    """A record's row in a (reviewed) export, or None when it is not exported."""
    label = review.label if review else ""
    if isinstance(record, SFTRecord):
        if sft_exclusion(record, label) is not None:
            return None
        return apply_review(sft_row(record), review, "sft")
    if preference_exclusion(record, filters, label) is not None:
        return None
    return apply_review(preference_row(record), review, "prefs")
