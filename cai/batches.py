"""The batch runner every job kind uses: plan -> execute -> commit.

- plan (`BatchPlan`): stream the inputs, merge duplicates, skip ids the store has finished, and cut
  the rest into batches with stable ids (plan position + digest of their input ids);
- execute: an executor (cai.executor; `LocalExecutor` by default) turns batches into records;
- commit (`Committer`, on the driver): one shard per batch, named by its id (a batch committed
  twice is written once), and a typed progress event (cai.events) per batch.

Stop, cancel and dead-engine semantics live here, whatever the executor.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from itertools import chain, islice
from typing import NoReturn, Protocol, TypeVar

from pydantic import BaseModel

from cai.engine.base import StopRequested
from cai.events import BatchCancelled, BatchCommitted, Planned, ProgressHook
from cai.executor import Batch, Executor, LocalExecutor, StopCheck
from cai.records import ErrorCode, ErrorInfo
from cai.store import IdSet, JobStore

T = TypeVar("T")


class JobRecord(Protocol):
    """What the batch runner needs of a stage's record (SFTRecord, PreferenceRecord, ...)."""

    id: str
    error: ErrorInfo | None

    @property
    def generated_tokens(self) -> int: ...

    def model_dump_json(self) -> str: ...


class EngineDown(RuntimeError):
    """Every request of a batch failed for the backend: the job stops instead of writing error rows."""


class JobCancelled(RuntimeError):
    """`stop()` said so between two batches, or inside one (an engine or judge retry loop raised
    StopRequested): finished batches are kept, the batches in flight and every input not started
    got a `cancelled` error row (`written` of them), and a rerun drops those rows and resumes."""

    def __init__(self, message: str, done: int = 0, written: int = 0):
        super().__init__(message)
        self.done, self.written = done, written


CancelledRows = Callable[[list[T], str], Sequence[JobRecord]]
"""(inputs not started, reason) -> their `cancelled` error rows."""


class BatchRun(BaseModel):
    done_before: int = 0
    done_now: int = 0
    duplicates: int = 0
    generated_tokens: int = 0
    generation_seconds: float = 0.0


def _unique(
    items: Iterable[T], key: Callable[[T], str], run: BatchRun | None = None,
    dedupe_key: Callable[[T], str] | None = None,
) -> Iterator[tuple[str, T]]:
    """(id, item) for each first occurrence; duplicates are merged and counted.

    Duplicates share an id (exact) or, with `dedupe_key`, a looser key (near-duplicates).
    """
    seen = IdSet()
    for item in items:
        item_id = key(item)
        dup_key = dedupe_key(item) if dedupe_key else item_id
        if dup_key in seen:
            if run is not None:
                run.duplicates += 1
            continue
        seen.add(dup_key)
        yield item_id, item


class BatchPlan:
    """The inputs of a stage still to do, as batches in plan order.

    Reading the store's finished ids drops the rows whose error code is in `redo` first (they
    are done again). `items` is called once per pass (counting, then batching), so nothing holds
    the whole input in memory. Batch positions continue after the stage's existing shards."""

    def __init__(self, store: JobStore, stage: str, items: Callable[[], Iterable[T]], key: Callable[[T], str],
                 batch_size: int, row_key: Callable[[dict], str] = lambda row: row["id"],
                 dedupe_key: Callable[[T], str] | None = None, redo: Collection[str] = ()):
        self.store, self.stage, self.items, self.key = store, stage, items, key
        self.batch_size, self.dedupe_key = batch_size, dedupe_key
        self.done = store.done_ids(stage, row_key, redo=set(redo))
        self.run = BatchRun(done_before=len(self.done))

    def total(self) -> int:
        """Inputs to do in this run (a counting pass over the inputs)."""
        return sum(1 for i, _ in _unique(self.items(), self.key, None, self.dedupe_key) if i not in self.done)

    def batches(self) -> Iterator[Batch[T]]:
        todo = ((i, item) for i, item in _unique(self.items(), self.key, self.run, self.dedupe_key)
                if i not in self.done)
        seq = self.store.next_batch_seq(self.stage)
        while chunk := list(islice(todo, self.batch_size)):
            yield Batch(self.stage, seq, tuple(i for i, _ in chunk), tuple(item for _, item in chunk))
            seq += 1


