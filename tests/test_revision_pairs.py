"""Revision-vs-initial preference pairs from phase-1 SFT exports (cai.revision_pairs)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cai.cli import app
from cai.errors import CaiError
from cai.revision_pairs import revision_pairs
from cai.train.data import load_data


def step(kind: str, text: str, finish: str = "stop", principle: str | None = None) -> dict:
    return {"kind": kind, "principle_id": principle, "text": text, "finish_reason": finish,
            "prompt_tokens": 5, "completion_tokens": 5}


def sft_row(rid: str, steps: list[dict]) -> dict:
    final = [s for s in steps if s["kind"] == "revision"]
    return {"messages": [{"role": "user", "content": f"question {rid}"},
                         {"role": "assistant", "content": final[-1]["text"] if final else steps[0]["text"]}],
            "metadata": {"id": rid, "principle_ids": ["harm"], "constitution": {"name": "harmless", "version": "1.2.0"},
                         "prompt_group": "redteam", "model": {"id": "m"}, "seed": 0, "trajectory": steps}}


@pytest.fixture
def export(tmp_path):
    rows = [
        sft_row("a", [step("answer", "Sure, here is how."), step("critique", "harmful", principle="harm"),
                      step("revision", "I can't help with that, but here is a safe option.", principle="harm")]),
        sft_row("b", [step("answer", "Same text."), step("critique", "fine"), step("revision", " Same text. ")]),
        sft_row("c", [step("answer", "A long answer that was cut", finish="length"), step("critique", "x"),
                      step("revision", "Short.")]),
        sft_row("d", [step("answer", "Hi."), step("critique", "x"), step("revision", "Cut off", finish="length")]),
        sft_row("e", [step("answer", "Unrevised.")]),
        sft_row("f", [step("answer", "First."), step("critique", "x"), step("revision", "Second."),
                      step("critique", "y"), step("revision", "Third.")]),
    ]
    path = tmp_path / "job" / "sft.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_final_revision_is_chosen_over_the_initial_answer_and_skips_are_counted(export):
    rows, skipped = revision_pairs(export.parent)  # the job folder works as well as the file
    assert [r["metadata"]["parent_ids"] for r in rows] == [["a"], ["f"]]
    a, f = rows
    assert a["chosen"][0]["content"].startswith("I can't help") and a["rejected"][0]["content"] == "Sure, here is how."
    assert a["prompt"] == [{"role": "user", "content": "question a"}]
    assert (f["chosen"][0]["content"], f["rejected"][0]["content"]) == ("Third.", "First.")  # last round vs answer
    assert a["score"] == 1.0 and a["metadata"]["labeller"] == "revision"
    assert a["metadata"]["constitution"]["version"] == "1.2.0"
    assert skipped == {"revision_equals_answer": 1, "truncated": 2, "unrevised": 1}


def test_cli_writes_pairs_the_trainers_read(export, tmp_path):
    out = tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(app, ["jobs", "revision-pairs", str(export), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "2 pairs written" in result.output and "skipped 4" in result.output
    data = load_data(str(out))
    assert len(data) == 2 and {"prompt", "chosen", "rejected"} <= set(data.column_names)


def test_not_an_sft_export_is_named(tmp_path):
    bad = tmp_path / "prefs.jsonl"
    bad.write_text(json.dumps({"prompt": [], "chosen": [], "rejected": []}) + "\n")
    with pytest.raises(CaiError, match="prefs.jsonl:1: not an SFT export row"):
        revision_pairs(bad)
    with pytest.raises(CaiError, match="no SFT export"):
        revision_pairs(tmp_path / "missing")
