"""`generate_prefs` on the fake engine: job directory, export rules, TRL-loadable rows, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pytest
from fakes import alternating_sampler, judge_preferring
from helpers import HARMLESS, write_prompts

from cai.engine.fake import FakeEngine
from cai.pipeline import generate_prefs
from cai.recipe import Phase2Config, PrefsJob
from cai.records import Completion

PREFERS_GOOD = judge_preferring("good", 0.9)


def always_a(chat, options, prefix):
    return {"A": math.log(0.8), "B": math.log(0.2)}


def job(tmp_path: Path, **kw) -> PrefsJob:
    tmp_path.mkdir(exist_ok=True)
    prompts = tmp_path / "p.jsonl"
    write_prompts(prompts, [f"question {i}" for i in range(4)])
    return PrefsJob(constitution=HARMLESS, prompts=str(prompts), out=str(tmp_path / "job"), **kw)


def test_prefs_job_exports_trl_rows_with_lineage(tmp_path):
    engine = FakeEngine(alternating_sampler(), chooser=PREFERS_GOOD)
    summary = generate_prefs(job(tmp_path), policy_engine=engine, judge_engine=engine)
    assert summary.stats.exported == 4 and summary.stats.consistency_rate == 1.0
    ds = datasets.load_dataset("json", data_files=str(Path(summary.out) / "prefs.jsonl"), split="train")
    row = ds[0]
    assert "good" in row["chosen"][0]["content"] and "bad" in row["rejected"][0]["content"]
    assert row["prompt"][-1]["role"] == "user" and row["score"] > 0.5 and row["consistent"]
    assert math.isclose(row["margin"], 2 * row["score"] - 1)
    meta = row["metadata"]
    assert meta["constitution"]["name"] == "harmless" and meta["principle_id"]
    assert meta["policy_model"]["id"] == "fake-model" and len(meta["p_a_orders"]) == 2
    card = (Path(summary.out) / "README.md").read_text()
    assert "consistency rate" in card and "first-position" in card
    # all prompts' samples in one call, then all pairs x both orders in one scoring call
    assert [len(b) for b in engine.batches] == [8] and [len(b) for b in engine.choice_batches] == [8]


def test_position_biased_judge_rows_are_kept_raw_but_not_exported(tmp_path):
    engine = FakeEngine(alternating_sampler(), chooser=always_a)
    summary = generate_prefs(job(tmp_path), policy_engine=engine, judge_engine=engine)
    assert summary.stats.exported == 0 and summary.stats.excluded == {"tie": 4}
    shards = [json.loads(l) for s in (Path(summary.out) / "shards").glob("prefs-*.jsonl") for l in s.open()]
    assert len(shards) == 4 and all(r["judgement"]["p_a"] == 0.5 for r in shards)
    assert (Path(summary.out) / "prefs.jsonl").read_text() == ""


def test_prefs_job_resumes(tmp_path):
    engine = FakeEngine(alternating_sampler(), chooser=PREFERS_GOOD)
    generate_prefs(job(tmp_path, limit=2), policy_engine=engine, judge_engine=engine)
    again = FakeEngine(alternating_sampler(), chooser=PREFERS_GOOD)
    summary = generate_prefs(job(tmp_path), policy_engine=again, judge_engine=again)
    assert (summary.done_before, summary.done_now) == (2, 2)
    assert [len(b) for b in again.batches] == [4]
    all_pairs = generate_prefs(
        job(tmp_path / "all", phase2=Phase2Config(samples=3, pairing="all")),
        policy_engine=FakeEngine(alternating_sampler(), chooser=PREFERS_GOOD),
        judge_engine=FakeEngine(alternating_sampler(), chooser=PREFERS_GOOD),
    )
    assert all_pairs.stats.records == 12  # 3 pairs per prompt
    rerun = generate_prefs(
        job(tmp_path / "all", phase2=Phase2Config(samples=3, pairing="all")),
        policy_engine=FakeEngine(alternating_sampler(), chooser=PREFERS_GOOD),
    )
    assert rerun.done_now == 0 and rerun.done_before == 4


def _rows(job_dir, stage):
    return [json.loads(l) for s in sorted((job_dir / "shards").glob(f"{stage}-*.jsonl")) for l in s.open()]


def test_cancelled_while_sampling_has_one_row_per_prompt_and_resumes(tmp_path):
    from cai.pipeline import JobCancelled

    engine = FakeEngine(alternating_sampler(), chooser=PREFERS_GOOD)
    with pytest.raises(JobCancelled, match="while sampling"):
        generate_prefs(job(tmp_path, batch_size=1), policy_engine=engine, judge_engine=engine,
                       stop=lambda: len(engine.batches) >= 1)
    rows = _rows(tmp_path / "job", "prefs")
    assert [r["error"]["code"] for r in rows] == ["cancelled"] * 4  # every input ends as one row
    assert rows[1]["lineage"]["judge_model"]["id"] == "fake-model"
    assert len(_rows(tmp_path / "job", "samples")) == 1
    again = FakeEngine(alternating_sampler(), chooser=PREFERS_GOOD)
    summary = generate_prefs(job(tmp_path, batch_size=1), policy_engine=again, judge_engine=again)
    assert (summary.done_before, summary.done_now, summary.stats.exported) == (0, 4, 4)
    assert summary.stats.errors == {}
    assert len(again.batches) == 3  # the sampled prompt is not sampled again


def test_cancelled_while_judging_keeps_samples_and_resumes(tmp_path):
    from cai.pipeline import JobCancelled

    engine = FakeEngine(alternating_sampler(), chooser=PREFERS_GOOD)
    with pytest.raises(JobCancelled):
        generate_prefs(job(tmp_path, batch_size=2), policy_engine=engine, judge_engine=engine,
                       stop=lambda: bool(engine.choice_batches))
    rows = _rows(tmp_path / "job", "prefs")
    assert [r["error"]["code"] if r["error"] else None for r in rows] == [None, None, "cancelled", "cancelled"]
    again = FakeEngine(alternating_sampler(), chooser=PREFERS_GOOD)
    summary = generate_prefs(job(tmp_path, batch_size=2), policy_engine=again, judge_engine=again)
    assert (summary.done_before, summary.done_now, summary.stats.exported) == (2, 2, 4)
    assert again.batches == []  # every answer was sampled before the stop: only judging is redone


def test_retry_errors_reruns_only_failed_prefs_prompts(tmp_path):
    from cai.kinds import retry_errors

    alternating = alternating_sampler()

    def sampler(chat, params):
        if "question 2" in chat[-1].content:
            return Completion(text="", finish_reason="stop")
        return alternating(chat, params)

    engine = FakeEngine(sampler, chooser=PREFERS_GOOD)
    first = generate_prefs(job(tmp_path), policy_engine=engine, judge_engine=engine)
    assert first.stats.errors == {"empty": 1} and first.stats.exported == 3
    again = FakeEngine(alternating_sampler(), chooser=PREFERS_GOOD)
    dropped, summary = retry_errors(first.out, policy_engine=again, judge_engine=again)
    assert dropped == {"empty": 1}
    assert [len(b) for b in again.batches] == [2]  # one prompt, two samples
    assert summary.stats.exported == 4 and summary.stats.errors == {}
