"""`cai train sft|rm|dpo|ppo|grpo`: the trainers from the command line.

Each command builds its typed job (cai.train.jobs, the model a `cai run` recipe stage embeds too,
defaults included) and runs it. Common flags map onto the trainer's config (TRL's for sft/rm/dpo/grpo,
cai's PPOConfig for ppo); `--trl KEY=VALUE` (repeatable, VALUE parsed as JSON when it parses) sets
any other field of that config and wins over the common flags; an unknown field is refused before
any model loads. After training, OUT/train_job.json records the job (what a model card reads);
`--push-to-hub REPO` then pushes OUT with its model card (cai.hub), the token checked before training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import BaseModel
from rich.console import Console

from cai.cli.common import absolute_if_path, fail_on_user_error, parse_pairs
from cai.cli.push import (
    HubPrivateOpt,
    PushToHubOpt,
    TokenEnvOpt,
    hub_push_settings,
    push_result,
)
from cai.hub import TOKEN_ENV, HubSettings
from cai.hub_lineage import write_train_record
from cai.judge import judge_modes_text
from cai.recipe import JudgeConfig
from cai.train.distributed import is_main
from cai.train.jobs import (
    GROUP_REWARDS,
    DPOTrainJob,
    GRPOTrainJob,
    PPOTrainJob,
    RewardTrainJob,
    SFTTrainJob,
    TrainJob,
    TrainSettings,
    train,
)

app = typer.Typer(
    help="Train on cai's datasets: SFT, reward model, DPO and GRPO with the judge as reward (thin over TRL), "
         "PPO (cai's own).",
    no_args_is_help=True,
)
console = Console()


def default(job: type[BaseModel], field: str) -> Any:
    """A flag's default is the job model's: the CLI and a recipe cannot drift apart."""
    return job.model_fields[field].default


ModelOpt = Annotated[Optional[str], typer.Option(help="model folder; default: the embedded SmolLM2-135M-Instruct")]
DataOpt = Annotated[Path, typer.Option(help="dataset: .jsonl/.parquet file, cai export folder, or save_to_disk folder")]
OutOpt = Annotated[Path, typer.Option(help="output folder")]
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

LORA, LORA_R, LORA_ALPHA, RESUME = (default(TrainSettings, f) for f in ("lora", "lora_r", "lora_alpha", "resume"))
REPORTED = {
    "train-sft": ("global_step", "train_loss", "train_runtime"),
    "train-rm": ("global_step", "train_loss", "heldout_pairs", "heldout_accuracy_before", "heldout_accuracy"),
    "train-dpo": ("global_step", "train_loss", "label_smoothing", "train_runtime"),
    "train-ppo": ("steps_run", "seconds"),
    "train-grpo": ("global_step", "train_loss", "train_runtime", "groups_judged", "groups_skipped"),
}


def run_train_job(job: TrainJob, hub: HubSettings | None = None) -> None:
    """Train, record the job in OUT/train_job.json, print where the model went and its main metrics
    (`cai train` and `cai run JOB.json`); with `hub`, push OUT to the Hub (the main process only)."""
    with fail_on_user_error():
        result = train(job)
    if not is_main():  # under accelerate launch: one record, report and push, from the process that wrote OUT
        return
    write_train_record(job, result.out)
    shown = {k: result.metrics[k] for k in REPORTED[job.kind] if result.metrics.get(k) is not None}
    console.print(f"[bold]saved[/]: {result.out}  (metrics.json, log.jsonl)")
    for key, value in shown.items():
        console.print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
    last = result.metrics.get("last") or {}
    for key in ("reward", "kl", "entropy"):  # PPO's last rollout, GRPO's last logged step
        if key in last:
            console.print(f"  last {key}: {last[key]:.4g}")
    if hub is not None:
        push_result(result.out, hub)


def build(job: type[TrainJob], trl: list[str] | None, **flags: Any) -> TrainJob:
    """The job from the command's flags; `--trl` pairs become its `trl` settings."""
    with fail_on_user_error():
        return job(trl=parse_pairs(trl, "--trl", "beta=0.1"), **flags)


