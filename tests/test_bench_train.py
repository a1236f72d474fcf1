"""`cai bench --train`: cai's trainers against plain TRL scripts, each run in its own process."""

from __future__ import annotations

import json
import os
import statistics

import pytest
from typer.testing import CliRunner

from cai.bench_train import TrainRun, compare, config_differences, schedule

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(trainer: str, runner: str, steps: list[float], peak: float, setup: float = 10.0, config=None) -> TrainRun:
    return TrainRun(trainer=trainer, runner=runner, step_seconds=steps, setup_seconds=setup, seconds=30.0,
                    peak_rss_mb=peak, config=config or {})


def test_schedule_alternates_which_runner_goes_first():
    assert schedule(["sft", "ppo", "dpo"], 2) == [
        ("sft", ("cai", "plain")), ("ppo", ("cai",)), ("dpo", ("plain", "cai")),
        ("sft", ("cai", "plain")), ("ppo", ("cai",)), ("dpo", ("plain", "cai"))]


def test_compare_takes_medians_over_every_step_and_run():
    runs = [run("sft", "cai", [1.0, 1.2, 1.1], 500, 8.0, {"lr": 1, "output_dir": "a"}),
            run("sft", "cai", [1.3], 520, 12.0),
            run("sft", "plain", [1.0, 1.0, 1.0], 500, 9.0, {"lr": 2, "output_dir": "b"}),
            run("sft", "plain", [0.9], 500, 9.0),
            run("ppo", "cai", [4.0, 6.0], 700)]
    sft = compare(runs, "sft")
    # cai: median(1.0, 1.2, 1.1, 1.3) = 1.15; plain: median(1.0, 1.0, 1.0, 0.9) = 1.0
    assert sft.cai_step_s == pytest.approx(1.15) and sft.plain_step_s == pytest.approx(1.0)
    assert sft.step_ratio == pytest.approx(1.15)
    assert (sft.cai_best_step_s, sft.plain_best_step_s, sft.best_step_ratio) == (1.0, 0.9, pytest.approx(1.0 / 0.9))
    assert sft.pair_ratios == [pytest.approx(1.1 / 1.0), pytest.approx(1.3 / 0.9)]  # run by run, in order
    assert sft.step_pair_ratio == pytest.approx(1.15)  # median of 1.0/1.0, 1.2/1.0, 1.1/1.0 and 1.3/0.9
    assert (sft.cai_peak_mb, sft.plain_peak_mb, sft.peak_ratio) == (510, 500, pytest.approx(1.02))
    assert (sft.cai_setup_s, sft.plain_setup_s) == (10.0, 9.0)
    assert sft.config_differences == ["lr: 1 != 2"]  # output_dir differs in every pair of runs: not reported
    ppo = compare(runs, "ppo")
    assert (ppo.cai_step_s, ppo.plain_step_s, ppo.step_ratio, ppo.peak_ratio) == (5.0, None, None, None)
    assert (ppo.cai_best_step_s, ppo.best_step_ratio, ppo.pair_ratios, ppo.step_pair_ratio) == (4.0, None, [], None)


def test_config_differences_name_missing_fields():
    assert config_differences({"a": 1, "run_name": "x"}, {"b": 2, "run_name": "y"}) == ["a: 1 != None", "b: None != 2"]


def test_cli_times_cai_and_plain_sft_on_the_tiny_model(tiny_chat_model, tmp_path):
    from cai.cli import app

    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--train", "--trainer", "sft", "--model", str(tiny_chat_model),
                                      "--train-steps", "2", "--train-batch-size", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [(r["trainer"], r["runner"]) for r in report["runs"]] == [("sft", "cai"), ("sft", "plain")]
    cai, plain = report["runs"]
    assert len(cai["step_seconds"]) == len(plain["step_seconds"]) == 2  # the steps after the warm-up
    # lock step: the two processes' timed steps alternate, cai first, and never overlap
    spans = sorted((start, end, run["runner"]) for run in (cai, plain) for start, end in run["step_spans"])
    assert [runner for *_, runner in spans] == ["cai", "plain", "cai", "plain"]
    assert all(end <= next_start for (_, end, _), (next_start, _, _) in zip(spans, spans[1:]))
    assert cai["peak_rss_mb"] > 100 and plain["peak_rss_mb"] > 100  # each child's own: torch alone is more
    [sft] = report["comparisons"]
    assert sft["step_ratio"] == pytest.approx(statistics.median(cai["step_seconds"]) / statistics.median(plain["step_seconds"]))
    assert sft["peak_ratio"] == pytest.approx(cai["peak_rss_mb"] / plain["peak_rss_mb"])
    assert cai["config"]["per_device_train_batch_size"] == 2 and cai["config"]["max_steps"] == 3
    assert sft["config_differences"] == []  # the plain script spells out exactly the config cai builds
    assert f"sft: cai / plain = {sft['step_ratio']:.3f} per step" in result.output


def test_unknown_trainer_is_refused(tiny_chat_model):
    from cai.cli import app

    result = CliRunner().invoke(app, ["bench", "--train", "--trainer", "grpo", "--model", str(tiny_chat_model)])
    assert result.exit_code != 0 and "grpo" in result.output


@pytest.mark.slow
def test_every_trainer_matches_its_plain_config(tiny_chat_model, tmp_path):
    from cai.bench_train import run_train_bench

    report = run_train_bench(str(tiny_chat_model), batch_size=2, steps=1, workdir=tmp_path)
    comparisons = {c.trainer: c for c in report.comparisons()}
    assert list(comparisons) == ["sft", "rm", "dpo", "ppo"]
    for name in ("sft", "rm", "dpo"):
        assert comparisons[name].config_differences == [], name
        assert comparisons[name].step_ratio > 0
    assert comparisons["ppo"].cai_step_s > 0 and comparisons["ppo"].plain_step_s is None
