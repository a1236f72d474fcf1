"""`cai bench`: generated tokens/s of phase 1 through cai against its engine's own limits, on the
same prompts and model in one process.

- cai: `run_phase1` over all prompts, in each schedule asked for (`continuous`: each prompt's next
  step as soon as its last one ends; `steps`: one batched engine call per step).
- bare engine: the step-batched run's requests, recorded and replayed straight into the engine step
  by step (each step's requests at once, the next when all are back), so cai (steps) ÷ bare is
  cai's own overhead.
- steady state: every request of that run at once, as independent requests (the engine at full
  occupancy on the same prompts and token budgets): the physical limit phase 1 approaches.
- naive loop: what tutorial code does, answer -> critique -> revise for one prompt at a time,
  measured on the first `naive_prompts` prompts (tokens/s is a rate).

Per step it reports how many requests ran and how many trajectories ended there with an error, so
a bench whose answers all hit their token budget (and so never reach the critique) shows it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from pydantic import BaseModel

from cai.constitution import LoadedConstitution
from cai.critique import run_phase1, step_names
from cai.engine.base import ChoiceScores, Engine
from cai.engine.common import derive_seed
from cai.engine.stream import open_stream
from cai.recipe import Phase1Config
from cai.records import Chat, Completion, SamplingParams, SFTRecord, SourcePrompt

BRIEF_SYSTEM_PROMPT = "You are a helpful assistant. Keep every reply short: at most three sentences."
"""The system turn of the CPU recipe: a small model's answers then end within their token budget."""
COMPLETION_GOAL = 0.8
"""A bench where fewer trajectories than this share complete measures mostly the first step."""


class Throughput(BaseModel):
    prompts: int
    calls: int  # engine calls (steps, replay) or requests (continuous, steady state)
    generated_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0


class StepCount(BaseModel):
    step: str
    requests: int
    ended_with_error: int  # trajectories whose last step this was, with an error (truncated, empty, ...)


class BenchReport(BaseModel):
    model: str
    backend: str
    config: Phase1Config
    steps: list[StepCount]
    completed: int  # trajectories with a final revision
    cai: dict[str, Throughput]  # by schedule
    bare_engine: Throughput
    steady_state: Throughput
    naive_loop: Throughput
    naive_backend: str  # the naive loop runs on the same engine unless `cai bench --naive-engine` says otherwise

    @property
    def completed_share(self) -> float:
        return self.completed / self.bare_engine.prompts if self.bare_engine.prompts else 0.0

    @property
    def best(self) -> Throughput:
        return self.cai.get(self.config.schedule) or next(iter(self.cai.values()))

    def ratios(self) -> dict[str, float]:
        out = {"cai_vs_bare": self.best.tokens_per_second / self.bare_engine.tokens_per_second,
               "cai_vs_steady_state": self.best.tokens_per_second / self.steady_state.tokens_per_second,
               "cai_vs_naive": self.best.tokens_per_second / self.naive_loop.tokens_per_second}
        if {"steps", "continuous"} <= set(self.cai):
            out["continuous_vs_steps"] = self.cai["continuous"].tokens_per_second / self.cai["steps"].tokens_per_second
        return out


Request = tuple[Chat, SamplingParams]  # one request with its own seed


class RecordingEngine:
    """Passes requests through to an engine's request stream and keeps them, in waves: the requests
    submitted between two moments when nothing was pending (step-batched phase 1: one wave per step),
    so they can be replayed with the same barriers or all at once."""

    def __init__(self, engine: Engine):
        self.wrapped = engine
        self.backend = engine.backend
        self.model = engine.model
        self.waves: list[list[Request]] = []

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Completion]:
        self.waves.append([(chat, params.model_copy(update={"seed": derive_seed(params.seed, i)}))
                           for i, chat in enumerate(chats)])
        return self.wrapped.generate(chats, params)

    def open_stream(self) -> _RecordingStream:
        return _RecordingStream(open_stream(self.wrapped), self.waves)

    def choice_logprobs(self, chats, options, prefix: str = "") -> list[ChoiceScores]:
        return self.wrapped.choice_logprobs(chats, options, prefix)

    def close(self) -> None:
        self.wrapped.close()


class _RecordingStream:
    def __init__(self, inner, waves: list[list[Request]]):
        self.inner, self.waves = inner, waves

    def submit(self, key, chat: Chat, params: SamplingParams) -> None:
        if not self.inner.pending:
            self.waves.append([])
        self.waves[-1].append((chat, params))
        self.inner.submit(key, chat, params)

    def wait(self):
        return self.inner.wait()

    def close(self) -> None:
        self.inner.close()


def step_counts(records: Sequence[SFTRecord], rounds: int) -> list[StepCount]:
    """Requests per step and the trajectories that ended at each with an error, from the records."""
    names = step_names(rounds)
    requests, ended = [0] * len(names), [0] * len(names)
    for record in records:
        for index in range(len(record.trajectory)):
            requests[index] += 1
        if record.error is not None and record.trajectory:
            ended[len(record.trajectory) - 1] += 1
    return [StepCount(step=n, requests=r, ended_with_error=e) for n, r, e in zip(names, requests, ended)]


def _timed(engine: Engine, sources, constitution, config: Phase1Config) -> tuple[Throughput, list[SFTRecord]]:
    started = time.perf_counter()
    records = run_phase1(sources, constitution, engine, config)
    seconds = time.perf_counter() - started
    waves = getattr(engine, "waves", None)
    count = len(waves) if waves is not None else sum(len(r.trajectory) for r in records)
    tokens = sum(r.generated_tokens for r in records)
    return Throughput(prompts=len(sources), calls=count, generated_tokens=tokens, seconds=seconds), records


