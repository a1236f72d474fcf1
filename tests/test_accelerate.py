"""`cai train` under `accelerate launch`: the shipped accelerate configs load with accelerate's own
code, and two processes on this CPU (DDP over gloo) both train while only the main one writes.

On a CPU-only machine `accelerate launch --cpu --num_processes 2` starts ONE process (accelerate
runs several CPU processes only through mpirun and a hostfile): measured, metrics.json said
world_size 1. `--multi_gpu --num_processes 2` starts two through torchrun, and the Trainer, seeing
no CUDA, runs DDP over gloo on the CPU. So the launch tests use `--multi_gpu`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_jsonl

import cai

CONFIGS = Path(cai.__file__).parent / "recipes" / "accelerate"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
# Runs `cai` as `-m cai` does, after recording, per process, each call of the functions that write
# a trainer's outputs (and that the process trained), one line each in $CAI_TRACE.
TRACING_CAI = '''
import os, sys
import cai.train.common as common

def traced(name, fn):
    def call(*args, **kwargs):
        with open(os.environ["CAI_TRACE"], "a") as f:
            at = {"save_model": 2, "write_log_history": 1, "atomic_write_json": 0}.get(name)
            where = "-" if at is None else args[at]
            f.write(f"{os.environ.get('RANK', '0')} {name} {os.path.basename(str(where))}\\n")
        return fn(*args, **kwargs)
    return call

for name in ("run_trainer", "save_model", "write_log_history", "atomic_write_json"):
    setattr(common, name, traced(name, getattr(common, name)))
from cai.cli import main
sys.argv[0] = "cai"
main()
'''


def launch_config(name: str):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(CONFIGS / f"{name}.yaml"))


def validated_launch_args(name: str):
    """The `accelerate launch --config_file NAME.yaml --num_processes 8` arguments, as accelerate resolves them."""
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "--num_processes", "8", "x.py"])
    return _validate_launch_command(args)[0]


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("zero2", "DEEPSPEED"), ("zero3", "DEEPSPEED")])
def test_shipped_configs_load_with_accelerates_own_loader(name, kind):
    from accelerate.commands.launch import launch_command_parser

    config = launch_config(name)
    assert (config.distributed_type.value, config.mixed_precision, config.use_cpu) == (kind, "bf16", False)
    # accelerate copies a nested key onto the launch arguments without checking it: a misspelt one is ignored
    flags = {action.dest for action in launch_command_parser()._actions}
    nested = [k if k.startswith("fsdp") else f"fsdp_{k}" for k in config.fsdp_config] + list(config.deepspeed_config)
    assert [k for k in nested if k not in flags] == []


def test_deepspeed_configs_shard_as_named():
    zero2, zero3 = validated_launch_args("zero2"), validated_launch_args("zero3")
    assert zero2.use_deepspeed and zero3.use_deepspeed
    assert (zero2.zero_stage, zero3.zero_stage) == (2, 3)
    assert zero3.zero3_save_16bit_model and zero3.zero3_init_flag  # OUT is gathered into one HF folder
    assert not validated_launch_args("ddp").use_deepspeed


def test_fsdp_config_fully_shards_one_llama_decoder_layer_per_unit(tiny_chat_model, monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import ShardingStrategy, StateDictType
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    env = prepare_multi_gpu_env(validated_launch_args("fsdp"))
    assert (env["ACCELERATE_USE_FSDP"], env["ACCELERATE_MIXED_PRECISION"], env["FSDP_SYNC_MODULE_STATES"]) == ("true", "bf16", "true")
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")  # accelerate refuses it on a CPU-only machine
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert plugin.state_dict_type == StateDictType.FULL_STATE_DICT and plugin.use_orig_params
    assert not plugin.cpu_ram_efficient_loading
    plugin.set_auto_wrap_policy(AutoModelForCausalLM.from_pretrained(tiny_chat_model))
    assert plugin.auto_wrap_policy.keywords["transformer_layer_cls"] == {LlamaDecoderLayer}


# ---- only the main process writes ----------------------------------------------------


class FakeAccelerator:
    def __init__(self, main: bool):
        self.is_main_process, self.barriers = main, 0

    def wait_for_everyone(self):
        self.barriers += 1

    def unwrap_model(self, model):
        return model


class FakeTrainer:
    """What run_trainer reads of a TRL trainer after DDP training on 2 processes."""

    is_fsdp_enabled = is_deepspeed_enabled = False

    def __init__(self, main: bool):
        from types import SimpleNamespace

        self.accelerator = FakeAccelerator(main)
        self.args = SimpleNamespace(world_size=2, per_device_train_batch_size=4, gradient_accumulation_steps=3)
        self.state = SimpleNamespace(global_step=3, log_history=[{"loss": 1.0, "step": 3}])
        self.model = "a model"

    def train(self, resume_from_checkpoint=None):
        from types import SimpleNamespace

        return SimpleNamespace(metrics={"train_loss": 1.0})


@pytest.mark.parametrize("main", [True, False])
def test_run_trainer_writes_on_the_main_process_only(tmp_path, monkeypatch, main):
    from cai.train import common

    saved = []
    monkeypatch.setattr(common, "save_model", lambda model, tok, out, end_ids: saved.append(out))
    trainer = FakeTrainer(main)
    metrics = common.run_trainer(trainer, None, tmp_path, False, None, {"trainer": "sft"})
    assert metrics == {"trainer": "sft", "world_size": 2, "resumed_from": None, "global_batch_size": 24,
                       "global_step": 3, "train_loss": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == (["log.jsonl", "metrics.json"] if main else [])
    assert saved == ([tmp_path] if main else [])
    assert trainer.accelerator.barriers == 1  # no process returns before the main one has written


def test_sharded_lora_model_is_saved_through_trl_and_merged(tiny_chat_model, tmp_path):
    """FSDP / DeepSpeed: TRL's save_model gathers the adapter; the main process merges it into a fresh base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cai.train import common

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)  # B != 0: merging changes W
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_chat_model), lora)

    class ShardedTrainer:
        is_fsdp_enabled, is_deepspeed_enabled = True, False
        accelerator = FakeAccelerator(True)

        def __init__(self):
            self.model, self.saved_to = model, []

        def save_model(self, output_dir):  # Trainer.save_model, after gathering the full state dict
            self.saved_to.append(output_dir)
            self.model.save_pretrained(output_dir)

    trainer, out = ShardedTrainer(), tmp_path / "out"
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    end_ids = common.check_chat_format(tokenizer)
    common.save_trained(trainer, tokenizer, out, end_ids, {"trainer": "sft", "model": str(tiny_chat_model)})
    assert trainer.saved_to == [str(out / "adapter")]
    merged = model.merge_and_unload().state_dict()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.allclose(reloaded.state_dict()[k], v) for k, v in merged.items())
    assert not torch.allclose(reloaded.state_dict()["model.layers.0.mlp.up_proj.weight"],
                              AutoModelForCausalLM.from_pretrained(tiny_chat_model).state_dict()["model.layers.0.mlp.up_proj.weight"])
    assert reloaded.generation_config.eos_token_id in (end_ids, end_ids[0])


