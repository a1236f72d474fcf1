"""Typed job settings shared by the CLI, the service and notebooks."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cai.records import JUDGE_MODES, LABELLERS, SamplingParams

DEFAULT_BATCH_SIZE = 256
"""Prompts per engine call and per shard, for every job kind (CLI, service, recipes, notebooks)."""


class EngineSpec(BaseModel):
    """Which backend and model answer. `model=None` is the embedded SmolLM2-135M-Instruct."""

    model_config = ConfigDict(extra="forbid")
    backend: str = "auto"
    model: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)


EXECUTOR_HELP = "where the batches run (local, or Ray actors); not part of the job's fingerprint"


class ExecutorConfig(BaseModel):
    """Where a job's batches run. Not part of a job's fingerprint: the records are the same either way."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["local", "ray"] = Field(
        "local", description="local: in this process; ray: a pool of Ray actors, each holding one engine "
        "(pip install 'cai[ray]')")
    address: str | None = Field(
        None, description="ray: the cluster to join (`auto`: the one `ray start` runs on this machine; "
        "ray://HOST:10001 or HOST:6379); none: start a Ray instance in this process")
    replicas: int = Field(1, ge=1, description="ray: engine replicas (actors), each with its own engine")
    gpus_per_replica: float = Field(0.0, ge=0.0, description="ray: GPUs each replica reserves (e.g. 1 for vLLM)")
    cpus_per_replica: float = Field(1.0, ge=0.0, description="ray: CPUs each replica reserves")
    max_in_flight: int | None = Field(
        None, ge=1, description="ray: batches submitted at once (default: one per replica); finished results "
        "waiting for the driver are bounded by it too")


SYSTEM_PROMPT_HELP = (
    "system turn put before every request of the stage (not into the exported prompts, so the trained "
    "model learns the behaviour without it); a prompt with its own system turn keeps that"
)


class Phase1Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rounds: int = Field(2, ge=1)
    system_prompt: str | None = Field(None, description=SYSTEM_PROMPT_HELP)
    seed: int = 0
    answer: SamplingParams = SamplingParams(max_tokens=256)
    critique: SamplingParams = SamplingParams(max_tokens=192)
    revision: SamplingParams = SamplingParams(max_tokens=256)
    schedule: Literal["steps", "continuous"] = Field(
        "steps", description="steps: every request of a step together, then the next step; continuous: each "
        "prompt's next step is sent as soon as its previous one is back. The same records either way.")


class JudgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # clamp, min_option_mass: finite
    # A mode that writes text caps it with its field `<mode>_max_tokens`; one without scores one token.
    MAX_TOKENS_SUFFIX: ClassVar[str] = "_max_tokens"
    # Modes whose P(first shown preferred) is clamped to `clamp`: reasoning makes a judge overconfident.
    CLAMPED_MODES: ClassVar[frozenset[str]] = frozenset({"cot"})
    mode: Literal[JUDGE_MODES] = "logprob"
    orders: Literal[1, 2] = 2
    clamp: tuple[float, float] = (0.05, 0.95)
    cot_max_tokens: int = Field(256, ge=1)
    structured_max_tokens: int = Field(192, ge=1)
    structured_retries: int = Field(2, ge=0)
    fallback_structured: bool = True
    min_option_mass: float = Field(
        0.5, ge=0.0, le=1.0,
        description="logprob/cot: an order whose P(A) + P(B) is below this is an off_options error "
        "row, not a label normalised from noise (0 disables)",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _clamp_band(self) -> JudgeConfig:
        low, high = self.clamp
        if not 0.0 <= low < 0.5 < high <= 1.0:
            raise ValueError("clamp must be (low, high) with 0 <= low < 0.5 < high <= 1")
        return self

    def generation(self, mode: str | None = None) -> SamplingParams:
        """Sampling settings of the judge's own text in `mode` (default: its mode), greedy: at most
        `<mode>_max_tokens` tokens, or one scored token for a mode without that field (logprob)."""
        mode = mode or self.mode
        if mode not in JUDGE_MODES:
            raise KeyError(mode)
        tokens = getattr(self, f"{mode}{self.MAX_TOKENS_SUFFIX}", 1)
        return SamplingParams(max_tokens=tokens, temperature=0.0, seed=self.seed)

    def max_token_settings(self) -> dict[str, int]:
        """Field name -> value of every mode's cap on the judge's own text (`cot_max_tokens`, ...)."""
        return {name: getattr(self, name) for name in type(self).model_fields if name.endswith(self.MAX_TOKENS_SUFFIX)}

    @property
    def labels_clamped(self) -> bool:
        """Whether this judge's labels are clamped to `clamp` (its mode is in CLAMPED_MODES)."""
        return self.mode in self.CLAMPED_MODES

    def confidence_ceiling(self) -> float | None:
        """The highest confidence a clamped judge's label can have; None when labels are not clamped.
        Two orders average p_first and 1 - p_first: the clamp's edges give confidence high - low."""
        if not self.labels_clamped:
            return None
        low, high = self.clamp
        return high - low if self.orders == 2 else max(2 * high - 1, 1 - 2 * low)


class Phase2Config(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: int = Field(2, ge=2, description="K answers sampled per prompt")
    system_prompt: str | None = Field(None, description=SYSTEM_PROMPT_HELP)
    policy: SamplingParams = SamplingParams(temperature=0.8, max_tokens=192)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    pairing: Literal["best_worst", "all"] = "best_worst"
    labeller: Literal[LABELLERS] = Field(
        "judge", description="judge: the judge labels pairs of K sampled answers; contrastive: one pair per "
        "prompt, the policy steered toward and away from a sampled principle (its `directions`), labelled by "
        "construction (RLCD); both: contrastive pairs, also scored by the judge (the data card reports how "
        "often it agrees with the construction)")
    seed: int = 0

    @model_validator(mode="after")
    def _one_contrastive_pair(self) -> Phase2Config:
        if self.labeller != "judge" and self.samples != 2:
            raise ValueError(f"labeller {self.labeller!r} makes one pair per prompt (an answer steered toward "
                             f"the principle and one steered away): samples must be 2, not {self.samples}")
        return self

    @field_validator("policy")
    @classmethod
    def _sampled(cls, params: SamplingParams) -> SamplingParams:
        if params.temperature <= 0:
            raise ValueError("policy sampling needs temperature > 0, or the K answers are identical")
        return params


UPDATE_FROM_HELP = (
    "an earlier job directory with the same prompts, model(s) and settings but its constitution: rows whose "
    "principles the new constitution draws and words the same are carried over, the others generated again "
    "(cai.job_update)")
PRICE_HELP = ("list prices in dollars per million input and output tokens, for the data card's cost estimate; "
              "not part of the job's fingerprint")
Price = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


GROUPS_HELP = ("prompt group -> constitution for that group's prompts (a group is a bundled set's name, a file's "
               "name without suffix, or a row's `source` field); other groups use `constitution`")


class SFTJob(BaseModel):
    """Phase 1: a constitution and prompts in, a job directory with an SFT dataset out."""

    model_config = ConfigDict(extra="forbid")
    constitution: str
    constitution_by_group: dict[str, str] = Field(
        default_factory=dict, description=GROUPS_HELP + '; "none" keeps that group\'s answers unrevised')
    prompts: str = "redteam"
    out: str
    engine: EngineSpec = Field(default_factory=EngineSpec)
    phase1: Phase1Config = Field(default_factory=Phase1Config)
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, description="prompts per engine call and per shard")
    parquet: bool = Field(True, description="also export Parquet (JSONL is always written)")
    drop_near_duplicates: bool = Field(
        False, description="also merge prompts that differ only in case, punctuation or spacing"
    )
    new_job: bool = False
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig, description=EXECUTOR_HELP)
    update_from: str | None = Field(None, description=UPDATE_FROM_HELP)
    price_per_mtok: tuple[Price, Price] | None = Field(None, description=PRICE_HELP)


class PrefsJob(BaseModel):
    """Phase 2: K sampled answers per prompt from the policy, judged pairwise under sampled principles."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    constitution: str
    constitution_by_group: dict[str, str] = Field(default_factory=dict, description=GROUPS_HELP)
    prompts: str = "redteam"
    out: str
    policy: EngineSpec = Field(default_factory=EngineSpec)
    judge: EngineSpec | None = Field(None, description="None: the policy's engine judges too")
    phase2: Phase2Config = Field(default_factory=Phase2Config)
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, description="prompts per engine call and per shard")
    min_confidence: float = Field(0.0, ge=0.0, le=1.0, description="export only pairs at least this confident")
    require_consistent: bool = Field(True, description="export only pairs whose two orders agree")
    parquet: bool = True
    drop_near_duplicates: bool = Field(
        False, description="also merge prompts that differ only in case, punctuation or spacing"
    )
    new_job: bool = False
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig, description=EXECUTOR_HELP)
    update_from: str | None = Field(None, description=UPDATE_FROM_HELP)
    price_per_mtok: tuple[Price, Price] | None = Field(None, description=PRICE_HELP)

    @model_validator(mode="after")
    def _exportable(self) -> PrefsJob:
        """A CoT judge's labels are clamped: a confidence floor at or above the clamp's ceiling exports nothing."""
        judge = self.phase2.judge
        ceiling = judge.confidence_ceiling()
        if ceiling is not None and self.min_confidence >= ceiling - 1e-9:
            raise ValueError(
                f"min_confidence {self.min_confidence} excludes every CoT pair: the clamp {list(judge.clamp)}"
                f" caps confidence at {ceiling:.2f}; lower --min-confidence or widen the clamp")
        return self
