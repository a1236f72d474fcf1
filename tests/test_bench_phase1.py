"""`cai bench` on the fake engine: what each run counts, per-step requests and finished trajectories,
and the warning when trajectories do not complete."""

from __future__ import annotations

import json

from helpers import HARMLESS
from typer.testing import CliRunner

from cai.bench import run_bench
from cai.cli import app
from cai.constitution import load_constitution
from cai.engine.fake import FakeEngine
from cai.recipe import Phase1Config
from cai.records import Message, SamplingParams, SourcePrompt


def scripted(chat, params) -> str:
    last = chat[-1].content
    if last.startswith(("Critique request:", "Revision request:")):
        return "a short step"
    return "an answer" + (" that goes on and on" * 10 if "long" in last else "")


def sources(texts) -> list[SourcePrompt]:
    return [SourcePrompt(id=f"s{i}", messages=[Message(role="user", content=t)], source="t") for i, t in enumerate(texts)]


def test_bench_counts_calls_requests_and_steps_of_each_run():
    engine = FakeEngine(scripted, finish_order_seed=1)
    params = SamplingParams(max_tokens=20)
    config = Phase1Config(rounds=1, answer=params, critique=params, revision=params)
    report = run_bench(engine, sources(["q0", "long q1", "q2", "q3", "q4", "q5"]), load_constitution(HARMLESS),
                       config, naive_prompts=2)
    # Step-batched: one call per step; replayed as is; continuous and steady state count requests.
    assert report.cai["steps"].calls == report.bare_engine.calls == 3
    assert report.cai["continuous"].calls == report.steady_state.calls == 6 + 5 + 5
    assert report.cai["steps"].generated_tokens == report.cai["continuous"].generated_tokens \
        == report.bare_engine.generated_tokens == report.steady_state.generated_tokens > 0
    assert [(s.step, s.requests, s.ended_with_error) for s in report.steps] == \
        [("answer", 6, 1), ("critique 1", 5, 0), ("revision 1", 5, 0)]
    assert report.completed == 5 and round(report.completed_share, 2) == 0.83
    assert report.naive_loop.calls == 3 + 1 and report.naive_loop.prompts == 2  # q1's answer ends it
    ratios = report.ratios()
    assert ratios["cai_vs_steady_state"] == report.cai["steps"].tokens_per_second / report.steady_state.tokens_per_second
    assert set(ratios) == {"cai_vs_bare", "cai_vs_steady_state", "cai_vs_naive", "continuous_vs_steps"}


def test_cli_bench_says_how_many_trajectories_completed_and_warns_below_80_percent(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["bench", "--engine", "fake", "--limit", "5", "--naive-prompts", "1",
                             "--out", str(tmp_path / "ok.json")])
    assert ok.exit_code == 0, ok.output
    text = " ".join(ok.output.split())  # rich wraps long lines
    assert "trajectories completed: 5/5 (100%)" in text and "below" not in text
    assert "temperature 0.7 (seed 0); system turn: 'You are a helpful assistant. Keep every reply short" in text
    report = json.loads((tmp_path / "ok.json").read_text())
    assert report["completed_share"] == 1.0 and report["steps"][1]["requests"] == 5
    assert {"cai_vs_bare", "cai_vs_steady_state", "cai_vs_naive", "continuous_vs_steps"} <= set(report)

    cut = runner.invoke(app, ["bench", "--engine", "fake", "--limit", "5", "--naive-prompts", "1",
                              "--max-tokens", "2", "--schedule", "steps"])
    assert cut.exit_code == 0, cut.output
    assert "trajectories completed: 0/5 (0%): below 80%" in " ".join(cut.output.split())
    assert "continuous / steps" not in cut.output


def test_cli_bench_judge_reports_pairs_per_second_per_mode(tmp_path):
    data = tmp_path / "hh.jsonl"
    rows = [{"chosen": f"\n\nHuman: question {i}?\n\nAssistant: a kind answer {i}",
             "rejected": f"\n\nHuman: question {i}?\n\nAssistant: a rude answer {i}"} for i in range(3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(app, ["bench", "--engine", "fake", "--engine-option", "chooser=uniform", "--judge", str(data),
                                      "--limit", "3", "--judge-mode", "logprob", "--out", str(tmp_path / "j.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "j.json").read_text())
    [run] = report["runs"]
    assert run["mode"] == "logprob" and run["pairs"] == 3 and run["requests"] == 6  # both orders
