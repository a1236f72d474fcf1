"""Executors turn planned batches into records; the driver (cai.batches) plans and commits.

    plan (driver)  ->  Executor.execute(batches, process, stop)  ->  commit (driver)
                       yields Executed(batch, records, seconds), in any order

`LocalExecutor` runs `process` in this process, one batch at a time in plan order. An executor
that runs batches elsewhere (e.g. Ray actors that each hold an engine and run the same stage code)
keeps this contract:

- Take a batch from `batches` only when a worker is free to start it: taking a batch is where the
  driver checks `stop` and starts its engine, and taking stops once the job is asked to stop.
- Yield every batch taken exactly once with its records, as each finishes, in any order. Shards are
  named by batch id, so the job directory reads in plan order whatever the finishing order, and a
  batch yielded twice (a retried worker) is committed once.
- `process` maps a list of inputs to their records (one stage call). For a remote executor it must
  be picklable (a module-level function, or a callable object holding the stage settings and an
  engine spec from which the worker builds its engine once), not a closure over a local engine.
- A StopRequested out of `process` (a retry or request loop saw `stop`: see
  cai.engine.base.stop_scope) ends `execute` with that exception: the driver writes `cancelled`
  rows for every batch taken but not yielded and every batch not taken. Any other exception ends
  the job; batches not yielded are generated again by the next run.

A Ray executor would keep a pool of actors, submit `actor.run.remote(batch.items)` as actors
free up (pulling the next batch from `batches` each time), `ray.wait` for the first finished
reference, yield `Executed(batch, records, seconds)`, and cancel its outstanding references if the
driver closes the generator.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from cai.engine.base import stop_scope
from cai.shards import batch_id

T = TypeVar("T")
StopCheck = Callable[[], bool]
Process = Callable[[list[Any]], Sequence[Any]]
"""A stage call: the inputs of one batch -> their records (one or more per input)."""


@dataclass(frozen=True)
class Batch(Generic[T]):
    """Inputs of one stage call, with the id their shard is named by: `seq`, the batch's place in
    plan order, and a digest of its input ids (see cai.shards.batch_id)."""

    stage: str
    seq: int
    ids: tuple[str, ...]
    items: tuple[T, ...]
    id: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", batch_id(self.seq, self.ids))

    def __len__(self) -> int:
        return len(self.items)


class Executed(NamedTuple):
    batch: Batch
    records: list[Any]
    seconds: float  # time spent in `process` (engine work), for tokens per second


class Executor(Protocol):
    def execute(self, batches: Iterable[Batch], process: Process, stop: StopCheck | None = None) -> Iterator[Executed]:
        """Run `process` on each batch taken from `batches`; yield each with its records (see the module doc)."""
        ...


class LocalExecutor:
    """In this process, one batch at a time, in plan order. `stop` is the current stop check while a
    batch is processed, so retry and request loops inside the stage see it too."""

    def execute(self, batches: Iterable[Batch], process: Process, stop: StopCheck | None = None) -> Iterator[Executed]:
        for batch in batches:
            started = time.perf_counter()
            with stop_scope(stop):
                records = list(process(list(batch.items)))
            yield Executed(batch, records, time.perf_counter() - started)
