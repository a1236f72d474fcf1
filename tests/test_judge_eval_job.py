"""Judge evaluation as a job directory: resume, cancel rows, fingerprint refusal, retry-errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from fakes import judge_preferring
from helpers import write_jsonl

from cai.engine.fake import FakeEngine
from cai.judge import JudgeConfig
from cai.judge_eval import EvalJob, run_judge_eval
from cai.kinds import retry_errors
from cai.pipeline import EngineDown, JobCancelled
from cai.records import Completion
from cai.store import JobError


def hh_file(path: Path, n: int = 9) -> Path:
    rows = [{"chosen": f"\n\nHuman: question {i}\n\nAssistant: good reply {i}",
             "rejected": f"\n\nHuman: question {i}\n\nAssistant: bad reply {i}"} for i in range(n)]
    return write_jsonl(path, rows)


def verdict_a(chat, params):
    return '{"choice": "A"}'


def engine(responder=verdict_a) -> FakeEngine:
    return FakeEngine(responder=responder, chooser=judge_preferring("good", 0.95))


def job(tmp_path: Path, **kw) -> EvalJob:
    data = tmp_path / "pairs.jsonl"
    tmp_path.mkdir(parents=True, exist_ok=True)
    if not data.exists():
        hh_file(data)
    return EvalJob(data=str(data), out=str(tmp_path / "eval"), batch_size=2, **kw)


def shard_rows(root: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((root / "shards").glob("*.jsonl")) for line in p.open()]


def test_cancelled_then_resumed_evaluation_matches_an_uninterrupted_one(tmp_path):
    clean = run_judge_eval(job(tmp_path / "clean"), engine())
    assert clean.report.cai.accuracy == 1.0 and clean.report.n == 9
    assert {Path(f).name for f in clean.files} >= {"report.json", "report.md", "predictions.jsonl"}

    first = engine()
    with pytest.raises(JobCancelled, match="14 .judge, pair. rows not started"):
        run_judge_eval(job(tmp_path), first, stop=lambda: len(first.choice_batches) >= 2)
    rows = shard_rows(tmp_path / "eval")
    assert len(rows) == len({r["id"] for r in rows}) == 18  # every (judge, pair): one row
    assert sum(r["error"] is not None and r["error"]["code"] == "cancelled" for r in rows) == 5 + 9

    again = engine()
    resumed = run_judge_eval(job(tmp_path), again)
    assert (resumed.done_before, resumed.done_now) == (4, 14)  # 5 cai + 9 baseline
    assert sum(len(b) for b in again.choice_batches) == 5 * 2  # only the cancelled items, both orders
    rows = shard_rows(tmp_path / "eval")
    assert len(rows) == len({r["id"] for r in rows}) == 18 and not any(r["error"] for r in rows)
    assert resumed.report.cai.model_dump(exclude={"seconds"}) == clean.report.cai.model_dump(exclude={"seconds"})
    assert resumed.report.baseline.model_dump(exclude={"seconds"}) == clean.report.baseline.model_dump(
        exclude={"seconds"})

    done = run_judge_eval(job(tmp_path), engine())
    assert done.done_now == 0 and done.done_before == 18


def test_changed_judge_settings_are_refused_or_start_a_new_directory(tmp_path):
    run_judge_eval(job(tmp_path), engine())
    with pytest.raises(JobError, match="changed: judge"):
        run_judge_eval(job(tmp_path, judge=JudgeConfig(orders=1)), engine())
    other = run_judge_eval(job(tmp_path, judge=JudgeConfig(orders=1), new_job=True), engine())
    assert other.out != str(tmp_path / "eval") and other.done_now == 18
    grown = run_judge_eval(job(tmp_path, baseline=False), engine())  # no baseline: nothing new to judge
    assert grown.done_now == 0 and grown.report.baseline is None


def test_dead_judge_backend_stops_without_rows(tmp_path):
    down = {"code": "backend_unavailable", "message": "connection refused"}
    dead = FakeEngine(responder=lambda c, p: Completion(finish_reason="error", error=down),
                      chooser=lambda c, o, p: {"A": math.log(0.5), "B": math.log(0.5)})
    dead.choice_logprobs = lambda chats, options, prefix="": (_ for _ in ()).throw(AssertionError("not reached"))
    with pytest.raises(EngineDown):
        run_judge_eval(job(tmp_path, judge=JudgeConfig(mode="structured", fallback_structured=False)), dead)
    assert shard_rows(tmp_path / "eval") == []


def test_retry_errors_redoes_backend_failures_but_keeps_unparseable_verdicts(tmp_path):
    down = {"code": "backend_unavailable", "message": "502 after retries"}

    def flaky_baseline(chat, params):
        text = chat[-1].content
        if "question 3" in text:
            return Completion(finish_reason="error", error=down)
        return "no idea" if "question 5" in text else '{"choice": "A"}'

    first = run_judge_eval(job(tmp_path), engine(flaky_baseline))
    assert first.report.baseline.errors == {"backend_unavailable": 1, "unparseable": 1}
    unparseable = [r for r in shard_rows(tmp_path / "eval") if r["error"] and r["error"]["code"] == "unparseable"]
    assert [r["error"]["raw"] for r in unparseable] == ["no idea"]  # the raw reply is kept on the error row
    again = engine()
    redone, summary = retry_errors(tmp_path / "eval", engine=again)
    assert redone == {"backend_unavailable": 1}  # an unparseable verdict is a measurement: not re-rolled
    assert again.choice_batches == [] and sum(len(b) for b in again.batches) == 1
    assert summary.report.baseline.errors == {"unparseable": 1} and summary.report.baseline.answered == 8


def test_stop_during_the_first_judge_leaves_one_row_per_judge_and_pair(tmp_path):
    first = engine()
    with pytest.raises(JobCancelled):
        run_judge_eval(job(tmp_path), first, stop=lambda: len(first.choice_batches) >= 1)
    rows = shard_rows(tmp_path / "eval")
    assert len(rows) == len({r["id"] for r in rows}) == 18
    assert sum(r["judge"] == "baseline" and r["error"]["code"] == "cancelled" for r in rows) == 9
    assert first.batches == []  # the baseline never ran
