"""`cai train sft|rm|dpo|ppo`: the trainers from the command line.

Common flags map onto the trainer's config (TRL's for sft/rm/dpo, cai's
PPOConfig for ppo); `--trl KEY=VALUE` (repeatable, VALUE parsed as JSON when
it parses) sets any other field of that config and wins over the common flags.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from cai.cli.common import parse_pairs

app = typer.Typer(
    help="Train on cai's datasets: SFT, reward model and DPO (thin over TRL), PPO (cai's own).",
    no_args_is_help=True,
)
console = Console()
err_console = Console(stderr=True)

ModelOpt = Annotated[Optional[str], typer.Option(help="model folder; default: the embedded SmolLM2-135M-Instruct")]
DataOpt = Annotated[Path, typer.Option(help="dataset: .jsonl/.parquet file, cai export folder, or save_to_disk folder")]
LoraOpt = Annotated[bool, typer.Option("--lora/--no-lora", help="train a LoRA adapter (merged into OUT) instead of all weights")]
LoraROpt = Annotated[int, typer.Option(min=1, help="LoRA rank")]
LoraAlphaOpt = Annotated[int, typer.Option(min=1, help="LoRA alpha")]
EpochsOpt = Annotated[Optional[float], typer.Option(min=0, help="passes over the data")]
LrOpt = Annotated[Optional[float], typer.Option(min=0, help="learning rate")]
BatchOpt = Annotated[Optional[int], typer.Option(min=1, help="per-device batch size (ppo: prompts per rollout)")]
MaxStepsOpt = Annotated[Optional[int], typer.Option(min=1, help="stop after N optimiser steps (ppo: N rollouts)")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="continue from the last OUT/checkpoint-N")]
TrlOpt = Annotated[Optional[list[str]], typer.Option("--trl", help="config field KEY=VALUE (JSON value), repeatable")]
ThreadsOpt = Annotated[Optional[int], typer.Option(min=1, help="torch CPU threads (1 is often fastest for small models)")]
RefOpt = Annotated[Optional[str], typer.Option(help="reference model folder; default: a frozen copy of --model")]


def config_args(epochs, lr, batch_size, max_steps, trl, names: dict[str, str]) -> dict[str, Any]:
    """The common flags under the config's own field names, then --trl on top."""
    flags = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "max_steps": max_steps}
    args = {names[k]: v for k, v in flags.items() if v is not None}
    return args | parse_pairs(trl, "--trl", "beta=0.1")


TRL_NAMES = {
    "epochs": "num_train_epochs", "lr": "learning_rate",
    "batch_size": "per_device_train_batch_size", "max_steps": "max_steps",
}
PPO_NAMES = {"epochs": "epochs", "lr": "learning_rate", "batch_size": "batch_size", "max_steps": "steps"}


def lora_arg(lora: bool, r: int, alpha: int) -> bool | dict[str, Any]:
    return {"r": r, "lora_alpha": alpha} if lora else False


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad data, paths or settings: one line and exit code 2, no traceback."""
    from pydantic import ValidationError

    from cai.train.common import TrainError

    try:
        yield
    except (TrainError, FileNotFoundError, ValidationError) as exc:
        err_console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None


def report(result, keys: tuple[str, ...]) -> None:
    shown = {k: result.metrics[k] for k in keys if result.metrics.get(k) is not None}
    console.print(f"[bold]saved[/]: {result.out}  (metrics.json, log.jsonl)")
    for key, value in shown.items():
        console.print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")


@app.command("sft")
def sft(
    data: DataOpt,
    model: ModelOpt = None,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/sft"),
    lora: LoraOpt = False,
    lora_r: LoraROpt = 16,
    lora_alpha: LoraAlphaOpt = 32,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    batch_size: BatchOpt = None,
    max_steps: MaxStepsOpt = None,
    resume: ResumeOpt = False,
    trl: TrlOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Supervised fine-tuning (TRL SFTTrainer) on `messages` data; loss on the final assistant turn."""
    from cai.train.sft import train_sft

    with user_errors():
        result = train_sft(
            data, model, out, lora=lora_arg(lora, lora_r, lora_alpha), resume=resume, threads=threads,
            trl_args=config_args(epochs, lr, batch_size, max_steps, trl, TRL_NAMES),
        )
    report(result, ("global_step", "train_loss", "train_runtime"))


