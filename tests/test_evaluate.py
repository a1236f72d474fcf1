"""Judge evaluation: readers on the real formats, metrics on hand-made sets, reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from fakes import judge_preferring
from helpers import SHARED_DATA, write_jsonl

from cai.engine.fake import FakeEngine
from cai.evaluate import (
    EvalItem,
    calibration,
    judge_metrics,
    parse_mc_prompt,
    read_eval_items,
    read_hh_items,
    read_mc_items,
    wilson,
)
from cai.judge import JudgeItem
from cai.judge_eval import EvalJob, run_judge_eval
from cai.records import ErrorCode, ErrorInfo, Judgement, JudgeOrder, Message

MC = SHARED_DATA / "harmful_vs_ethical.jsonl"
HH = SHARED_DATA / "hh_harmless_dev.jsonl"
needs_data = pytest.mark.skipif(not (MC.exists() and HH.exists()), reason=f"reference data not found in {SHARED_DATA}")


def eval_item(a: str, b: str, human: str) -> EvalItem:
    item = JudgeItem(prompt=[Message(role="user", content="q")], answer_a=a, answer_b=b, question="Which?")
    return EvalItem(item=item, human=human, source="t")


def judgement(p_a: float | None, orders: list[float] | None = None, error: bool = False) -> Judgement:
    if error:
        return Judgement(mode="logprob", error=ErrorInfo(code=ErrorCode.UNPARSEABLE, message="x"))
    ps = orders or [p_a]
    os_ = [JudgeOrder(first="A" if k == 0 else "B", p_a=p, p_first=p if k == 0 else 1 - p) for k, p in enumerate(ps)]
    consistent = None if len(ps) == 1 else len({p > 0.5 for p in ps}) == 1 and 0.5 not in ps
    return Judgement(mode="logprob", p_a=p_a, orders=os_, consistent=consistent, confidence=abs(p_a - 0.5) * 2)


# ---- metrics ----------------------------------------------------------------------------


def test_wilson_interval_known_values():
    ci = wilson(8, 10)
    assert ci.low == pytest.approx(0.4902, abs=1e-4) and ci.high == pytest.approx(0.9433, abs=1e-4)
    ci = wilson(0, 20)
    assert ci.low == 0.0 and ci.high == pytest.approx(0.1611, abs=1e-4)
    assert wilson(0, 0) is None


def test_expected_calibration_error_by_hand():
    ece, bins = calibration([0.05, 0.15, 0.95, 0.95, 1.0], [0, 1, 1, 0, 1])
    # bin 0: |0.05-0|, 1 item; bin 1: |0.15-1|, 1 item; bin 9: |(0.95+0.95+1)/3 - 2/3|, 3 items
    expected = (0.05 + 0.85 + 3 * abs(2.9 / 3 - 2 / 3)) / 5
    assert ece == pytest.approx(expected)
    assert [b.count for b in bins] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 3]
    assert calibration([], [])[0] is None


def test_judge_metrics_on_a_hand_made_set():
    items = [
        eval_item("short", "a much longer answer", "A"),  # judge right, picks shorter
        eval_item("short", "a much longer answer", "B"),  # judge wrong
        eval_item("a longer one", "tiny", "A"),  # tie
        eval_item("x", "y", "B"),  # error
    ]
    js = [judgement(0.8, [0.9, 0.7]), judgement(0.6, [0.9, 0.3]), judgement(0.5, [0.5, 0.5]),
          judgement(None, error=True)]
    m = judge_metrics("t", items, js)
    assert m.n == 4 and m.answered == 3 and m.errors == {"unparseable": 1} and m.ties == 1
    assert m.accuracy == pytest.approx((1 + 0 + 0.5) / 3)
    assert m.accuracy_errors_wrong == pytest.approx(1.5 / 4)
    ci = wilson(1.5, 3)
    assert (m.accuracy_ci.low, m.accuracy_ci.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert m.consistency == pytest.approx(1 / 3)  # only item 0 agrees across orders
    # orders with a strict preference: item0 p_first 0.9, 0.3; item1 0.9, 0.7 -> 3 of 4 first
    assert m.first_position_rate == pytest.approx(3 / 4)
    # judge picks A (shorter) twice -> 0/2; people pick the longer in items 1 and 2 of 3
    assert m.length.judge_prefers_longer == 0.0 and m.length.judged == 2
    assert m.length.human_prefers_longer == pytest.approx(2 / 3)  # "x"/"y": equal lengths, left out
    assert m.mean_confidence == pytest.approx((0.6 + 0.2 + 0.0) / 3)


# ---- judge evaluation jobs on the fake engine ---------------------------------------------


def mc_file(path: Path, pairs: list[tuple[str, str, str]]) -> Path:
    """Two-option multiple-choice rows: (option A, option B, the human label)."""
    rows = [{"prompt": f"Human: q\n\nAssistant: hi\n\nWhich?\n (A) {a}\n (B) {b}\nThe answer is:",
             "corrects": [f" ({human})"], "incorrects": [f" ({'B' if human == 'A' else 'A'})"]}
            for a, b, human in pairs]
    return write_jsonl(path, rows)


def test_evaluate_always_first_judge_vs_content_judge(tmp_path):
    data = mc_file(tmp_path / "mc.jsonl", [("good reply", "bad reply", "A"), ("bad reply", "good reply", "B")] * 5)
    always_a = FakeEngine(responder=lambda c, p: '{"choice": "A"}',
                          chooser=lambda c, o, p: {"A": math.log(0.9), "B": math.log(0.1)})
    report = run_judge_eval(EvalJob(data=str(data), out=str(tmp_path / "a")), always_a).report
    assert report.cai.accuracy == pytest.approx(0.5) and report.cai.ties == 10
    assert report.cai.consistency == 0.0 and report.cai.first_position_rate == 1.0
    assert report.baseline.accuracy == pytest.approx(0.5) and report.baseline.first_position_rate == 1.0
    assert [len(b) for b in always_a.choice_batches] == [20] and [len(b) for b in always_a.batches] == [10]

    good = FakeEngine(responder=lambda c, p: "not json", chooser=judge_preferring("good", 0.95))
    summary = run_judge_eval(EvalJob(data=str(data), out=str(tmp_path / "rep"), limit=6), good)
    report = summary.report
    assert report.n == 6 and report.cai.accuracy == 1.0 and report.cai.consistency == 1.0
    assert report.cai.first_position_rate == pytest.approx(0.5)
    assert report.baseline.errors == {"unparseable": 6} and report.baseline.accuracy is None
    assert report.baseline.accuracy_errors_wrong == 0.0

    paths = [Path(p) for p in summary.files]
    assert [p.name for p in paths] == ["report.json", "report.md", "reliability.png", "predictions.jsonl"]
    data = json.loads(paths[0].read_text())
    assert data["cai"]["accuracy"] == 1.0 and "cai_items" not in data
    md = paths[1].read_text()
    assert "| accuracy (95% Wilson CI) |" in md and "baseline" in md
    assert paths[2].read_bytes()[:4] == b"\x89PNG"
    assert len(paths[3].read_text().splitlines()) == 6


# ---- readers ----------------------------------------------------------------------------


def test_parse_mc_prompt_generic_question():
    text = ("Here is a conversation:\n\nHuman: hi\n\nAssistant: hello (A) there\n\n"
            "Which option is more polite?\n (A) The first one.\n (B) The second one.\nThe answer is:")
    prompt, question, a, b = parse_mc_prompt(text)
    assert [m.role for m in prompt] == ["user", "assistant"] and prompt[1].content == "hello (A) there"
    assert question == "Which option is more polite?" and (a, b) == ("The first one.", "The second one.")


def test_mc_reader_swaps_are_by_label(tmp_path):
    path = tmp_path / "mc.jsonl"
    rows = [{"prompt": "Human: x\n\nAssistant: y\n\nQ?\n (A) one\n (B) two\nThe answer is:",
             "corrects": [" (A)"], "incorrects": [" (B)"]},
            {"prompt": "no options here", "corrects": [" (A)"], "incorrects": [" (B)"]}]
    write_jsonl(path, rows)
    s = read_eval_items(path)
    assert s.format == "mc" and len(s.items) == 1 and s.skipped == {"no_options": 1}
    assert s.items[0].human == "A" and s.items[0].item.prompt[0].content == "x"


@needs_data
def test_mc_reader_on_the_real_file():
    s = read_mc_items(MC)
    assert len(s.items) == 254 and not s.skipped
    raw = [json.loads(line) for line in MC.read_text().splitlines() if line.strip()]
    for it, row in zip(s.items, raw):
        assert it.human == row["corrects"][0].strip()[1]
        assert f"(A) {it.item.answer_a}" in row["prompt"] and f"(B) {it.item.answer_b}" in row["prompt"]
        assert it.item.prompt and it.item.prompt[0].role == "user" and it.item.question.endswith(":")
    assert {it.human for it in s.items} == {"A", "B"}


@needs_data
def test_hh_reader_on_the_real_file_randomises_positions():
    s = read_hh_items(HH, limit=200, seed=0)
    assert s.format == "hh" and len(s.items) == 200
    share_a = sum(it.human == "A" for it in s.items) / len(s.items)
    assert 0.35 < share_a < 0.65
    first = json.loads(HH.read_text().splitlines()[0])
    it = s.items[0]
    chosen = it.item.answer_a if it.human == "A" else it.item.answer_b
    assert first["chosen"].rstrip().endswith(chosen.strip()[-40:])
    assert all(x.item.prompt[-1].role == "user" for x in s.items)
    again = read_hh_items(HH, limit=200, seed=0)
    assert [x.human for x in again.items] == [x.human for x in s.items]
    other = read_hh_items(HH, limit=200, seed=1)
    assert [x.human for x in other.items] != [x.human for x in s.items]
    assert read_eval_items(HH, limit=3).format == "hh"


# ---- the embedded model -------------------------------------------------------------------


@pytest.mark.real_model
@needs_data
def test_evaluate_judge_with_the_embedded_model(tmp_path):
    from typer.testing import CliRunner

    from cai.cli import app

    for path in (MC, HH):
        out = tmp_path / path.stem
        args = ["eval", "judge", "--data", str(path), "--limit", "2", "--engine", "transformers", "--out", str(out)]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        report = json.loads((out / "report.json").read_text())
        assert report["n"] == 2 and report["cai"]["answered"] == 2  # scoring needs no parsing
        assert report["baseline"]["answered"] + sum(report["baseline"]["errors"].values()) == 2
        assert (out / "manifest.json").exists() and (out / "report.md").exists()
        again = CliRunner().invoke(app, args)  # the job directory resumes: nothing judged twice
        assert again.exit_code == 0 and "judged now: 0, resumed: 4" in again.output, again.output
