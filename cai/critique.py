"""Phase 1 (SL-CAI): answer, then N rounds of critique -> revise, for a batch of prompts at once.

Two schedules (`Phase1Config.schedule`), the same records: `steps` sends every request of a step
together and waits for all of them (all answers, then all critiques of round 1, ...);
`continuous` sends each prompt's next request as soon as its previous one is back, so the engine
never idles on the slowest request of a step. Each request's seed comes from its prompt's place in
the batch, not from the order requests finish (cai.engine.stream). A failed, empty or
truncated answer or revision ends that prompt's trajectory as an error row
carrying the raw text; the other prompts carry on. A truncated *critique* is
context, not a result: the revision still runs on it (the step keeps
finish_reason "length", and the data card counts such critiques per principle).

Each prompt uses its group's constitution (`ConstitutionPlan`); a group mapped to
`none` keeps its answer unrevised.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cai import __version__
from cai.constitution import LoadedConstitution, sample_principle
from cai.constitution_plan import ConstitutionPlan
from cai.engine.base import Engine
from cai.engine.common import derive_seed
from cai.engine.stream import CheckedStream, open_stream
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
"""Called as requests come back with (step name, number of them): once per step when step-batched,
once per step and group of finished requests when continuous."""


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


def _append_step(traj: _Trajectory, kind: str, completion: Completion, principle_id: str | None) -> None:
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


def step_names(rounds: int) -> list[str]:
    """The steps of a trajectory in order: answer, critique 1, revision 1, critique 2, ..."""
    return ["answer", *(f"{kind} {rnd}" for rnd in range(1, rounds + 1) for kind in ("critique", "revision"))]


def _next_request(traj: _Trajectory, position: int, step: int, config: Phase1Config) -> tuple[Chat, SamplingParams] | None:
    """The request for step number `step` of the trajectory at `position` in its batch (see step_names),
    or None when the trajectory has ended. A critique samples its round's principle here."""
    if traj.error is not None or step > 2 * config.rounds or (step and traj.constitution is None):
        return None
    if step == 0:
        chat, params = answer_chat(traj.source.messages), config.answer
    elif step % 2:
        principle = sample_principle(traj.constitution.constitution, config.seed, phase1_id(traj.source),
                                     (step + 1) // 2)
        traj.principles.append(principle.id)
        chat, params = critique_chat(traj.source.messages, traj.last_answer, principle), config.critique
    else:
        principle = traj.constitution.constitution.principle(traj.principles[-1])
        chat = revision_chat(traj.source.messages, traj.last_answer, principle, traj.steps[-1].text)
        params = config.revision
    # The request's own seed, from its trajectory's place in the batch: the same whatever ran beside it.
    return with_system(chat, config.system_prompt), params.model_copy(update={"seed": derive_seed(params.seed, position)})


def _kind(step: int) -> str:
    return "answer" if step == 0 else "critique" if step % 2 else "revision"


def _run_steps(trajectories: list[_Trajectory], stream: CheckedStream, config: Phase1Config,
               on_step: StepHook | None) -> None:
    """Step-batched: every request of a step, then wait for all of them, then the next step."""
    for step, name in enumerate(step_names(config.rounds)):
        count = 0
        for position, traj in enumerate(trajectories):
            request = _next_request(traj, position, step, config)
            if request is not None:
                stream.submit(position, *request)
                count += 1
        while stream.pending:
            for position, completion in stream.wait():
                traj = trajectories[position]
                _append_step(traj, _kind(step), completion, traj.principles[-1] if step else None)
        if count and on_step:
            on_step(name, count)


def _run_continuous(trajectories: list[_Trajectory], stream: CheckedStream, config: Phase1Config,
                    on_step: StepHook | None) -> None:
    """Trajectory-level continuous batching: each trajectory's next request goes in as soon as its
    previous one is back, so the engine's batch stays full through the tail of every step."""
    names = step_names(config.rounds)
    at_step = [0] * len(trajectories)
    for position, traj in enumerate(trajectories):
        stream.submit(position, *_next_request(traj, position, 0, config))
    while stream.pending:
        finished = Counter()
        for position, completion in stream.wait():
            traj, step = trajectories[position], at_step[position]
            _append_step(traj, _kind(step), completion, traj.principles[-1] if step else None)
            finished[step] += 1
            at_step[position] = step + 1
            request = _next_request(traj, position, step + 1, config)
            if request is not None:
                stream.submit(position, *request)
        for step in sorted(finished) if on_step else ():
            on_step(names[step], finished[step])


def run_phase1(
    sources: Sequence[SourcePrompt],
    constitution: LoadedConstitution | ConstitutionPlan,
    engine: Engine,
    config: Phase1Config,
    on_step: StepHook | None = None,
) -> list[SFTRecord]:
    """Run the critique-then-revise loop for a batch of prompts; one record per prompt, the same
    records under either schedule (`config.schedule`) for an engine whose answers depend only on the
    request and its seed."""
    plan = ConstitutionPlan.of(constitution)
    trajectories = [_Trajectory(source=s, constitution=plan.for_group(s.group)) for s in sources]
    run = _run_continuous if config.schedule == "continuous" else _run_steps
    with open_stream(engine) as stream:
        run(trajectories, stream, config, on_step)
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
