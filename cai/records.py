"""Pydantic records with lineage. No I/O here: every other layer builds on these."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Role = Literal["system", "user", "assistant"]


def check_unicode(text: str) -> str:
    """`text` when it is valid Unicode; ValueError for a lone surrogate (e.g. from a JSON "\\ud800"
    escape), which no file, shard or response could store as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"invalid Unicode: a lone surrogate {text[exc.start]!r} at character {exc.start} "
                         "(an unpaired \\ud800-\\udfff escape); remove it or send valid UTF-8") from None
    return text


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Role
    content: str

    @field_validator("content")
    @classmethod
    def _valid_unicode(cls, content: str) -> str:
        return check_unicode(content)


Chat = list[Message]


class ErrorCode(str, Enum):
    """Why a row failed. Every input ends as one result or one error row."""

    BACKEND_UNAVAILABLE = "backend_unavailable"
    BAD_REQUEST = "bad_request"
    CONTEXT_LENGTH = "context_length_exceeded"
    TRUNCATED = "truncated"
    EMPTY = "empty"
    UNPARSEABLE = "unparseable"
    NO_LOGPROBS = "no_logprobs"
    OFF_OPTIONS = "off_options"  # the judge's probability was mostly on tokens other than the options
    CANCELLED = "cancelled"
    INTERNAL = "internal"


class ErrorInfo(BaseModel):
    code: ErrorCode
    message: str
    raw: str | None = None


class SamplingParams(BaseModel):
    """What changes a completion. `max_tokens` is always set: no request is unbounded."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # 1e999, NaN: refused, not stored
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] | None = None


class Completion(BaseModel):
    """One engine answer. `error` is set when the backend failed for this request."""

    text: str = ""
    finish_reason: Literal["stop", "length", "error"] = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: ErrorInfo | None = None


class ConstitutionRef(BaseModel):
    """A constitution's identity: name + version + content sha, plus git commit when tracked."""

    name: str
    version: str
    sha256: str
    git_commit: str | None = None
    path: str | None = None


class ModelRef(BaseModel):
    id: str
    revision: str | None = None
    engine: str


class Lineage(BaseModel):
    """Where a record came from. `constitution` is None for a prompt left unrevised on purpose
    (its group maps to "none"); `prompt_group` is the prompt's source group (see cai.sources)."""

    constitution: ConstitutionRef | None
    prompt_group: str | None = None
    principle_ids: list[str]
    model: ModelRef
    sampling: dict[str, SamplingParams]
    seed: int
    template_hash: str
    cai_version: str
    created_at: str = Field(default_factory=lambda: utc_now())


class SourcePrompt(BaseModel):
    """A prompt as read from a source: the conversation up to the turn to answer."""

    id: str
    messages: Chat
    source: str
    group: str = Field("", description="the prompt's source group (bundled set name, file stem, or the "
                                       "row's `source` field); recipes map groups to constitutions")


class Step(BaseModel):
    """One turn of a critique-then-revise trajectory."""

    kind: Literal["answer", "critique", "revision"]
    principle_id: str | None = None
    text: str
    finish_reason: Literal["stop", "length", "error"]
    prompt_tokens: int = 0
    completion_tokens: int = 0


class SFTRecord(BaseModel):
    """Phase-1 result for one source prompt: the full trajectory and its final revision."""

    id: str
    stage: Literal["sft"] = "sft"
    parent_ids: list[str]
    prompt: Chat
    trajectory: list[Step]
    final: str | None = None
    lineage: Lineage
    error: ErrorInfo | None = None

    @property
    def generated_tokens(self) -> int:
        return sum(s.completion_tokens for s in self.trajectory)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def stable_id(stage: str, *parts: object) -> str:
    """Deterministic id from the stage and whatever identifies the input."""
    payload = json.dumps([stage, *parts], sort_keys=True, ensure_ascii=False, default=str)
    return f"{stage}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ---- phase 2: judging and preferences ------------------------------------------------

Position = Literal["A", "B"]
JUDGE_MODES: tuple[str, ...] = ("logprob", "cot", "structured")
"""The modes of cai's judge (`JudgeConfig.mode`), in the order help texts list them. Each one has its
entry in `cai.judge.JUDGE_MODE_SPECS` (runner, templates, data-card text); the layers below the judge
validate mode names against this tuple."""
# Literal[tuple] is Literal[each item]: the schema's enum and the validation message name every mode.
JudgeMode = Literal[(*JUDGE_MODES, "baseline")]  # "baseline": the evaluation's reference judge
CONSTRUCTION = "construction"
"""The `mode` of a contrastive pair's Judgement: its label comes from how the pair was made, no judge ran."""
LABELLERS: tuple[str, ...] = ("judge", "contrastive", "both")
"""Who labels phase-2 pairs (`Phase2Config.labeller`): the AI judge on K sampled answers; the
construction of a contrastive pair (RLCD: answer 0 steered toward the sampled principle is chosen,
answer 1 steered away from it is rejected); or the construction, with the judge scoring it too."""
Labeller = Literal[LABELLERS]


class Contrast(BaseModel):
    """How a contrastive pair was made: the sampled principle and its two steering instructions
    (appended to the prompt's last user turn by the template `template_hash` names, for that
    generation only). answers[0] was generated toward the principle, answers[1] away from it."""

    principle_id: str
    toward: str
    away: str
    template_hash: str


