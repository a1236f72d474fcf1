"""The batch runner's plan -> execute -> commit seam: batch ids, executors finishing out of order,
typed progress events, shards of older jobs, and the store's reading APIs."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from helpers import HARMLESS, write_prompts
from pydantic import BaseModel

from cai.batches import Committer, JobCancelled, run_batches
from cai.engine.base import StopRequested
from cai.engine.fake import FakeEngine
from cai.events import BatchCancelled, BatchCommitted, Planned, StepStarted
from cai.executor import Batch, Executed, LocalExecutor
from cai.pipeline import generate_sft
from cai.recipe import Phase1Config, SFTJob
from cai.records import Completion, ErrorCode, ErrorInfo
from cai.store import JobStore, Manifest, batch_id


class Row(BaseModel):
    id: str
    value: int
    error: ErrorInfo | None = None

    @property
    def generated_tokens(self) -> int:
        return self.value


def store_at(path: Path) -> JobStore:
    manifest = Manifest(stage="x", fingerprint="f", fingerprint_inputs={}, recipe={})
    return JobStore.open(path, manifest, models={"x": Row})


def square(batch: list[int]) -> list[Row]:
    error = ErrorInfo(code=ErrorCode.EMPTY, message="odd")
    return [Row(id=f"i{n}", value=n * n, error=error if n % 3 == 0 else None) for n in batch]


def cancel_rows(batch: list[int], reason: str) -> list[Row]:
    return [Row(id=f"i{n}", value=0, error=ErrorInfo(code=ErrorCode.CANCELLED, message=reason)) for n in batch]


class Reversed:
    """An executor that takes every batch first, then yields them last to first (and the last one twice):
    a distributed executor may finish batches in any order and a retried worker may report one twice."""

    def __init__(self):
        self.local = LocalExecutor()

    def execute(self, batches: Iterable[Batch], process, stop=None) -> Iterator[Executed]:
        done = list(self.local.execute(batches, process, stop))
        yield from reversed(done)
        if done:
            yield done[0]


def run(store: JobStore, n: int, executor=None, events: list | None = None, **kw):
    return run_batches(store, "x", lambda: range(n), lambda i: f"i{i}", square, 3,
                       progress=events.append if events is not None else None, executor=executor,
                       cancelled=cancel_rows, **kw)


def test_a_batch_id_is_committed_once(tmp_path):
    events = []
    with store_at(tmp_path / "job") as store:
        committer = Committer(store, "x", events.append)
        batch = Batch("x", 0, ("i1", "i2"), (1, 2))
        assert batch.id == batch_id(0, ["i1", "i2"]) and Batch("x", 0, ("i1", "i2"), (1, 2)).id == batch.id
        assert committer.commit(batch, square([1, 2])) is True
        shard = store.shard_paths("x")[0]
        before = shard.read_bytes()
        assert committer.commit(batch, square([1, 2])) is False
        assert store.commit("x", batch.id, square([5])) is None
        assert store.shard_paths("x") == [shard] and shard.read_bytes() == before
        assert [type(e) for e in events] == [BatchCommitted]


def test_out_of_order_execution_reads_back_in_plan_order(tmp_path):
    with store_at(tmp_path / "in-order") as store:
        in_order = run(store, 10)
        expected = list(store.read("x"))
    events = []
    with store_at(tmp_path / "reversed") as store:
        shuffled = run(store, 10, executor=Reversed(), events=events)
        assert list(store.read("x")) == expected  # shards named by plan position, whatever the finishing order
        assert [p.name.split("-")[1] for p in store.shard_paths("x")] == ["000000", "000001", "000002", "000003"]
        stats = store.stats("x")
    seconds = {"generation_seconds"}
    assert in_order.model_dump(exclude=seconds) == shuffled.model_dump(exclude=seconds)  # a batch reported twice counts once
    committed = [e for e in events if isinstance(e, BatchCommitted)]
    assert [e.batch_id for e in committed] == [p.name[2:-6] for p in reversed(store.shard_paths("x"))]
    assert events[0] == Planned(stage="x", total=10, done_before=0)
    assert sum(e.rows for e in committed) == stats.rows == 10
    assert sum((Counter(e.errors) for e in committed), Counter()) == Counter(stats.errors) == {"empty": 4}
    assert sum(e.generated_tokens for e in committed) == stats.generated_tokens == sum(i * i for i in range(10))


def test_events_sum_to_the_rows_written_when_stopped(tmp_path):
    events, calls = [], []

    def stop_after_two() -> bool:
        calls.append(None)
        return len(calls) > 2

    with store_at(tmp_path / "job") as store:
        with pytest.raises(JobCancelled) as exc:
            run(store, 10, events=events, stop=stop_after_two)
        stats = store.stats("x")
    committed = [e for e in events if isinstance(e, BatchCommitted)]
    cancelled = [e for e in events if isinstance(e, BatchCancelled)]
    assert (exc.value.done, exc.value.written) == (6, 4)
    assert sum(e.rows for e in committed) + sum(e.rows for e in cancelled) == stats.rows == 10
    assert stats.errors == {"empty": 2, "cancelled": 4}


def test_a_stop_inside_an_out_of_order_executor_cancels_every_batch_not_committed(tmp_path):
    class StopsAfterTwo:
        """Takes three batches, finishes the third first, then a retry loop in the first sees the stop."""

        def execute(self, batches, process, stop=None):
            taken = [next(iter(batches)) for _ in range(3)]
            yield Executed(taken[2], process(list(taken[2].items)), 0.0)
            raise StopRequested("stop")

    with store_at(tmp_path / "job") as store:
        with pytest.raises(JobCancelled) as exc:
            run(store, 10, executor=StopsAfterTwo())
        rows = list(store.read("x"))
    assert (exc.value.done, exc.value.written) == (3, 7)
    assert [r["id"] for r in rows] == [f"i{i}" for i in range(10)]  # plan order: cancelled batches 0, 1 first
    assert [r["id"] for r in rows if r["error"] and r["error"]["code"] == "cancelled"] == [
        f"i{i}" for i in (0, 1, 2, 3, 4, 5, 9)]


def test_dead_engine_batch_is_not_committed_by_any_executor(tmp_path):
    def down(batch):
        return [Row(id=f"i{n}", value=0, error=ErrorInfo(code=ErrorCode.BACKEND_UNAVAILABLE, message="refused"))
                for n in batch]

    from cai.batches import EngineDown

    with store_at(tmp_path / "job") as store:
        with pytest.raises(EngineDown, match="refused"):
            run_batches(store, "x", lambda: range(5), lambda i: f"i{i}", down, 2, executor=Reversed())
        assert store.shard_paths("x") == []


# ---------------------------------------------------------------- whole jobs


def _prompts(path: Path, n: int) -> Path:
    return write_prompts(path, [f"question {i}" for i in range(n)])


def _job(tmp_path: Path, out: str, n: int = 7, **kw) -> SFTJob:
    return SFTJob(constitution=HARMLESS, prompts=str(_prompts(tmp_path / f"p{n}.jsonl", n)), out=str(tmp_path / out),
                  batch_size=2, parquet=False, phase1=Phase1Config(rounds=1), **kw)


def _export(job_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (job_dir / "sft.jsonl").open()]
    for row in rows:
        row["metadata"].pop("created_at")
    return rows


def test_a_job_run_out_of_order_exports_what_an_in_order_run_exports(tmp_path):
    events = []
    generate_sft(_job(tmp_path, "in-order", 7), engine=FakeEngine())
    summary = generate_sft(_job(tmp_path, "reversed", 7), engine=FakeEngine(), executor=Reversed(),
                           progress=events.append)
    assert _export(tmp_path / "reversed") == _export(tmp_path / "in-order")
    assert summary.done_now == 7 and summary.export.rows == 7
    steps = [e for e in events if isinstance(e, StepStarted)]
    assert [(e.stage, e.name) for e in steps[:3]] == [("sft", "answer"), ("sft", "critique 1"), ("sft", "revision 1")]
    assert sum(e.rows for e in events if isinstance(e, BatchCommitted)) == 7


def test_a_job_with_old_shard_names_resumes_and_reads_in_order(tmp_path):
    """Shards of a job written before batch ids (sft-000000.jsonl, ...) are read, counted and resumed."""
    generate_sft(_job(tmp_path, "job", limit=4), engine=FakeEngine())
    shards = tmp_path / "job" / "shards"
    for n, shard in enumerate(sorted(shards.glob("sft-*.jsonl"))):
        shard.rename(shards / f"sft-{n:06d}.jsonl")
    old_rows = [json.loads(line) for n in range(2) for line in (shards / f"sft-{n:06d}.jsonl").open()]
    engine = FakeEngine()
    summary = generate_sft(_job(tmp_path, "job"), engine=engine)
    assert (summary.done_before, summary.done_now, summary.export.rows) == (4, 3, 7)
    assert sum(len(b) for b in engine.batches[:1]) == 2  # only the new prompts were generated
    names = [p.name for p in sorted(shards.glob("sft-*.jsonl"))]
    assert names[:2] == ["sft-000000.jsonl", "sft-000001.jsonl"] and all(
        n.startswith((f"sft-{i:06d}-")) for i, n in enumerate(names[2:], 2))
    from cai.kinds import open_store

    _, store = open_store(tmp_path / "job")
    assert list(store.read("sft"))[:4] == old_rows
    assert store.stats("sft").rows == 7 and store.head("sft", 5)[:4] == old_rows


def test_store_stats_count_what_the_shards_hold(tmp_path):
    prompts = _prompts(tmp_path / "p.jsonl", 5)

    def flaky(chat, params):
        if chat[0].content == "question 3" and len(chat) == 1:
            return Completion(finish_reason="error", error={"code": "backend_unavailable", "message": "503"})
        return "fine " + chat[-1].content[:20]

    job = SFTJob(constitution=HARMLESS, prompts=str(prompts), out=str(tmp_path / "job"), batch_size=2, parquet=False)
    generate_sft(job, engine=FakeEngine(flaky))
    from cai.kinds import open_store

    kind, store = open_store(tmp_path / "job")
    rows = [json.loads(line) for p in sorted((tmp_path / "job" / "shards").glob("*.jsonl")) for line in p.open()]
    stats = store.stats(kind.result_stage)
    assert (stats.rows, stats.ok, stats.shards, stats.unreadable) == (5, 4, 3, [])
    assert stats.errors == dict(Counter(r["error"]["code"] for r in rows if r["error"])) == {"backend_unavailable": 1}
    assert stats.generated_tokens == sum(r.generated_tokens for r in store.records("sft"))
    assert store.head("sft", 2) == rows[:2]
    assert store.exports(kind.export_files) == ["sft.jsonl", "README.md", "manifest.json"]