@app.command("rm")
def rm(
    data: DataOpt,
    model: ModelOpt = None,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/rm"),
    lora: LoraOpt = False,
    lora_r: LoraROpt = 16,
    lora_alpha: LoraAlphaOpt = 32,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    batch_size: BatchOpt = None,
    max_steps: MaxStepsOpt = None,
    resume: ResumeOpt = False,
    trl: TrlOpt = None,
    threads: ThreadsOpt = None,
    eval_fraction: Annotated[float, typer.Option(min=0, max=0.9, help="held-out share of pairs")] = 0.1,
    margin_scale: Annotated[float, typer.Option(help="TRL margin = scale * judge margin; 0: plain Bradley-Terry")] = 1.0,
) -> None:
    """Reward model (TRL RewardTrainer) on preference pairs; reports held-out pairwise accuracy."""
    from cai.train.reward import train_reward_model

    with user_errors():
        result = train_reward_model(
            data, model, out, lora=lora_arg(lora, lora_r, lora_alpha), resume=resume, threads=threads,
            trl_args=config_args(epochs, lr, batch_size, max_steps, trl, TRL_NAMES),
            eval_fraction=eval_fraction, margin_scale=margin_scale,
        )
    report(result, ("global_step", "train_loss", "heldout_pairs", "heldout_accuracy_before", "heldout_accuracy"))


@app.command("dpo")
def dpo(
    data: DataOpt,
    model: ModelOpt = None,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/dpo"),
    ref_model: RefOpt = None,
    lora: LoraOpt = False,
    lora_r: LoraROpt = 16,
    lora_alpha: LoraAlphaOpt = 32,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    batch_size: BatchOpt = None,
    max_steps: MaxStepsOpt = None,
    resume: ResumeOpt = False,
    trl: TrlOpt = None,
    threads: ThreadsOpt = None,
    soft_label: Annotated[str, typer.Option(help="none: plain DPO; smoothing: label_smoothing = mean(1 - score), robust loss")] = "none",
) -> None:
    """Direct preference optimisation (TRL DPOTrainer) on preference pairs."""
    from cai.train.dpo import train_dpo

    with user_errors():
        result = train_dpo(
            data, model, out, ref_model=ref_model, lora=lora_arg(lora, lora_r, lora_alpha), resume=resume,
            threads=threads, soft_label=soft_label,  # type: ignore[arg-type]
            trl_args=config_args(epochs, lr, batch_size, max_steps, trl, TRL_NAMES),
        )
    report(result, ("global_step", "train_loss", "label_smoothing", "train_runtime"))


def load_reward_fn(spec: str):
    """'package.module:function' -> the function."""
    module, sep, name = spec.partition(":")
    if not sep:
        raise typer.BadParameter(f"--reward-fn {spec!r}: expected module:function")
    return getattr(importlib.import_module(module), name)


@app.command("ppo")
def ppo(
    data: Annotated[Path, typer.Option(help="prompts: a preference dataset (`prompt`), SFT data, or a prompt JSONL")],
    model: ModelOpt = None,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/ppo"),
    reward_model: Annotated[Optional[str], typer.Option(help="reward model folder (from `cai train rm`)")] = None,
    reward_fn: Annotated[Optional[str], typer.Option(help="module:function(prompts, completions) -> scores")] = None,
    ref_model: RefOpt = None,
    lora: LoraOpt = False,
    lora_r: LoraROpt = 16,
    lora_alpha: LoraAlphaOpt = 32,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    batch_size: BatchOpt = None,
    max_steps: MaxStepsOpt = None,
    resume: ResumeOpt = False,
    trl: Annotated[Optional[list[str]], typer.Option("--set", "--trl", help="PPOConfig field KEY=VALUE, repeatable")] = None,
    threads: ThreadsOpt = None,
) -> None:
    """PPO (cai's own) against a reward model or function, with a KL penalty to the reference."""
    from cai.train.ppo import train_ppo

    with user_errors():
        result = train_ppo(
            data, model, out, reward_model=reward_model, ref_model=ref_model,
            reward_fn=load_reward_fn(reward_fn) if reward_fn else None,
            lora=lora_arg(lora, lora_r, lora_alpha), resume=resume, threads=threads,
            config=config_args(epochs, lr, batch_size, max_steps, trl, PPO_NAMES),
        )
    last = result.metrics.get("last") or {}
    report(result, ("steps_run", "seconds"))
    for key in ("reward", "kl", "entropy"):
        if key in last:
            console.print(f"  last {key}: {last[key]:.4g}")
