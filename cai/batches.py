"""The batch runner every job kind uses: stream inputs in batches, skip finished ids, process,
append one shard per batch; stop, cancel and dead-engine semantics live here."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import Protocol, TypeVar

from pydantic import BaseModel

from cai.engine.base import StopRequested, stop_scope
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


ProgressHook = Callable[[str, int], None]
"""(event, count): "total" once with the number of prompts to do, "done" per finished prompt,
and "step <name>" per engine call."""


class EngineDown(RuntimeError):
    """Every request of a batch failed for the backend: the job stops instead of writing error rows."""


class JobCancelled(RuntimeError):
    """`stop()` said so between two batches, or inside one (an engine or judge retry loop raised
    StopRequested): finished batches are kept, the batch in flight and every input not started
    got a `cancelled` error row (`written` of them), and a rerun drops those rows and resumes."""

    def __init__(self, message: str, done: int = 0, written: int = 0):
        super().__init__(message)
        self.done, self.written = done, written


StopCheck = Callable[[], bool]
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


def run_batches(
    store: JobStore,
    stage: str,
    items: Callable[[], Iterable[T]],
    key: Callable[[T], str],
    process: Callable[[list[T]], Sequence[JobRecord]],
    batch_size: int,
    progress: ProgressHook | None = None,
    setup: Callable[[], None] | None = None,
    row_key: Callable[[dict], str] = lambda row: row["id"],
    stop: StopCheck | None = None,
    dedupe_key: Callable[[T], str] | None = None,
    cancelled: CancelledRows | None = None,
    redo: Collection[str] = (ErrorCode.CANCELLED.value,),
    engine_down: Callable[[Sequence[JobRecord]], bool] | None = None,
) -> BatchRun:
    """Stream items in batches, skip ids already in the store, process, append one shard per batch.

    `items` is called twice (a counting pass for progress, then the work), so nothing
    holds the whole input in memory. `setup` (e.g. starting the engine) runs once,
    untimed, only if there is work. A batch whose every row is BACKEND_UNAVAILABLE
    raises EngineDown and is not written, so a rerun does it again. When `stop()`
    turns true, every input not started is written as a `cancelled` row (Batch API
    contract: each input ends as one row) and JobCancelled is raised. `stop` is also
    the current stop check (`cai.engine.base.stop_scope`) while a batch is processed:
    when a retry or request loop inside raises StopRequested, the batch in flight is
    written as `cancelled` rows too. Rows with an
    error code in `redo` (by default `cancelled` ones) are dropped first and done again.
    """
    done = store.done_ids(stage, row_key, redo=set(redo))
    run = BatchRun(done_before=len(done))
    if progress:
        progress("total", sum(1 for i, _ in _unique(items(), key, None, dedupe_key) if i not in done))
    todo = (item for item_id, item in _unique(items(), key, run, dedupe_key) if item_id not in done)
    while batch := list(itertools.islice(todo, batch_size)):
        if stop is not None and stop():
            _cancel_rest(store, stage, itertools.chain(batch, todo), batch_size, run, cancelled)
        if setup is not None:
            setup()
            setup = None
        t0 = time.perf_counter()
        try:
            with stop_scope(stop):  # retry and request loops inside `process` check it too
                records = process(batch)
        except StopRequested:
            _cancel_rest(store, stage, itertools.chain(batch, todo), batch_size, run, cancelled)
        run.generation_seconds += time.perf_counter() - t0
        if (engine_down or _all_backend_unavailable)(records):
            raise EngineDown(f"every request of a batch failed: {records[0].error.message}")
        store.append(stage, records)
        run.done_now += len(records)
        run.generated_tokens += sum(r.generated_tokens for r in records)
        if progress:
            progress("done", len(records))
    return run


def _all_backend_unavailable(records: Sequence[JobRecord]) -> bool:
    return {r.error.code if r.error else None for r in records} == {ErrorCode.BACKEND_UNAVAILABLE}


def _cancel_rest(
    store: JobStore, stage: str, rest: Iterable[T], batch_size: int, run: BatchRun, cancelled: CancelledRows | None
) -> None:
    reason = f"job cancelled after {run.done_now} rows of this run; rerun the job to generate this input"
    written = 0
    while cancelled is not None and (batch := list(itertools.islice(rest, batch_size))):
        store.append(stage, cancelled(batch, reason))
        written += len(batch)
    raise JobCancelled(f"cancelled after {run.done_now} rows; {written} inputs not started were written "
                       "as `cancelled` error rows; rerun the job to resume", run.done_now, written)