@app.command("sft")
def sft(
    data: DataOpt,
    model: ModelOpt = None,
    out: OutOpt = Path(default(SFTTrainJob, "out")),
    lora: LoraOpt = LORA,
    lora_r: LoraROpt = LORA_R,
    lora_alpha: LoraAlphaOpt = LORA_ALPHA,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    batch_size: BatchOpt = None,
    max_steps: MaxStepsOpt = None,
    resume: ResumeOpt = RESUME,
    trl: TrlOpt = None,
    threads: ThreadsOpt = None,
    push_to_hub: PushToHubOpt = None,
    hub_private: HubPrivateOpt = False,
    token_env: TokenEnvOpt = TOKEN_ENV,
) -> None:
    """Supervised fine-tuning (TRL SFTTrainer) on `messages` data; loss on the final assistant turn."""
    run_train_job(build(SFTTrainJob, trl, data=str(data), model=model, out=str(out), lora=lora, lora_r=lora_r,
                        lora_alpha=lora_alpha, epochs=epochs, lr=lr, batch_size=batch_size, max_steps=max_steps,
                        resume=resume, threads=threads), hub_push_settings(push_to_hub, hub_private, token_env))


@app.command("rm")
def rm(
    data: DataOpt,
    model: ModelOpt = None,
    out: OutOpt = Path(default(RewardTrainJob, "out")),
    lora: LoraOpt = LORA,
    lora_r: LoraROpt = LORA_R,
    lora_alpha: LoraAlphaOpt = LORA_ALPHA,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    batch_size: BatchOpt = None,
    max_steps: MaxStepsOpt = None,
    resume: ResumeOpt = RESUME,
    trl: TrlOpt = None,
    threads: ThreadsOpt = None,
    push_to_hub: PushToHubOpt = None,
    hub_private: HubPrivateOpt = False,
    token_env: TokenEnvOpt = TOKEN_ENV,
    eval_fraction: Annotated[float, typer.Option(min=0, max=0.9, help="held-out share of pairs")] = default(RewardTrainJob, "eval_fraction"),
    loss: Annotated[str, typer.Option(help=RewardTrainJob.model_fields["loss"].description.replace("[", "(").replace("]", ")"))] = default(RewardTrainJob, "loss"),
    margin_scale: Annotated[float, typer.Option(help="TRL margin = scale * judge margin; 0: plain Bradley-Terry")] = default(RewardTrainJob, "margin_scale"),
) -> None:
    """Reward model (TRL RewardTrainer) on preference pairs; reports held-out pairwise accuracy."""
    run_train_job(build(RewardTrainJob, trl, data=str(data), model=model, out=str(out), lora=lora, lora_r=lora_r,
                        lora_alpha=lora_alpha, epochs=epochs, lr=lr, batch_size=batch_size, max_steps=max_steps,
                        resume=resume, threads=threads, eval_fraction=eval_fraction, loss=loss,
                        margin_scale=margin_scale),
                  hub_push_settings(push_to_hub, hub_private, token_env))


@app.command("dpo")
def dpo(
    data: DataOpt,
    model: ModelOpt = None,
    out: OutOpt = Path(default(DPOTrainJob, "out")),
    ref_model: RefOpt = None,
    lora: LoraOpt = LORA,
    lora_r: LoraROpt = LORA_R,
    lora_alpha: LoraAlphaOpt = LORA_ALPHA,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    batch_size: BatchOpt = None,
    max_steps: MaxStepsOpt = None,
    resume: ResumeOpt = RESUME,
    trl: TrlOpt = None,
    threads: ThreadsOpt = None,
    push_to_hub: PushToHubOpt = None,
    hub_private: HubPrivateOpt = False,
    token_env: TokenEnvOpt = TOKEN_ENV,
    soft_label: Annotated[str, typer.Option(help=DPOTrainJob.model_fields["soft_label"].description)] = default(DPOTrainJob, "soft_label"),
) -> None:
    """Direct preference optimisation (TRL DPOTrainer) on preference pairs."""
    run_train_job(build(DPOTrainJob, trl, data=str(data), model=model, out=str(out), ref_model=ref_model,
                        lora=lora, lora_r=lora_r, lora_alpha=lora_alpha, epochs=epochs, lr=lr,
                        batch_size=batch_size, max_steps=max_steps, resume=resume, threads=threads,
                        soft_label=soft_label),
                  hub_push_settings(push_to_hub, hub_private, token_env))