class JudgeOrder(BaseModel):
    """One presentation of a pair to the judge.

    `first` names the answer shown in position (A): "A" for the original order,
    "B" when the answers were swapped. `logprobs` and `verdict` use the *shown*
    position labels; `p_first` is P(the answer shown first is preferred) and
    `p_a` maps it back to P(answer A preferred) whatever the order.
    `option_mass` = P(A) + P(B) before normalising (logprob, cot): how much of its
    probability the judge put on the options at all. `bounded` names options the
    backend did not return (a server's top_logprobs): their log-prob is an upper
    bound (the smallest returned one), so `option_mass` is one too.
    """

    first: Position
    logprobs: dict[str, float] | None = None
    option_mass: float | None = None
    bounded: list[Position] = Field(default_factory=list)
    verdict: Position | None = None
    p_first: float | None = None
    p_a: float | None = None
    raw: str | None = None
    finish_reason: Literal["stop", "length", "error"] | None = None
    attempts: int = 1
    error: ErrorInfo | None = None


class Judgement(BaseModel):
    """The judge's soft label for one pair: P(answer A preferred), averaged over orders.

    `consistent` is True when every order strictly prefers the same answer,
    False when they disagree (or one is a tie), None when judged in one order.
    `confidence` = |p_a - 0.5| * 2. A failure in any order makes the whole
    judgement an error row (p_a None): never a guessed winner or a silent tie.
    Mode `construction` is a contrastive pair's label (p_a 1, no orders): no judge ran.
    """

    principle_id: str | None = None
    mode: JudgeMode | Literal["construction"]
    p_a: float | None = None
    orders: list[JudgeOrder] = Field(default_factory=list)
    consistent: bool | None = None
    confidence: float | None = None
    error: ErrorInfo | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def p_a_orders(self) -> list[float | None]:
        return [o.p_a for o in self.orders]


class AnswerSample(BaseModel):
    """One sampled policy answer. `excluded` says why it was not paired (truncated, empty, ...)."""

    text: str
    finish_reason: Literal["stop", "length", "error"]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    excluded: str | None = None
    error: ErrorInfo | None = None


class SampledAnswers(BaseModel):
    """Phase 2, first pass, for one prompt: the policy's K answers, judged in the second pass.

    Kept in `shards/samples-*` so the policy engine can be closed before the judge starts
    (two different models never hold one GPU at once). `error` is set when fewer than two
    answers are usable: that prompt becomes an error row without being judged.
    """

    id: str
    stage: Literal["samples"] = "samples"
    parent_ids: list[str]
    prompt: Chat
    group: str = ""
    answers: list[AnswerSample] = Field(default_factory=list)
    model: ModelRef
    contrast: Contrast | None = Field(None, description="contrastive labellers: how the pair was steered")
    error: ErrorInfo | None = None

    @property
    def generated_tokens(self) -> int:
        return sum(a.completion_tokens for a in self.answers)


class Comparison(BaseModel):
    """A judged pair: answers[a] shown as answer A, answers[b] as answer B."""

    a: int
    b: int
    judgement: Judgement


class PreferenceLineage(Lineage):
    """Phase-2 lineage: `model` is the policy; the judge has its own model and settings.

    `sampling` holds {"policy": ..., "judge": ...}; the judge entry is the
    generation setting of its reasoning / verdict (logprob mode scores one token).
    """

    judge_model: ModelRef
    judge_config: dict = Field(default_factory=dict)
    labeller: Labeller = "judge"


HUMAN_LABELS = ("agree", "flip")  # review labels that decide a pair (cai serve); "discard" drops it
HUMAN_SCORE = 1.0  # score and margin of a human-reviewed pair: a human decision is a confident label


class PreferenceRecord(BaseModel):
    """Phase-2 result: K sampled answers for one prompt and the emitted preference pair.

    `score` = P(chosen preferred) in [0.5, 1]; `margin` = P(chosen) - P(rejected)
    = 2 * score - 1, in [0, 1] (0: a coin flip, 1: certain).
    `comparisons` keeps every judged pair; `judgement` is the emitted pair's.
    """

    id: str
    stage: Literal["prefs"] = "prefs"
    parent_ids: list[str]
    prompt: Chat
    answers: list[AnswerSample] = Field(default_factory=list)
    pair: tuple[int, int] | None = None
    chosen_index: int | None = None
    rejected_index: int | None = None
    chosen: str | None = None
    rejected: str | None = None
    score: float | None = None
    margin: float | None = None
    judgement: Judgement | None = None
    comparisons: list[Comparison] = Field(default_factory=list)
    lineage: PreferenceLineage
    contrast: Contrast | None = None
    error: ErrorInfo | None = None

    @property
    def generated_tokens(self) -> int:
        """Policy tokens sampled for this prompt (the judge's scoring generates none in logprob mode)."""
        return sum(a.completion_tokens for a in self.answers)

    def contrast_metadata(self) -> dict | None:
        """A contrastive pair's `metadata.contrast` in an export: its steering (principle, both
        instructions, template hash) and, labeller `both`, the judge's P(toward answer preferred)
        averaged over its orders, whether the orders agree, and the judge's error if it failed."""
        if self.contrast is None:
            return None
        judged = self.comparisons[0].judgement if self.comparisons else None
        return {**self.contrast.model_dump(),
                "judge_p_toward": judged.p_a if judged else None,
                "judge_consistent": judged.consistent if judged else None,
                "judge_error": judged.error.code.value if judged and judged.error else None}

    @property
    def ok(self) -> bool:
        return self.error is None
