"""`generate_prefs` on the fake engine: job directory, export rules, TRL-loadable rows, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets

from cai.engine.fake import FakeEngine
from cai.pipeline import generate_prefs
from cai.recipe import Phase2Config, PrefsJob

ROOT = Path(__file__).resolve().parents[1]
HARMLESS = str(ROOT / "constitutions" / "harmless.yaml")


def sampler():
    counter = {"n": 0}

    def respond(chat, params):
        counter["n"] += 1
        return ("a good careful answer" if counter["n"] % 2 else "a bad answer") + f" #{counter['n']}"

    return respond


def prefers_good(chat, options, prefix):
    text = chat[-1].content
    first = text.index("(A)\n")
    second = text.index("(B)\n")
    good_first = "good" in text[first:second]
    return {"A": math.log(0.9 if good_first else 0.1), "B": math.log(0.1 if good_first else 0.9)}


def always_a(chat, options, prefix):
    return {"A": math.log(0.8), "B": math.log(0.2)}


def job(tmp_path: Path, **kw) -> PrefsJob:
    tmp_path.mkdir(exist_ok=True)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(4)))
    return PrefsJob(constitution=HARMLESS, prompts=str(prompts), out=str(tmp_path / "job"), **kw)


def test_prefs_job_exports_trl_rows_with_lineage(tmp_path):
    engine = FakeEngine(sampler(), chooser=prefers_good)
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
    engine = FakeEngine(sampler(), chooser=always_a)
    summary = generate_prefs(job(tmp_path), policy_engine=engine, judge_engine=engine)
    assert summary.stats.exported == 0 and summary.stats.excluded == {"tie": 4}
    shards = [json.loads(l) for s in (Path(summary.out) / "shards").glob("*.jsonl") for l in s.open()]
    assert len(shards) == 4 and all(r["judgement"]["p_a"] == 0.5 for r in shards)
    assert (Path(summary.out) / "prefs.jsonl").read_text() == ""


def test_prefs_job_resumes(tmp_path):
    engine = FakeEngine(sampler(), chooser=prefers_good)
    generate_prefs(job(tmp_path, limit=2), policy_engine=engine, judge_engine=engine)
    again = FakeEngine(sampler(), chooser=prefers_good)
    summary = generate_prefs(job(tmp_path), policy_engine=again, judge_engine=again)
    assert (summary.done_before, summary.done_now) == (2, 2)
    assert [len(b) for b in again.batches] == [4]
    all_pairs = generate_prefs(
        job(tmp_path / "all", phase2=Phase2Config(samples=3, pairing="all")),
        policy_engine=FakeEngine(sampler(), chooser=prefers_good),
        judge_engine=FakeEngine(sampler(), chooser=prefers_good),
    )
    assert all_pairs.stats.records == 12  # 3 pairs per prompt
    rerun = generate_prefs(
        job(tmp_path / "all", phase2=Phase2Config(samples=3, pairing="all")),
        policy_engine=FakeEngine(sampler(), chooser=prefers_good),
    )
    assert rerun.done_now == 0 and rerun.done_before == 4
