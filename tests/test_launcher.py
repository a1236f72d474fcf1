"""`launcher:` in a recipe: its training stages run under `accelerate launch`, the others in one process.

The command is checked against accelerate's own argument parser (fast); one real training stage
runs under the launcher on two CPU processes (slow). As in test_accelerate.py, the CPU launch uses a
MULTI_GPU config: on a machine without CUDA, accelerate's torchrun starts the processes and the
Trainer runs DDP over gloo.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_jsonl

from cai import runner
from cai.runner import RecipeError, RunRecipe, load_recipe, plan_stages, run_recipe
from cai.stage_jobs import write_job_file
from cai.train import TrainError
from cai.train.jobs import SFTTrainJob
from cai.train.launch import SHIPPED_CONFIGS, Launcher, shown

DATA = {"phase1": {"prompts": ["redteam"], "limit": 2}, "phase2": {"prompts": ["benign"], "limit": 2}}
CPU_DDP = """compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
mixed_precision: 'no'
num_machines: 1
machine_rank: 0
gpu_ids: all
rdzv_backend: static
same_network: true
use_cpu: false
"""


def launched_stages(recipe: RunRecipe, tmp_path: Path, monkeypatch) -> dict[str, list[str]]:
    """Stage -> the command `cai run` started for it (each a real process: `true`)."""
    commands = {}
    real = subprocess.Popen

    def popen(command, **kwargs):
        commands[Path(command[-1]).parent.name] = command
        return real(["true"], **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)
    run_recipe(recipe, tmp_path, log=lambda *_: None)
    return commands


def test_training_stages_run_under_accelerate_launch_and_the_others_alone(tmp_path, monkeypatch):
    recipe = RunRecipe(name="t", **DATA, launcher={"accelerate_config": "ddp", "num_processes": 4})
    commands = launched_stages(recipe, tmp_path, monkeypatch)
    ddp = str(SHIPPED_CONFIGS / "ddp.yaml")
    for stage in ("02-sft", "05-policy"):
        assert commands[stage] == [sys.executable, "-m", "accelerate.commands.launch", "--config_file", ddp,
                                   "--num_processes", "4", "-m", "cai", "run", str(tmp_path / stage / "job.json")]
    for stage in ("01-sft-data", "03-prefs", "07-eval"):
        assert commands[stage] == [sys.executable, "-m", "cai", "run", str(tmp_path / stage / "job.json")]
    state = json.loads((tmp_path / "run.json").read_text())
    assert state["stages"]["02-sft"]["command"][:2] == ["accelerate", "launch"]
    assert state["stages"]["01-sft-data"]["command"] == ["cai", "run", str(tmp_path / "01-sft-data" / "job.json")]
    assert state["recipe"]["launcher"]["accelerate_config"] == "ddp"


def test_launched_command_is_what_accelerate_parses(tmp_path):
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )

    launcher = Launcher(accelerate_config="fsdp", num_processes=8, args=["--main_process_port", "29501"])
    command = launcher.command(["-m", "cai", "run", "job.json"])
    args, *_ = _validate_launch_command(launch_command_parser().parse_args(command[3:]))
    assert (args.num_processes, args.use_fsdp, args.main_process_port, args.module) == (8, True, 29501, True)
    assert (args.training_script, args.training_script_args) == ("cai", ["run", "job.json"])
    assert shown(command)[:2] == ["accelerate", "launch"] and shown([sys.executable, "-m", "cai", "x"]) == ["cai", "x"]


def test_only_the_stages_named_are_launched(tmp_path, monkeypatch):
    recipe = RunRecipe(name="t", **DATA, method="ppo", launcher={"accelerate_config": "ddp", "num_processes": 2,
                                                                 "stages": ["rm"]})
    commands = launched_stages(recipe, tmp_path, monkeypatch)
    assert [stage for stage, command in commands.items() if "accelerate.commands.launch" in command] == ["04-rm"]


def test_unset_num_processes_counts_the_gpus(monkeypatch):
    import torch

    launcher = Launcher(accelerate_config="ddp")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert launcher.command(["x.py"])[5:7] == ["--num_processes", "3"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(TrainError, match="no CUDA GPU is visible; set launcher.num_processes"):
        launcher.command(["x.py"])


@pytest.mark.parametrize("launcher, message", [
    ({"accelerate_config": "nope"}, "accelerate config 'nope': no such file, and not a shipped config (ddp, fsdp, zero2, zero3)"),
    ({"accelerate_config": "ddp", "stages": ["grpo"]}, "launcher.stages.0"),
    ({"accelerate_config": "ddp", "num_processes": 0}, "launcher.num_processes"),
])
def test_bad_launcher_fails_at_load_naming_the_field(tmp_path, launcher, message):
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps({"name": "r", "launcher": launcher}))
    with pytest.raises(RecipeError, match=re.escape(message)) as info:
        load_recipe(path)
    assert str(path) in str(info.value)


def test_ppo_is_refused_a_sharded_launcher_at_load(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\nmethod: ppo\nlauncher: {accelerate_config: fsdp}\n")
    with pytest.raises(RecipeError, match="launcher: PPO runs on one process or with DDP, not FSDP"):
        load_recipe(path)
    # without ppo among its stages, or for another method, the same launcher is fine
    RunRecipe(name="t", method="ppo", launcher={"accelerate_config": "fsdp", "stages": ["sft", "rm"]})
    RunRecipe(name="t", method="dpo", launcher={"accelerate_config": "fsdp"})


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed")
def test_deepspeed_config_without_deepspeed_says_what_to_install():
    with pytest.raises(TrainError, match="zero3 runs DeepSpeed, which is not installed: pip install deepspeed"):
        Launcher(accelerate_config="zero3", num_processes=2).command(["x.py"])


def test_gpu_recipe_trains_under_ddp_on_every_gpu(tmp_path):
    recipe = load_recipe("gpu-7b")
    assert (recipe.launcher.accelerate_config, recipe.launcher.num_processes) == ("ddp", None)
    jobs = dict(plan_stages(recipe, tmp_path))
    assert [name for name, job in jobs.items() if runner._launcher(recipe, job)] == ["02-sft", "05-policy"]


@pytest.mark.slow
def test_a_training_stage_runs_on_two_cpu_processes_under_the_launcher(tiny_chat_model, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "cpu-ddp.yaml").write_text(CPU_DDP)
    launcher = Launcher(accelerate_config=str(tmp_path / "cpu-ddp.yaml"), num_processes=2,
                        args=["--main_process_port", "0"])
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in [("hello how are you", "fine thanks"), ("write a poem", "sure a poem about a cat")] * 4]
    out = tmp_path / "run" / "02-sft"
    job = SFTTrainJob(data=str(write_jsonl(tmp_path / "sft.jsonl", rows)), model=str(tiny_chat_model), out=str(out),
                      batch_size=2, epochs=1, trl={"save_strategy": "no"})
    job_file = write_job_file(out / "job.json", job)
    result = runner.run_stage("02-sft", job_file, tmp_path / "run", lambda line: None, launcher=launcher)
    assert result.command[:2] == ["accelerate", "launch"] and result.command[-3:] == ["cai", "run", str(job_file)]
    metrics = json.loads((out / "metrics.json").read_text())
    # 8 rows, 2 per process on 2 processes: 2 steps (one process alone would take 4)
    assert (metrics["world_size"], metrics["global_batch_size"], metrics["global_step"]) == (2, 4, 2)
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)] == [1, 2]