def _run_waves(engine: Engine, waves: list[list[Request]], prompts: int, count_requests: bool = False) -> Throughput:
    """Each wave's requests submitted at once, the next wave only when all are back: with the step-batched
    run's waves, the engine's own speed with step barriers and no cai; with one wave of every request, its
    steady state."""
    started, tokens = time.perf_counter(), 0
    with open_stream(engine) as stream:
        for wave in waves:
            for key, (chat, params) in enumerate(wave):
                stream.submit(key, chat, params)
            while stream.pending:
                tokens += sum(c.completion_tokens for _, c in stream.wait())
    return Throughput(prompts=prompts, calls=sum(map(len, waves)) if count_requests else len(waves),
                      generated_tokens=tokens, seconds=time.perf_counter() - started)


def _naive(engine: Engine, sources: Sequence[SourcePrompt], constitution, config: Phase1Config) -> Throughput:
    started = time.perf_counter()
    tokens = calls = 0
    for source in sources:
        recorder = RecordingEngine(engine)
        [record] = run_phase1([source], constitution, recorder, config.model_copy(update={"schedule": "steps"}))
        tokens += record.generated_tokens
        calls += len(recorder.waves)
    return Throughput(prompts=len(sources), calls=calls, generated_tokens=tokens, seconds=time.perf_counter() - started)


def run_bench(
    engine: Engine,
    sources: Sequence[SourcePrompt],
    constitution: LoadedConstitution,
    config: Phase1Config,
    naive_prompts: int,
    naive_engine: Engine | None = None,
    schedules: Sequence[str] = ("steps", "continuous"),
) -> BenchReport:
    """Warm up, then measure cai in each schedule, the replayed bare engine, the steady state and the
    naive loop (on `naive_engine` if given: e.g. transformers' generate per prompt, as tutorial code does)."""
    engine.generate([sources[0].messages], SamplingParams(max_tokens=8))
    # Replays send the same prompts again: without a reset, a prefix cache would make them look faster.
    cold = getattr(engine, "reset_prefix_cache", lambda: None)
    recorder = RecordingEngine(engine)
    cold()
    cai = {"steps": _timed(recorder, sources, constitution, config.model_copy(update={"schedule": "steps"}))}
    for schedule in [s for s in schedules if s != "steps"]:
        cold()
        cai[schedule] = _timed(engine, sources, constitution, config.model_copy(update={"schedule": schedule}))
    records = cai["steps"][1]
    cold()
    bare = _run_waves(engine, recorder.waves, len(sources))
    cold()
    steady = _run_waves(engine, [[request for wave in recorder.waves for request in wave]], len(sources), True)
    cold()
    naive_engine = naive_engine or engine
    if naive_engine is not engine:
        naive_engine.generate([sources[0].messages], SamplingParams(max_tokens=8))
    naive = _naive(naive_engine, sources[:naive_prompts], constitution, config)
    return BenchReport(
        model=engine.model.id, backend=engine.backend, config=config,
        steps=step_counts(records, config.rounds), completed=sum(r.final is not None for r in records),
        cai={s: t for s, (t, _) in cai.items() if s in schedules}, bare_engine=bare, steady_state=steady,
        naive_loop=naive, naive_backend=naive_engine.backend,
    )


class BatchSizeRun(BaseModel):
    batch_size: int
    prompts: int
    calls: int
    seconds: float  # generation: the phase-1 calls of every batch, as a job counts them

    @property
    def prompts_per_second(self) -> float:
        return self.prompts / self.seconds if self.seconds else 0.0


class BatchSizeReport(BaseModel):
    model: str
    backend: str
    rounds: int
    runs: list[BatchSizeRun]

    @property
    def slowest_vs_fastest(self) -> float:
        """The slowest run's prompts/s over the fastest's: 1.0 when the batch size does not matter."""
        rates = [r.prompts_per_second for r in self.runs]
        return min(rates) / max(rates) if rates and max(rates) else 0.0


def cycled(sources: Sequence[SourcePrompt], count: int) -> list[SourcePrompt]:
    """`count` prompts: `sources` repeated as often as needed, each repeat with its own id."""
    out = list(sources[:count])
    while len(out) < count:
        repeat, source = divmod(len(out), len(sources))
        out.append(sources[source].model_copy(update={"id": f"{sources[source].id}~{repeat}"}))
    return out


def run_batch_size_bench(
    engine: Engine,
    sources: Sequence[SourcePrompt],
    constitution: LoadedConstitution,
    config: Phase1Config,
    batch_sizes: Sequence[int],
) -> BatchSizeReport:
    """Phase 1 on `sources` cut into batches of each size in turn (one `run_phase1` per batch, in the
    config's schedule, as a job's batch runner does), after one warm-up call: prompts/s should not
    depend on the batch size. `calls` counts engine calls step-batched, requests when continuous."""
    engine.generate([sources[0].messages], SamplingParams(max_tokens=8))
    runs = []
    for size in batch_sizes:
        calls, started = 0, time.perf_counter()
        for start in range(0, len(sources), size):
            calls += _timed(engine if config.schedule == "continuous" else RecordingEngine(engine),
                            sources[start:start + size], constitution, config)[0].calls
        seconds = time.perf_counter() - started
        runs.append(BatchSizeRun(batch_size=size, prompts=len(sources), calls=calls, seconds=seconds))
    return BatchSizeReport(model=engine.model.id, backend=engine.backend, rounds=config.rounds, runs=runs)
