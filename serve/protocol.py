"""Request and response models of the job API (the OpenAPI schema at /docs comes from these).

Generation settings are cai's own recipe models (`Phase1Config`, `Phase2Config`,
`JudgeConfig`), so a request carries the same fields as a recipe file or the CLI.
Every model forbids unknown fields: there is no field through which a client could
pass engine options such as `trust_remote_code`, a model path or an output folder.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from cai.evaluate import Interval
from cai.kinds import KINDS, canonical
from cai.recipe import DEFAULT_BATCH_SIZE, JudgeConfig, Phase1Config, Phase2Config
from cai.records import Message, check_unicode

JobKind = Annotated[Literal[tuple(KINDS)], BeforeValidator(lambda v: canonical(v) if isinstance(v, str) else v)]
"""A job kind (cai.kinds), as cai spells it: sft, prefs, judge-eval. `judge_eval`, the spelling of
earlier versions of this API, is accepted and read as judge-eval."""
JobState = Literal["queued", "running", "completed", "failed", "cancelled"]
ReviewLabel = Literal["agree", "flip", "discard"]
SampleStrategy = Literal["random", "stratified"]
ConfidenceBin = Literal["low", "mid", "high", "n/a"]
ACTIVE_STATES = ("queued", "running")
FINAL_STATES = ("completed", "failed", "cancelled")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


MAX_DEPTH = 16
"""Nesting of a request body; a real one is at most 5 deep (prompts[0].messages[0].content)."""


def first_bad_value(data: Any) -> tuple[tuple, str] | None:
    """(location, problem) of a value no response or job file could carry: a non-finite number
    (NaN, Infinity, 1e999), a string with a lone surrogate, or nesting deeper than MAX_DEPTH."""
    stack: list[tuple[tuple, Any]] = [((), data)]
    while stack:
        loc, value = stack.pop()
        if len(loc) > MAX_DEPTH:
            return loc[:MAX_DEPTH], f"nested more than {MAX_DEPTH} levels deep"
        if isinstance(value, float) and not math.isfinite(value):
            return loc, f"{value} is not a finite number; give a finite number"
        try:
            if isinstance(value, str):
                check_unicode(value)
            elif isinstance(value, dict):
                stack.extend((loc + (check_unicode(k) if isinstance(k, str) else k,), v) for k, v in value.items())
            elif isinstance(value, list | tuple):
                stack.extend((loc + (n,), v) for n, v in enumerate(value))
        except ValueError as exc:
            return (loc + ("(key)",) if isinstance(value, dict) else loc), str(exc)
    return None


class InlinePrompt(Strict):
    """A conversation up to the turn to answer (it must end with a user turn)."""

    id: str | None = Field(None, max_length=200)
    source: str | None = Field(None, min_length=1, max_length=100,
                               description="the prompt's group, for `constitution_for` (e.g. redteam, benign)")
    messages: list[Message] = Field(min_length=1)


class JobRequest(Strict):
    """A generation job. Give prompts inline (`prompts`) or by name (`dataset`), not both."""

    kind: JobKind = Field(description="sft: phase 1 (critique -> revision); prefs: phase 2 (AI-judged pairs); "
                                      "judge-eval: judge agreement with human labels (`judge_eval` is accepted "
                                      "too)")
    constitution: str = Field("harmless", max_length=120,
                              description="NAME or NAME@VERSION of a constitution in the server's constitutions/")
    constitution_yaml: str | None = Field(None, description="an inline constitution (YAML text); overrides `constitution`")
    constitution_for: dict[str, str] | None = Field(
        None, max_length=16,
        description="prompt group -> NAME or NAME@VERSION of the constitution for that group's prompts (a group is "
                    "an inline prompt's `source`, a bundled set's name or a dataset's name without suffix); other "
                    "groups use `constitution`. sft also takes `none`: that group's answers are kept unrevised")
    prompts: list[str | InlinePrompt] | None = Field(
        None, description="inline prompts: strings or {messages: [...]} conversations (sft, prefs)")
    dataset: str | None = Field(
        None, max_length=300,
        description="a dataset name under the server's data root (a .jsonl file or a save_to_disk folder), "
                    "or a bundled set: redteam, benign. judge-eval: HH-RLHF pairs or multiple-choice JSONL")
    engine: str | None = Field(None, max_length=100, description="engine profile name (GET /v1/engines); "
                                                                 "default: the server's default profile")
    judge_engine: str | None = Field(None, max_length=100, description="prefs: judge profile; default: `engine`")
    limit: int | None = Field(None, ge=1, description="use the first N prompts (or evaluation items)")
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, description="prompts per engine call and per shard")
    max_tokens: int | None = Field(
        None, ge=1, description="shortcut: max new tokens of every generation step (sft: answer, critique and "
                                "revision; prefs: policy samples); overrides the values in phase1 / phase2")
    phase1: Phase1Config | None = Field(None, description="sft settings (rounds, seed, sampling per step)")
    phase2: Phase2Config | None = Field(None, description="prefs settings (samples, policy sampling, judge)")
    judge: JudgeConfig | None = Field(None, description="judge-eval settings (mode, orders, ...)")
    min_confidence: float = Field(0.0, ge=0.0, le=1.0, description="prefs: export only pairs this confident")
    require_consistent: bool = Field(True, description="prefs: export only pairs whose two orders agree")
    baseline: bool = Field(True, description="judge-eval: also run the one-order JSON-verdict baseline judge")
    seed: int = Field(0, description="judge-eval: which answer of an HH pair is shown as A")

    @model_validator(mode="before")
    @classmethod
    def _representable(cls, data: Any) -> Any:
        """422 naming the field for NaN / Infinity, lone surrogates and deep nesting, before any other
        check: the error does not echo the value (a JSON response cannot carry it)."""
        bad = first_bad_value(data)
        if bad is not None:
            loc, problem = bad
            error = PydanticCustomError("unrepresentable_value", "{problem}", {"problem": problem})
            raise ValidationError.from_exception_data(cls.__name__, [{"type": error, "loc": loc, "input": None}])
        return data


class JobCreated(BaseModel):
    id: str
    state: JobState


class Progress(BaseModel):
    total: int | None = Field(None, description="inputs to do in this run (set when the run starts)")
    done: int = Field(0, description="inputs finished in this run")
    resumed: int = Field(0, description="records already in the job directory when this run started")
    step: str | None = Field(None, description="the last engine step, e.g. 'critique (16 requests)'")


class ReviewCounts(BaseModel):
    agree: int = 0
    flip: int = 0
    discard: int = 0
    records_reviewed: int = 0
    agreement_rate: float | None = Field(
        None, description="agree / (agree + flip) over all reviews: how often reviewers side with the judge")


class JobStatus(BaseModel):
    id: str
    kind: JobKind
    state: JobState
    owner: str
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    progress: Progress
    records: int = Field(0, description="records in the job directory (error rows included)")
    errors: dict[str, int] = Field(default_factory=dict, description="error rows by code")
    tokens: int = Field(0, description="generated tokens of all records")
    tokens_per_second: float | None = Field(None, description="generated tokens per second of engine work")
    cancel_requested: bool = False
    message: str | None = Field(None, description="why the job failed, or what happened to it")
    files: list[str] = Field(default_factory=list, description="names for GET /v1/jobs/{id}/export?file=NAME")
    reviews: ReviewCounts = Field(default_factory=ReviewCounts)
    summary: dict[str, Any] | None = Field(None, description="the pipeline's summary once the job completed")
    request: dict[str, Any] = Field(default_factory=dict)


class JobList(BaseModel):
    jobs: list[JobStatus]


class Stratum(BaseModel):
    principle: str = Field(description="the judged pair's principle (prefs) or the first revision's (sft)")
    confidence: ConfidenceBin = Field(description="the judge confidence tertile (n/a: no judge, sft)")
    population: int = Field(description="rows of this stratum the sample was drawn from")
    drawn: int


class SampleInfo(BaseModel):
    strategy: SampleStrategy
    seed: int
    requested: int
    drawn: int
    population: int = Field(description="rows the sample was drawn from: not error rows, matching the filters")
    confidence_cuts: list[float] = Field(
        default_factory=list, description="judge confidence 2 |P(chosen) - 0.5| at the tertiles: below the "
                                          "first is low, below the second mid, the rest high")
    strata: list[Stratum] = Field(default_factory=list, description="principle x confidence tertile")


class RecordPage(BaseModel):
    total: int = Field(description="records matching the filters (a sample: the rows it was drawn from)")
    offset: int
    limit: int
    items: list[dict[str, Any]] = Field(
        description="stored records (cai.records.SFTRecord / PreferenceRecord, or judge-eval predictions), "
                    "each with `review` (the label in force) and, for prefs, `exported`")
    sample: SampleInfo | None = Field(None, description="how the records were drawn, when `sample` was asked")


class Agreement(BaseModel):
    principle: str | None = Field(description="the judged principle; null: all principles")
    agree: int = 0
    flip: int = 0
    n: int = Field(0, description="agree + flip (discarded rows are not counted)")
    rate: float | None = Field(None, description="agree / n")
    ci: Interval | None = Field(None, description="95% Wilson interval of `rate`")


class AgreementReport(BaseModel):
    overall: Agreement
    principles: list[Agreement] = Field(description="one per judged principle with a reviewed row, by name")
    discarded: int = Field(0, description="rows whose review in force is discard")


class ReviewRequest(Strict):
    record_id: str = Field(max_length=200)
    label: ReviewLabel = Field(description="agree: the judge is right; flip: the other answer is better "
                                           "(prefs: both make the exported pair a confident human label, "
                                           "score = margin = 1.0, the judge's verdict kept in "
                                           "metadata.judge_verdict); discard: drop the row from the export")
    reviewer: str | None = Field(None, max_length=100,
                                 description="deprecated: the reviewer is always the API key's name; a different "
                                             "name is refused (422)")
    note: str | None = Field(None, max_length=2000)


class Review(BaseModel):
    record_id: str
    label: ReviewLabel
    reviewer: str
    note: str | None = None
    created_at: str


class ReviewList(BaseModel):
    reviews: list[Review]
    counts: ReviewCounts


class PrincipleInfo(BaseModel):
    id: str
    critique_request: str
    revision_request: str
    comparison_question: str
    tags: list[str] = Field(default_factory=list)


class ConstitutionInfo(BaseModel):
    name: str
    version: str
    sha256: str
    description: str
    principles: int
    git_commit: str | None = None


class ConstitutionDetail(ConstitutionInfo):
    principles: list[PrincipleInfo]  # type: ignore[assignment]


class ConstitutionList(BaseModel):
    constitutions: list[ConstitutionInfo]


class EngineInfo(BaseModel):
    name: str
    backend: str
    model: str | None
    default: bool


class EngineList(BaseModel):
    engines: list[EngineInfo]


class DatasetList(BaseModel):
    datasets: list[str] = Field(description="names to pass as `dataset`")
