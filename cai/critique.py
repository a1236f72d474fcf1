"""Phase 1 (SL-CAI): answer, then N rounds of critique -> revise, batched per step.

Every step of a batch goes to the engine as one call (all answers, then all
critiques of round 1, then all revisions of round 1, ...). A failed, empty or
truncated answer or revision ends that prompt's trajectory as an error row
carrying the raw text; the other prompts carry on. A truncated *critique* is
context, not a result: the revision still runs on it (the step keeps
finish_reason "length", and the data card counts such critiques per principle).

Each prompt uses its group's constitution (`ConstitutionPlan`); a group mapped to
`none` keeps its answer unrevised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cai import __version__
from cai.constitution import LoadedConstitution, Principle, sample_principle
from cai.constitution_plan import ConstitutionPlan
from cai.engine.base import Engine
from cai.prompts import (
    PHASE1_TEMPLATE_HASH,
    answer_chat,
    critique_chat,
    revision_chat,
    with_system,
)
from cai.recipe import Phase1Config
from cai.records import (
    Chat,
    Completion,
    ErrorCode,
    ErrorInfo,
    Lineage,
    ModelRef,
    SamplingParams,
    SFTRecord,
    SourcePrompt,
    Step,
    stable_id,
)

StepHook = Callable[[str, int], None]
"""Called after each engine step with (step name, number of requests)."""


@dataclass
class _Trajectory:
    source: SourcePrompt
    constitution: LoadedConstitution | None
    steps: list[Step] = field(default_factory=list)
    principles: list[str] = field(default_factory=list)
    error: ErrorInfo | None = None

    @property
    def last_answer(self) -> str:
        return next(s.text for s in reversed(self.steps) if s.kind != "critique")


def step_error(completion: Completion) -> ErrorInfo | None:
    """The error a completion represents, if any: backend failure, truncation or empty text."""
    if completion.error is not None:
        return completion.error
    if completion.finish_reason == "length":
        return ErrorInfo(
            code=ErrorCode.TRUNCATED,
            message="hit max_tokens before the end of the reply; raise max_tokens to keep such rows",
            raw=completion.text,
        )
    if not completion.text.strip():
        return ErrorInfo(code=ErrorCode.EMPTY, message="the model returned no text", raw=completion.text)
    return None


def phase1_id(source: SourcePrompt) -> str:
    return stable_id("sft", [m.model_dump() for m in source.messages])


def _run_step(
    engine: Engine,
    trajectories: Sequence[_Trajectory],
    kind: str,
    chats: list[Chat],
    params: SamplingParams,
    principle_ids: list[str | None],
) -> None:
    completions = engine.generate(chats, params)
    for traj, completion, principle_id in zip(trajectories, completions, principle_ids):
        traj.steps.append(
            Step(
                kind=kind,
                principle_id=principle_id,
                text=completion.text.strip(),
                finish_reason=completion.finish_reason,
                prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens,
            )
        )
        traj.error = step_error(completion)
        if kind == "critique" and traj.error is not None and traj.error.code == ErrorCode.TRUNCATED and \
                completion.text.strip():
            traj.error = None  # context for the revision, not a result: see the module docstring


def run_phase1(
    sources: Sequence[SourcePrompt],
    constitution: LoadedConstitution | ConstitutionPlan,
    engine: Engine,
    config: Phase1Config,
    on_step: StepHook | None = None,
) -> list[SFTRecord]:
    """Run the critique-then-revise loop for a batch of prompts; one record per prompt."""
    plan = ConstitutionPlan.of(constitution)
    trajectories = [_Trajectory(source=s, constitution=plan.for_group(s.group)) for s in sources]

    def step(name: str, kind: str, chats_of: Callable[[_Trajectory], Chat], params: SamplingParams):
        active = [t for t in trajectories if t.error is None and (kind == "answer" or t.constitution)]
        if active:
            principle_ids = [t.principles[-1] if kind != "answer" else None for t in active]
            chats = [with_system(chats_of(t), config.system_prompt) for t in active]
            _run_step(engine, active, kind, chats, params, principle_ids)
            if on_step:
                on_step(name, len(active))

    step("answer", "answer", lambda t: answer_chat(t.source.messages), config.answer)
    for rnd in range(1, config.rounds + 1):
        chosen: dict[int, Principle] = {}
        for t in trajectories:
            if t.error is None and t.constitution is not None:
                chosen[id(t)] = sample_principle(t.constitution.constitution, config.seed, phase1_id(t.source), rnd)
                t.principles.append(chosen[id(t)].id)
        step(
            f"critique {rnd}",
            "critique",
            lambda t: critique_chat(t.source.messages, t.last_answer, chosen[id(t)]),
            config.critique,
        )
        step(
            f"revision {rnd}",
            "revision",
            lambda t: revision_chat(t.source.messages, t.last_answer, chosen[id(t)], t.steps[-1].text),
            config.revision,
        )
    return [_to_record(t, engine.model, config) for t in trajectories]


def cancelled_records(
    sources: Sequence[SourcePrompt], constitution: LoadedConstitution | ConstitutionPlan, model: ModelRef,
    config: Phase1Config, reason: str,
) -> list[SFTRecord]:
    """A `cancelled` error row for each prompt a stopped job never started."""
    plan = ConstitutionPlan.of(constitution)
    error = ErrorInfo(code=ErrorCode.CANCELLED, message=reason)
    return [_to_record(_Trajectory(source=s, constitution=plan.for_group(s.group), error=error), model, config)
            for s in sources]


def _to_record(traj: _Trajectory, model: ModelRef, config: Phase1Config) -> SFTRecord:
    lineage = Lineage(
        constitution=traj.constitution.ref if traj.constitution else None,
        prompt_group=traj.source.group or None,
        principle_ids=traj.principles,
        model=model,
        sampling={"answer": config.answer, "critique": config.critique, "revision": config.revision},
        seed=config.seed,
        template_hash=PHASE1_TEMPLATE_HASH,
        cai_version=__version__,
    )
    return SFTRecord(
        id=phase1_id(traj.source),
        parent_ids=[traj.source.id],
        prompt=traj.source.messages,
        trajectory=traj.steps,
        final=None if traj.error else traj.last_answer,
        lineage=lineage,
        error=traj.error,
    )
