"""`cai train ppo` under `accelerate launch`: DDP on two CPU processes (both sample their own
prompts and train, the weights stay identical, only rank 0 writes, resume works), and a clear
refusal of FSDP and DeepSpeed.

As in test_accelerate.py: on a CPU-only machine `--cpu --num_processes 2` starts one process, so the
launch uses `--multi_gpu` (torchrun), and PPO's Accelerator(cpu=True) runs DDP over gloo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_jsonl

from cai.train import TrainError, train_ppo

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
# `cai` as `-m cai` runs it, after wrapping, per process, what writes PPO's outputs and what each
# step samples: one line each in $CAI_TRACE ("RANK NAME DETAIL").
TRACING_CAI = '''
import json, os, sys
import cai.train.ppo as ppo

def traced(name, fn, detail):
    def call(*args, **kwargs):
        with open(os.environ["CAI_TRACE"], "a") as f:
            f.write(f"{os.environ.get('RANK', '0')} {name} {detail(*args)}\\n")
        return fn(*args, **kwargs)
    return call

ppo.rollout = traced("rollout", ppo.rollout, lambda run, chats: json.dumps([c[-1]["content"] for c in chats], separators=(",", ":")).replace(" ", "_"))
for name in ("atomic_write_json", "atomic_write_jsonl"):
    setattr(ppo, name, traced(name, getattr(ppo, name), lambda path, *a: os.path.basename(str(path))))
ppo.save_checkpoint = traced("save_checkpoint", ppo.save_checkpoint, lambda run, out, step, *a: step)
ppo.save_outputs = traced("save_outputs", ppo.save_outputs, lambda run, out: "-")
from cai.cli import main
sys.argv[0] = "cai"
main()
'''
REWARDS = '''
def first_yes(prompts, completions):
    return [1.0 if text.split()[:1] == ["yes"] else 0.0 for text in completions]
'''
PROMPTS = ["please help me", "tell me a story", "can you help", "write a poem", "hello how are you", "why is the cat bad"]


def launch(tmp_path: Path, command: list[str], trace: Path) -> None:
    script, rewards = tmp_path / "tracing_cai.py", tmp_path / "ppo_rewards.py"
    script.write_text(TRACING_CAI)
    rewards.write_text(REWARDS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "CAI_TRACE": str(trace), "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([*LAUNCH, str(script), *command], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def traced(trace: Path) -> list[tuple[str, str, str]]:
    lines = [tuple(line.split(" ", 2)) for line in trace.read_text().splitlines()]
    trace.unlink()
    return lines


def test_ppo_on_two_processes_trains_writes_once_and_resumes(tiny_chat_model, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    out, trace = tmp_path / "out", tmp_path / "trace.txt"
    command = ["train", "ppo", "--data", str(data), "--model", str(tiny_chat_model), "--out", str(out),
               "--reward-fn", "ppo_rewards:first_yes", "--batch-size", "4", "--max-steps", "2",
               "--set", "minibatch_size=2", "--set", "max_new_tokens=8", "--set", "save_steps=1", "--set", "ppo_epochs=2"]
    launch(tmp_path, command, trace)
    lines = traced(trace)
    rollouts = {rank: [json.loads(d) for r, name, d in lines if r == rank and name == "rollout"] for rank in "01"}
    assert [len(rollouts[r]) for r in "01"] == [3, 3]  # one warm-up batch and two steps each
    assert all(len(prompts) == 4 for r in "01" for prompts in rollouts[r])
    assert rollouts["0"][1] != rollouts["1"][1]  # each process samples its own slice of the step's prompts
    writes = sorted((r, name, d) for r, name, d in lines if name != "rollout")
    assert writes == [("0", "atomic_write_json", "metrics.json"), ("0", "atomic_write_json", "ppo_config.json")] + [
        ("0", "atomic_write_jsonl", "log.jsonl")] * 2 + [
        ("0", "save_checkpoint", "1"), ("0", "save_checkpoint", "2"), ("0", "save_outputs", "-")]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps_run"] == 2
    assert metrics["weights_in_sync"] is True  # gradients were averaged: different samples, same weights
    assert metrics["reward_norm"]["count"] == 3 * 8  # the moments saw both processes' scores
    assert [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())] == [1, 2]

    launch(tmp_path, command[:-10] + ["--max-steps", "3"] + command[-8:] + ["--resume"], trace)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-2") and metrics["steps_run"] == 1
    assert metrics["reward_norm"]["count"] == 4 * 8 and metrics["weights_in_sync"] is True
    assert [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())] == [1, 2, 3]
    assert [d for r, name, d in traced(trace) if name == "save_checkpoint"] == ["3"]


@pytest.mark.parametrize("var, name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_sharded_launch_is_refused_before_loading(tmp_path, monkeypatch, var, name):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(var, "true")
    with pytest.raises(TrainError, match=f"not {name}.*ddp"):
        train_ppo(tmp_path / "no-data.jsonl", str(tmp_path / "no-model"), tmp_path / "out", reward_fn=lambda p, c: [0.0])
