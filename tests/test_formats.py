"""cai.formats: the exported rows, how a review changes them (one rule for export, service and
trainers), the export filters, the data card written from the job's settings, and the judge's
template hash per mode."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from helpers import CONSTITUTIONS  # noqa: E402

from cai import prompts  # noqa: E402
from cai.constitution import load_constitution  # noqa: E402
from cai.critique import run_phase1  # noqa: E402
from cai.engine.fake import FakeEngine  # noqa: E402
from cai.files import atomic_write_jsonl  # noqa: E402
from cai.formats import (  # noqa: E402
    ExportFilters,
    PreferenceRow,
    ReviewMeta,
    SFTRow,
    apply_review,
    judge_row,
    preference_exclusion,
    preference_row,
    row_review,
    sft_row,
)
from cai.preferences import Phase2Config, PreferenceStats, run_phase2  # noqa: E402
from cai.recipe import JudgeConfig, Phase1Config  # noqa: E402
from cai.records import Message, SourcePrompt  # noqa: E402
from cai.store import JobStore, Manifest  # noqa: E402

HARMLESS = load_constitution(CONSTITUTIONS / "harmless.yaml")


def sources(n: int) -> list[SourcePrompt]:
    return [SourcePrompt(id=f"p{i}", messages=[Message(role="user", content=f"question {i}")], source="t")
            for i in range(n)]


def good_beats_bad(p: float):
    """Samples alternate "good #n" / "bad #n"; the judge gives P = p to the good one in either order."""
    counter = {"n": 0}

    def policy(chat, params):
        counter["n"] += 1
        return ("good" if counter["n"] % 2 else "bad") + f" answer #{counter['n']}"

    def choose(chat, options, prefix):
        text = chat[-1].content
        good_first = "good" in text[text.index("(A)\n"):text.index("(B)\n")]
        return {"A": math.log(p if good_first else 1 - p), "B": math.log(1 - p if good_first else p)}

    return FakeEngine(policy, chooser=choose)


def prefs_records(n: int = 3, p: float = 0.9, **phase2):
    engine = good_beats_bad(p)
    return run_phase2(sources(n), HARMLESS, engine, engine, Phase2Config(**phase2))


def review(label: str) -> ReviewMeta:
    return ReviewMeta(label=label, reviewer="alice", note="n", reviewed_at="2025-01-01T00:00:00+00:00")


# ---- the rows ------------------------------------------------------------------------


def test_rows_follow_the_documented_models():
    [record] = prefs_records(1)
    row = preference_row(record)
    assert list(row) == ["prompt", "chosen", "rejected", "score", "margin", "consistent", "metadata"]
    assert PreferenceRow.model_validate(row).model_dump() == row
    assert row["chosen"] == [{"role": "assistant", "content": record.chosen}] and row["score"] == pytest.approx(0.9)
    assert row["metadata"]["template_hash"] == prompts.judge_template_hash("logprob")
    [sft] = run_phase1(sources(1), HARMLESS, FakeEngine(), Phase1Config(rounds=1))
    row = sft_row(sft)
    assert list(row) == ["messages", "metadata"] and row["messages"][-1] == {"role": "assistant", "content": sft.final}
    assert SFTRow.model_validate(row).model_dump() == row


# ---- reviews -------------------------------------------------------------------------


def test_flip_agree_discard_and_no_review():
    [record] = prefs_records(1)
    row = preference_row(record)
    flipped = apply_review(row, review("flip"))
    assert (flipped["chosen"], flipped["rejected"]) == (row["rejected"], row["chosen"])
    assert (flipped["score"], flipped["margin"], flipped["metadata"]["confidence"]) == (1.0, 1.0, 1.0)
    meta = flipped["metadata"]
    assert meta["label_source"] == "human" and meta["review"]["label"] == "flip"
    assert (meta["chosen_index"], meta["rejected_index"]) == (row["metadata"]["rejected_index"],
                                                              row["metadata"]["chosen_index"])
    assert meta["judge_verdict"]["score"] == row["score"] and meta["judge_verdict"]["chosen_index"] == record.chosen_index
    agreed = apply_review(row, review("agree"))
    assert agreed["chosen"] == row["chosen"] and agreed["score"] == 1.0
    assert apply_review(row, review("discard")) is None
    plain = apply_review(row, None)
    assert plain["score"] == row["score"] and plain["metadata"]["label_source"] == "judge"
    assert plain["metadata"]["review"] == {"label": "", "reviewer": "", "note": "", "reviewed_at": ""}
    assert row == preference_row(record)  # the export row itself is left alone


def test_a_review_applies_once_whatever_row_it_is_given():
    """The service applies a review to the export; a trainer re-applies a reviewed row's own review; a
    later review replaces an earlier one. A flip is never applied twice."""
    [record] = prefs_records(1)
    row = preference_row(record)
    for label in ("flip", "agree", ""):
        reviewed = apply_review(row, review(label) if label else None)
        assert apply_review(reviewed, row_review(reviewed)) == reviewed
        assert judge_row(reviewed) == row
    flipped = apply_review(row, review("flip"))
    assert apply_review(flipped, review("agree")) == apply_review(row, review("agree"))


def test_a_version_1_flip_is_read_back():
    """Exports before review format 2 stored a flip as score = 1 - score (no judge_verdict)."""
    [record] = prefs_records(1)
    row = preference_row(record)
    old = {**row, "chosen": row["rejected"], "rejected": row["chosen"], "score": 1 - row["score"],
           "margin": -row["margin"], "metadata": {**row["metadata"], "review": review("flip").model_dump(),
                                                  "chosen_index": record.rejected_index,
                                                  "rejected_index": record.chosen_index}}
    assert judge_row(old) == row
    again = apply_review(old, row_review(old))
    assert again["chosen"] == row["rejected"] and again["score"] == 1.0 and again == apply_review(row, review("flip"))


def test_sft_reviews():
    [record] = run_phase1(sources(1), HARMLESS, FakeEngine(), Phase1Config(rounds=1))
    row = sft_row(record)
    assert apply_review(row, review("discard"), "sft") is None
    kept = apply_review(row, review("agree"), "sft")
    assert kept["messages"] == row["messages"] and kept["metadata"]["review"]["label"] == "agree"
    assert "label_source" not in kept["metadata"] and "judge_verdict" not in kept["metadata"]


# ---- export filters ------------------------------------------------------------------


def test_a_human_label_is_exported_whatever_the_judge_filters_say():
    [low] = prefs_records(1, p=0.6)  # confidence 0.2
    strict = ExportFilters(min_confidence=0.5)
    assert preference_exclusion(low, strict) == "low_confidence"
    assert preference_exclusion(low, strict, "flip") is None and preference_exclusion(low, strict, "agree") is None
    assert preference_exclusion(low, ExportFilters(), "discard") == "discarded"
    [tie] = prefs_records(1, p=0.5)
    assert preference_exclusion(tie) == "tie" and preference_exclusion(tie, review="agree") is None
    failing = FakeEngine(lambda chat, params: "same answer")  # duplicates: fewer than two usable samples
    [error] = run_phase2(sources(1), HARMLESS, failing, failing, Phase2Config())
    assert preference_exclusion(error, review="agree") == "error"


# ---- the service's reviewed export ---------------------------------------------------


def write_prefs_job(root: Path, records, recipe: dict) -> dict:
    from cai.export import export_prefs

    phase2 = Phase2Config().model_dump(mode="json")
    manifest = Manifest(stage="prefs", fingerprint="f", fingerprint_inputs={"phase2": phase2}, recipe=recipe)
    (root / "shards").mkdir(parents=True)
    (root / "manifest.json").write_text(manifest.model_dump_json())
    atomic_write_jsonl(root / "shards" / "prefs-000000.jsonl", records)
    export_prefs(JobStore.at(root), recipe["min_confidence"], recipe["require_consistent"], parquet=False)
    return {"id": "job-1", "dir": str(root), "kind": "prefs", "state": "completed", "recipe": json.dumps(recipe)}


def test_reviewed_export_keeps_human_labels_the_export_rules_left_out(tmp_path):
    pytest.importorskip("fastapi")
    from serve.results import export_file, page

    records = prefs_records(3, p=0.7)  # confidence 0.4 < 0.5: the pipeline exports none of them
    job = write_prefs_job(tmp_path / "job", records, {"min_confidence": 0.5, "require_consistent": True})
    assert (tmp_path / "job" / "prefs.jsonl").read_text() == ""
    flip, drop, _ = (r.id for r in records)
    reviews = [{"record_id": flip, "reviewer": "alice", "label": "flip", "note": None, "created_at": "t1"},
               {"record_id": drop, "reviewer": "alice", "label": "discard", "note": None, "created_at": "t2"}]
    path = export_file(job, "prefs.jsonl", reviews)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["metadata"]["id"] for r in rows] == [flip]
    assert rows[0]["chosen"][0]["content"] == records[0].rejected and rows[0]["score"] == 1.0
    card = (path.parent / "README.md").read_text()
    assert "| reviewed pairs the export rules had left out | 1 |" in card
    _, items = page(job, reviews, None, None, 0, 10)
    assert [item["exported"] for item in items] == [True, False, False]


# ---- trainers ------------------------------------------------------------------------


def test_trainers_drop_rows_a_reviewer_discarded(tmp_path):
    pytest.importorskip("trl")
    from cai.train.common import load_preferences
    from cai.train.dpo import prepare_dpo_data
    from cai.train.sft import prepare_sft_data

    rows = [preference_row(r) for r in prefs_records(3)]
    labels = ["discard", "flip", ""]
    reviewed = [{**r, "metadata": {**r["metadata"], "review": review(label).model_dump()}}
                for r, label in zip(rows, labels)]
    path = tmp_path / "prefs.jsonl"
    atomic_write_jsonl(path, reviewed)
    ds = load_preferences(path)
    assert [m["id"] for m in ds["metadata"]] == [rows[1]["metadata"]["id"], rows[2]["metadata"]["id"]]
    assert ds["score"] == pytest.approx([1.0, rows[2]["score"]])
    assert prepare_dpo_data(path)[2] == 1  # one human label left

    [sft] = run_phase1(sources(1), HARMLESS, FakeEngine(), Phase1Config(rounds=1))
    keep = sft_row(sft)
    discarded = {**keep, "metadata": {**keep["metadata"], "review": review("discard").model_dump()}}
    atomic_write_jsonl(tmp_path / "sft.jsonl", [discarded, {**keep, "metadata": {**keep["metadata"],
                                                                                 "review": review("agree").model_dump()}}])
    assert len(prepare_sft_data(tmp_path / "sft.jsonl")) == 1


def test_ppo_log_is_cut_back_to_the_checkpoint(tmp_path):
    pytest.importorskip("trl")
    from cai.train.ppo import truncate_log

    log = tmp_path / "log.jsonl"
    atomic_write_jsonl(log, [{"step": s, "reward": 0.1 * s} for s in (1, 2, 3)])
    assert [row["step"] for row in truncate_log(log, 2)] == [1, 2]
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]


# ---- the data card -------------------------------------------------------------------


def test_the_data_card_describes_the_jobs_own_judge(tmp_path):
    from cai.cards import prefs_data_card

    phase2 = Phase2Config(samples=2, judge=JudgeConfig(mode="structured", orders=1)).model_dump(mode="json")
    manifest = Manifest(stage="prefs", fingerprint="f", fingerprint_inputs={"phase2": phase2}, recipe={})
    store = JobStore(tmp_path, manifest)
    card = prefs_data_card(store, PreferenceStats(judge_modes={"structured": 3}), 0.0, True)
    assert "mode `structured`, one order" in card and "in one order" in card and "JSON verdict" in card
    assert "both orders" not in card and "log-probabilities" not in card
    assert "no consistency check" in card
    default = Phase2Config(samples=3).model_dump(mode="json")
    store.manifest = manifest.model_copy(update={"fingerprint_inputs": {"phase2": default}})
    card = prefs_data_card(store, PreferenceStats(judge_modes={"logprob": 2, "structured": 1}), 0.0, True)
    assert "in both orders" in card and "log-probabilities" in card and "best-vs-worst" in card
    assert "1 judged pairs used mode `structured` instead" in card


# ---- template hashes -----------------------------------------------------------------


def test_judge_template_hash_per_mode(monkeypatch):
    modes = ("logprob", "cot", "structured", "baseline")
    before = {m: prompts.judge_template_hash(m) for m in modes}
    assert len(set(before.values())) == 4 and before["baseline"] == prompts.BASELINE_TEMPLATE_HASH
    monkeypatch.setitem(prompts.JUDGE_MODE_TEMPLATES["cot"], "judge_tail_cot", "Think harder.")
    after = {m: prompts.judge_template_hash(m) for m in modes}
    assert [m for m in modes if after[m] != before[m]] == ["cot"]
    monkeypatch.setitem(prompts.JUDGE_MODE_TEMPLATES, "rubric", {"judge_tail_rubric": "Score each option."})
    assert {m: prompts.judge_template_hash(m) for m in modes} == after  # a new mode moves no other hash
    monkeypatch.setitem(prompts.JUDGE_SHARED_TEMPLATES, "quote_controls", "other rules")
    shared = {m: prompts.judge_template_hash(m) for m in modes}
    assert [m for m in modes if shared[m] != after[m]] == ["logprob", "cot", "structured"]
    with pytest.raises(ValueError, match="unknown judge mode"):
        prompts.judge_template_hash("nope")