@app.command("ppo")
def ppo(
    data: Annotated[Path, typer.Option(help="prompts: a preference dataset (`prompt`), SFT data, or a prompt JSONL")],
    model: ModelOpt = None,
    out: OutOpt = Path(default(PPOTrainJob, "out")),
    reward_model: Annotated[Optional[str], typer.Option(help="reward model folder (from `cai train rm`)")] = None,
    reward_fn: Annotated[Optional[str], typer.Option(help="module:function(prompts, completions) -> scores")] = None,
    ref_model: RefOpt = None,
    lora: LoraOpt = LORA,
    lora_r: LoraROpt = LORA_R,
    lora_alpha: LoraAlphaOpt = LORA_ALPHA,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    batch_size: BatchOpt = None,
    max_steps: MaxStepsOpt = None,
    resume: ResumeOpt = RESUME,
    trl: Annotated[Optional[list[str]], typer.Option("--set", "--trl", help="PPOConfig field KEY=VALUE, repeatable")] = None,
    threads: ThreadsOpt = None,
    push_to_hub: PushToHubOpt = None,
    hub_private: HubPrivateOpt = False,
    token_env: TokenEnvOpt = TOKEN_ENV,
) -> None:
    """PPO (cai's own) against a reward model or function, with a KL penalty to the reference."""
    run_train_job(build(PPOTrainJob, trl, data=str(data), model=model, out=str(out), reward_model=reward_model,
                        reward_fn=reward_fn, ref_model=ref_model, lora=lora, lora_r=lora_r, lora_alpha=lora_alpha,
                        epochs=epochs, lr=lr, batch_size=batch_size, max_steps=max_steps, resume=resume,
                        threads=threads),
                  hub_push_settings(push_to_hub, hub_private, token_env))


@app.command("grpo")
def grpo(
    data: Annotated[str, typer.Option(help="prompts: a bundled set, a prompt / SFT / preference JSONL, or a save_to_disk folder")],
    model: ModelOpt = None,
    out: OutOpt = Path(default(GRPOTrainJob, "out")),
    constitution: Annotated[str, typer.Option(help="the judge's principles: a bundled name or a YAML file")] = default(GRPOTrainJob, "constitution"),
    constitution_for: Annotated[Optional[list[str]], typer.Option("--constitution-for", help="GROUP=CONSTITUTION for one prompt group, repeatable")] = None,
    judge_model: Annotated[Optional[str], typer.Option(help="the judge's model; default: --model (the policy's start)")] = None,
    judge_backend: Annotated[Optional[str], typer.Option(help="the judge's engine backend; default: auto")] = None,
    judge_option: Annotated[Optional[list[str]], typer.Option("--judge-option", help="judge backend option KEY=VALUE, repeatable")] = None,
    mode: Annotated[str, typer.Option(help=f"judge scoring: {judge_modes_text()}")] = "logprob",
    orders: Annotated[int, typer.Option(min=1, max=2, help="judge both orders (2) or one")] = 2,
    group_reward: Annotated[str, typer.Option(help=f"{' or '.join(GROUP_REWARDS)}: an answer's mean P(win) in its group, or its Bradley-Terry score")] = default(GRPOTrainJob, "group_reward"),
    principle_seed: Annotated[int, typer.Option(help="seeds the principle drawn for each group")] = default(GRPOTrainJob, "principle_seed"),
    reward_model: Annotated[Optional[str], typer.Option(help="reward model folder (from `cai train rm`) instead of the judge")] = None,
    lora: LoraOpt = LORA,
    lora_r: LoraROpt = LORA_R,
    lora_alpha: LoraAlphaOpt = LORA_ALPHA,
    epochs: EpochsOpt = None,
    lr: LrOpt = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="completions per device and step (a multiple of num_generations)")] = None,
    max_steps: MaxStepsOpt = None,
    resume: ResumeOpt = RESUME,
    trl: TrlOpt = None,
    threads: ThreadsOpt = None,
    push_to_hub: PushToHubOpt = None,
    hub_private: HubPrivateOpt = False,
    token_env: TokenEnvOpt = TOKEN_ENV,
) -> None:
    """GRPO (TRL GRPOTrainer), online RLAIF: the judge ranks each prompt's G sampled answers
    (`--trl num_generations=G`) under a principle drawn per group; lineage in OUT/groups.jsonl."""
    with fail_on_user_error():
        by_group = parse_pairs(constitution_for, "--constitution-for", "benign=helpful", json_values=False)
        options = parse_pairs(judge_option, "--judge-option", "max_model_len=4096")
    run_train_job(build(
        GRPOTrainJob, trl, data=absolute_if_path(data), model=model, out=str(out),
        constitution=absolute_if_path(constitution),
        constitution_by_group={g: absolute_if_path(c) for g, c in by_group.items()}, judge_model=judge_model,
        judge_backend=judge_backend, judge_options=options, judge_config=JudgeConfig(mode=mode, orders=orders),
        group_reward=group_reward, principle_seed=principle_seed, reward_model=reward_model, lora=lora,
        lora_r=lora_r, lora_alpha=lora_alpha, epochs=epochs, lr=lr, batch_size=batch_size, max_steps=max_steps,
        resume=resume, threads=threads), hub_push_settings(push_to_hub, hub_private, token_env))