class Committer:
    """On the driver: writes each batch's shard (once per batch id) and reports it as an event."""

    def __init__(self, store: JobStore, stage: str, progress: ProgressHook | None = None):
        self.store, self.stage, self.progress = store, stage, progress

    def commit(self, batch: Batch, records: Sequence[JobRecord], seconds: float = 0.0) -> bool:
        """Write the batch's records; False (and nothing written) when the batch was committed before."""
        if self.store.commit(self.stage, batch.id, records) is None:
            return False
        if self.progress:
            errors = Counter(r.error.code.value for r in records if r.error is not None)
            self.progress(BatchCommitted(stage=self.stage, batch_id=batch.id, rows=len(records), errors=dict(errors),
                                         generated_tokens=sum(r.generated_tokens for r in records), seconds=seconds))
        return True

    def cancel(self, batches: Iterable[Batch], cancelled: CancelledRows, reason: str) -> int:
        """Write `cancelled` rows for every input of `batches`; how many."""
        written = 0
        for batch in batches:
            if self.store.commit(self.stage, batch.id, cancelled(list(batch.items), reason)) is not None:
                written += len(batch)
                if self.progress:
                    self.progress(BatchCancelled(stage=self.stage, batch_id=batch.id, rows=len(batch)))
        return written


def run_batches(
    store: JobStore, stage: str, items: Callable[[], Iterable[T]], key: Callable[[T], str],
    process: Callable[[list[T]], Sequence[JobRecord]], batch_size: int, progress: ProgressHook | None = None,
    setup: Callable[[], None] | None = None, row_key: Callable[[dict], str] = lambda row: row["id"],
    stop: StopCheck | None = None, dedupe_key: Callable[[T], str] | None = None,
    cancelled: CancelledRows | None = None, redo: Collection[str] = (ErrorCode.CANCELLED.value,),
    engine_down: Callable[[Sequence[JobRecord]], bool] | None = None, executor: Executor | None = None,
) -> BatchRun:
    """Plan the stage's batches, execute them (`executor`, LocalExecutor by default), commit each.

    `setup` (e.g. starting the engine) runs once, untimed, only if there is work. A batch whose
    every row is BACKEND_UNAVAILABLE raises EngineDown and is not written, so a rerun does it
    again. When `stop()` turns true, checked as each batch is taken, or a retry or request loop
    inside `process` raises StopRequested (`stop` is the current stop check while a batch runs),
    the batches in flight and every input not started are written as `cancelled` rows (each
    input ends as one row) and JobCancelled is raised. Rows with an error code in `redo` (by
    default `cancelled` ones) are dropped first and done again. `progress` receives Planned once,
    then BatchCommitted / BatchCancelled per batch.
    """
    plan = BatchPlan(store, stage, items, key, batch_size, row_key, dedupe_key, redo)
    run = plan.run
    if progress:
        progress(Planned(stage=stage, total=plan.total(), done_before=run.done_before))
    committer, planned = Committer(store, stage, progress), plan.batches()
    taken: dict[str, Batch] = {}  # handed to the executor, not committed yet
    stopped: list[Batch] = []

    def feed() -> Iterator[Batch]:
        nonlocal setup
        for batch in planned:
            if stop is not None and stop():
                stopped.append(batch)
                return
            if setup is not None:
                setup()
                setup = None
            taken[batch.id] = batch
            yield batch

    try:
        for batch, records, seconds in (executor or LocalExecutor()).execute(feed(), process, stop):
            run.generation_seconds += seconds
            if (engine_down or _all_backend_unavailable)(records):
                raise EngineDown(f"every request of a batch failed: {records[0].error.message}")
            if committer.commit(batch, records, seconds):
                run.done_now += len(records)
                run.generated_tokens += sum(r.generated_tokens for r in records)
            taken.pop(batch.id, None)
    except StopRequested:
        pass
    else:
        if not stopped:
            return run
    rest = chain(sorted(taken.values(), key=lambda b: b.seq), stopped, planned)
    _cancel(committer, rest, run, cancelled)


def _all_backend_unavailable(records: Sequence[JobRecord]) -> bool:
    return {r.error.code if r.error else None for r in records} == {ErrorCode.BACKEND_UNAVAILABLE}


def _cancel(committer: Committer, rest: Iterable[Batch], run: BatchRun, cancelled: CancelledRows | None) -> NoReturn:
    reason = f"job cancelled after {run.done_now} rows of this run; rerun the job to generate this input"
    written = committer.cancel(rest, cancelled, reason) if cancelled is not None else 0
    raise JobCancelled(f"cancelled after {run.done_now} rows; {written} inputs not started were written "
                       "as `cancelled` error rows; rerun the job to resume", run.done_now, written)
