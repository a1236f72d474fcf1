"""`cai bench`: generated tokens/s of the bare engine, of phase 1 through cai, and of a
one-prompt-at-a-time loop, on the same prompts and model in one process.

- cai: `run_phase1` over all prompts (each step is one batched engine call).
- bare engine: the exact engine calls cai made (recorded), replayed straight into the
  engine, so the ratio is cai's own overhead.
- naive loop: what tutorial code does, answer -> critique -> revise for one prompt
  at a time; measured on the first `naive_prompts` prompts (tokens/s is a rate).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from pydantic import BaseModel

from cai.constitution import LoadedConstitution
from cai.critique import run_phase1
from cai.engine.base import ChoiceScores, Engine
from cai.recipe import Phase1Config
from cai.records import Chat, Completion, SamplingParams, SourcePrompt


class Throughput(BaseModel):
    prompts: int
    calls: int
    generated_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0


class BenchReport(BaseModel):
    model: str
    backend: str
    rounds: int
    max_tokens: int
    bare_engine: Throughput
    cai: Throughput
    naive_loop: Throughput
    naive_backend: str  # the naive loop runs on the same engine unless `cai bench --naive-engine` says otherwise

    @property
    def cai_vs_bare(self) -> float:
        return self.cai.tokens_per_second / self.bare_engine.tokens_per_second

    @property
    def cai_vs_naive(self) -> float:
        return self.cai.tokens_per_second / self.naive_loop.tokens_per_second


class RecordingEngine:
    """Passes calls through to an engine and keeps them, so they can be replayed."""

    def __init__(self, engine: Engine):
        self.inner = engine
        self.backend = engine.backend
        self.model = engine.model
        self.calls: list[tuple[list[Chat], SamplingParams]] = []

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Completion]:
        self.calls.append((list(chats), params))
        return self.inner.generate(chats, params)

    def choice_logprobs(self, chats, options, prefix: str = "") -> list[ChoiceScores]:
        return self.inner.choice_logprobs(chats, options, prefix)

    def close(self) -> None:
        self.inner.close()


def _timed_phase1(
    engine: Engine, sources: Sequence[SourcePrompt], constitution: LoadedConstitution, config: Phase1Config
) -> tuple[Throughput, RecordingEngine]:
    recorder = RecordingEngine(engine)
    started = time.perf_counter()
    records = run_phase1(sources, constitution, recorder, config)
    seconds = time.perf_counter() - started
    tokens = sum(r.generated_tokens for r in records)
    return Throughput(prompts=len(sources), calls=len(recorder.calls), generated_tokens=tokens, seconds=seconds), recorder


def _replay(engine: Engine, calls: list[tuple[list[Chat], SamplingParams]], prompts: int) -> Throughput:
    started = time.perf_counter()
    tokens = 0
    for chats, params in calls:
        tokens += sum(c.completion_tokens for c in engine.generate(chats, params))
    return Throughput(prompts=prompts, calls=len(calls), generated_tokens=tokens, seconds=time.perf_counter() - started)


def _naive(
    engine: Engine, sources: Sequence[SourcePrompt], constitution: LoadedConstitution, config: Phase1Config
) -> Throughput:
    started = time.perf_counter()
    tokens = calls = 0
    for source in sources:
        recorder = RecordingEngine(engine)
        [record] = run_phase1([source], constitution, recorder, config)
        tokens += record.generated_tokens
        calls += len(recorder.calls)
    return Throughput(prompts=len(sources), calls=calls, generated_tokens=tokens, seconds=time.perf_counter() - started)


def run_bench(
    engine: Engine,
    sources: Sequence[SourcePrompt],
    constitution: LoadedConstitution,
    config: Phase1Config,
    naive_prompts: int,
    naive_engine: Engine | None = None,
) -> BenchReport:
    """Warm up, then measure cai, the replayed bare engine, and the naive loop (on `naive_engine`
    if given: e.g. transformers' generate per prompt, as tutorial code does)."""
    engine.generate([sources[0].messages], SamplingParams(max_tokens=8))
    # The replay sends the same prompts again: without a reset, a prefix cache would make it look faster.
    cold = getattr(engine, "reset_prefix_cache", lambda: None)
    cold()
    cai, recorder = _timed_phase1(engine, sources, constitution, config)
    cold()
    bare = _replay(engine, recorder.calls, len(sources))
    cold()
    naive_engine = naive_engine or engine
    if naive_engine is not engine:
        naive_engine.generate([sources[0].messages], SamplingParams(max_tokens=8))
    naive = _naive(naive_engine, sources[:naive_prompts], constitution, config)
    return BenchReport(
        model=engine.model.id,
        backend=engine.backend,
        rounds=config.rounds,
        max_tokens=config.answer.max_tokens,
        bare_engine=bare,
        cai=cai,
        naive_loop=naive,
        naive_backend=naive_engine.backend,
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
    """Phase 1 on `sources` cut into batches of each size in turn (one `run_phase1` per batch, as a
    job's batch runner does), after one warm-up call: prompts/s should not depend on the batch size."""
    engine.generate([sources[0].messages], SamplingParams(max_tokens=8))
    runs = []
    for size in batch_sizes:
        recorder = RecordingEngine(engine)
        started = time.perf_counter()
        for start in range(0, len(sources), size):
            run_phase1(sources[start:start + size], constitution, recorder, config)
        seconds = time.perf_counter() - started
        runs.append(BatchSizeRun(batch_size=size, prompts=len(sources), calls=len(recorder.calls), seconds=seconds))
    return BatchSizeReport(model=engine.model.id, backend=engine.backend, rounds=config.rounds, runs=runs)