# ---- two processes on this CPU -----------------------------------------------------


def chat(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": text}]


def launch(tmp_path: Path, command: list[str], trace: Path | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch` of `cai COMMAND...` (through TRACING_CAI when `trace`), CPU only."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "CAI_TRACE": str(trace or "")}
    if trace is None:
        target = ["-m", "cai"]
    else:
        script = tmp_path / "tracing_cai.py"
        script.write_text(TRACING_CAI)
        target = [str(script)]
    proc = subprocess.run([*LAUNCH, *target, *command], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def trace_lines(trace: Path) -> list[tuple[str, str, str]]:
    return sorted(tuple(line.split()) for line in trace.read_text().splitlines())


def assert_written_once_by_rank0(trace: Path) -> None:
    """Both processes trained; rank 0 alone saved the model, log.jsonl and metrics.json, once each."""
    lines = trace_lines(trace)
    assert [(r, name) for r, name, _ in lines if name == "run_trainer"] == [("0", "run_trainer"), ("1", "run_trainer")]
    writes = [line for line in lines if line[1] != "run_trainer"]
    assert writes == [("0", "atomic_write_json", "metrics.json"), ("0", "save_model", "out"),
                      ("0", "write_log_history", "out")]


def assert_no_stray_files(out: Path) -> None:
    """No temp file left behind; the only per-rank files are TRL's checkpoint RNG states, one per rank."""
    names = [p.relative_to(out).as_posix() for p in out.rglob("*")]
    assert [n for n in names if "/." in f"/{n}" or "tmp" in n] == []
    for checkpoint in out.glob("checkpoint-*"):
        per_rank = sorted(p.name for p in checkpoint.iterdir() if "rank" in p.name or "rng_state" in p.name)
        assert per_rank == ["rng_state_0.pth", "rng_state_1.pth"]


def test_sft_on_two_processes_writes_once_and_resumes(tiny_chat_model, tmp_path):
    rows = [{"messages": chat("user", q) + chat("assistant", a)}
            for q, a in [("hello how are you", "fine thanks"), ("write a poem", "sure a poem about a cat")] * 4]
    data, out, trace = write_jsonl(tmp_path / "sft.jsonl", rows), tmp_path / "out", tmp_path / "trace.txt"
    common = ["train", "sft", "--data", str(data), "--model", str(tiny_chat_model), "--out", str(out), "--batch-size", "2"]
    launch(tmp_path, [*common, "--max-steps", "1", "--trl", "save_steps=1"], trace)
    assert_written_once_by_rank0(trace)
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (out / "checkpoint-1").glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]

    # the real entry point, resuming: 8 rows at 2 per process and 2 processes make an epoch of
    # 8 / (2 x 2) = 2 steps (one process alone would take 4); step 1 comes from checkpoint-1
    launch(tmp_path, [*common, "--epochs", "1", "--resume"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["global_batch_size"], metrics["global_step"]) == (2, 4, 2)
    assert metrics["resumed_from"] == str(out / "checkpoint-1")
    steps = [row["step"] for row in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in row]
    assert steps == [1, 2]  # TRL's history, carried over from the checkpoint, once per step
    assert_no_stray_files(out)


def test_dpo_on_two_processes_writes_once(tiny_chat_model, tmp_path):
    rows = [{"prompt": chat("user", "please help me"), "chosen": chat("assistant", "sure i will help"),
             "rejected": chat("assistant", "no"), "score": 0.9, "margin": 0.8} for _ in range(8)]
    data, out, trace = write_jsonl(tmp_path / "pref.jsonl", rows), tmp_path / "out", tmp_path / "trace.txt"
    launch(tmp_path, ["train", "dpo", "--data", str(data), "--model", str(tiny_chat_model), "--out", str(out),
                      "--batch-size", "2", "--epochs", "1", "--trl", "save_strategy=\"no\""], trace)
    assert_written_once_by_rank0(trace)
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["global_batch_size"], metrics["global_step"]) == (2, 4, 2)  # 8 pairs / 4
    assert [row["step"] for row in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in row] == [1, 2]
    assert_no_stray_files(out)
