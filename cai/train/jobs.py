"""Typed train jobs: what `cai train sft|rm|dpo|ppo|grpo` builds from its flags and a `cai run` recipe
stage embeds, with one set of defaults.

The common fields (epochs, lr, batch_size, max_steps) map onto the trainer's config (TRL's
SFTConfig / RewardConfig / DPOConfig / GRPOConfig, cai's PPOConfig for ppo); `trl` sets any other
field of that config and wins over the common fields. Its keys are checked against the config
class when the job is built, so a misspelt field fails before any model loads. The config classes
are imported only when `trl` is not empty: TRL's pull in transformers and torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from functools import cache
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cai.recipe import EngineSpec, JudgeConfig

if TYPE_CHECKING:
    from cai.train.common import TrainResult

TRL_NAMES = {"epochs": "num_train_epochs", "lr": "learning_rate",
             "batch_size": "per_device_train_batch_size", "max_steps": "max_steps"}
PPO_NAMES = {"epochs": "epochs", "lr": "learning_rate", "batch_size": "batch_size", "max_steps": "steps"}


@cache
def config_fields(spec: str) -> frozenset[str]:
    """The field names of a config class given as "module:Class" (a dataclass or a pydantic model)."""
    module, _, name = spec.partition(":")
    cls = getattr(importlib.import_module(module), name)
    if dataclasses.is_dataclass(cls):
        return frozenset(f.name for f in dataclasses.fields(cls))
    return frozenset(cls.model_fields)


class TrainSettings(BaseModel):
    """How to train, for every trainer: what a `cai run` recipe's train stage sets. The job adds
    where from and to (`TrainJob`); `kind` names it in a job file (`cai run JOB.json`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: ClassVar[str]
    config_class: ClassVar[str]
    config_names: ClassVar[dict[str, str]] = TRL_NAMES

    lora: bool = Field(False, description="train a LoRA adapter (merged into OUT) instead of all weights")
    lora_r: int = Field(16, ge=1, description="LoRA rank")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha")
    epochs: float | None = Field(None, ge=0, description="passes over the data")
    lr: float | None = Field(None, ge=0, description="learning rate")
    batch_size: int | None = Field(None, ge=1, description="per-device batch size (ppo: prompts per rollout)")
    max_steps: int | None = Field(None, ge=1, description="stop after N optimiser steps (ppo: N rollouts)")
    resume: bool = Field(False, description="continue from the last OUT/checkpoint-N")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (1 is often fastest for small models)")
    trl: dict[str, Any] = Field(default_factory=dict, description="any other field of the trainer's config "
                                "(TRL's, or cai's PPOConfig for ppo), by its own name; wins over the common fields")

    @field_validator("trl")
    @classmethod
    def _known_config_fields(cls, trl: dict[str, Any]) -> dict[str, Any]:
        if not trl:
            return trl
        known = config_fields(cls.config_class)
        unknown = [key for key in trl if key not in known]
        if unknown:
            hints = [f"{key} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(key, known, 1))
                     else key for key in unknown]
            raise ValueError(f"not a field of {cls.config_class.partition(':')[2]}: {', '.join(hints)}")
        return trl

    def lora_arg(self) -> bool | dict[str, Any]:
        return {"r": self.lora_r, "lora_alpha": self.lora_alpha} if self.lora else False

    def config_args(self) -> dict[str, Any]:
        """The common fields under the config's own names, then `trl` on top."""
        common = {"epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size, "max_steps": self.max_steps}
        return {self.config_names[k]: v for k, v in common.items() if v is not None} | self.trl


class TrainTarget(BaseModel):
    """Where a train job reads and writes."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    data: str = Field(description="dataset: .jsonl/.parquet file, cai export folder, or save_to_disk folder")
    model: str | None = Field(None, description="model folder; default: the embedded SmolLM2-135M-Instruct")
    out: str = Field(description="output folder")


class SFTTrainSettings(TrainSettings):
    """Supervised fine-tuning (TRL SFTTrainer) on `messages` data."""

    kind: ClassVar[str] = "train-sft"
    config_class: ClassVar[str] = "trl:SFTConfig"


class RewardTrainSettings(TrainSettings):
    """Reward model (TRL RewardTrainer) on preference pairs."""

    kind: ClassVar[str] = "train-rm"
    config_class: ClassVar[str] = "trl:RewardConfig"
    eval_fraction: float = Field(0.1, ge=0, le=0.9, description="held-out share of pairs")
    loss: Literal["soft", "margin"] = Field(
        "soft", description="soft: -[s log σ(Δ) + (1-s) log σ(-Δ)] with s the judge's P(chosen); "
        "margin: TRL's margin loss scaled by margin_scale")
    margin_scale: float = Field(1.0, description="TRL margin = scale * judge margin; 0: plain Bradley-Terry")


class DPOTrainSettings(TrainSettings):
    """Direct preference optimisation (TRL DPOTrainer) on preference pairs."""

    kind: ClassVar[str] = "train-dpo"
    config_class: ClassVar[str] = "trl:DPOConfig"
    ref_model: str | None = Field(None, description="reference model folder; default: a frozen copy of MODEL")
    soft_label: Literal["none", "smoothing", "per_pair"] = Field(
        "per_pair", description="per_pair: conservative DPO with ε_i = 1 - score_i; smoothing: dataset-wide "
        "robust DPO; none: hard labels")


class PPOTrainSettings(TrainSettings):
    """PPO (cai's own) with a KL penalty to the reference."""

    kind: ClassVar[str] = "train-ppo"
    config_class: ClassVar[str] = "cai.train.ppo_config:PPOConfig"
    config_names: ClassVar[dict[str, str]] = PPO_NAMES
    ref_model: str | None = Field(None, description="reference model folder; default: a frozen copy of MODEL")


GROUP_REWARDS = ("win_rate", "bradley_terry")


class GRPOTrainSettings(TrainSettings):
    """GRPO (TRL GRPOTrainer), online: the constitutional judge ranks each prompt's G answers."""

    kind: ClassVar[str] = "train-grpo"
    config_class: ClassVar[str] = "trl:GRPOConfig"
    group_reward: Literal[GROUP_REWARDS] = Field(  # type: ignore[valid-type]
        "win_rate", description="win_rate: an answer's mean P(win) against the rest of its group; "
        "bradley_terry: the Bradley-Terry score fitted to the group's soft outcomes")
    judge_config: JudgeConfig | None = Field(
        None, description="how the judge compares (mode, orders, ...); default: JudgeConfig's (a recipe: phase 2's)")
    judge_backend: str | None = Field(
        None, description="engine backend of the judge; default: auto (a recipe: its engine)")
    judge_options: dict[str, Any] = Field(default_factory=dict, description="backend options of the judge engine")
    principle_seed: int = Field(0, description="seeds the principle drawn for each group")


class SFTTrainJob(SFTTrainSettings, TrainTarget):
    out: str = Field("runs/sft", description="output folder")


class RewardTrainJob(RewardTrainSettings, TrainTarget):
    out: str = Field("runs/rm", description="output folder")


class DPOTrainJob(DPOTrainSettings, TrainTarget):
    out: str = Field("runs/dpo", description="output folder")


class PPOTrainJob(PPOTrainSettings, TrainTarget):
    """PPO against a reward model folder or a reward function (exactly one)."""

    data: str = Field(description="prompts: a preference dataset (`prompt`), SFT data, or a prompt JSONL")
    out: str = Field("runs/ppo", description="output folder")
    reward_model: str | None = Field(None, description="reward model folder (from `cai train rm`)")
    reward_fn: str | None = Field(None, description="module:function(prompts, completions) -> scores")

    @field_validator("reward_fn")
    @classmethod
    def _module_function(cls, spec: str | None) -> str | None:
        if spec is not None and not all(spec.partition(":")[::2]):
            raise ValueError(f"{spec!r}: expected module:function")
        return spec


class GRPOTrainJob(GRPOTrainSettings, TrainTarget):
    """GRPO rewarded by the judge (default) or by a reward model folder."""

    data: str = Field(description="prompts: a bundled set, a prompt / SFT / preference JSONL, or a save_to_disk folder")
    out: str = Field("runs/grpo", description="output folder")
    constitution: str = Field("harmless", description="the judge's principles: a bundled name or a YAML file")
    constitution_by_group: dict[str, str] = Field(
        default_factory=dict, description="prompt group -> constitution for that group's prompts")
    judge_model: str | None = Field(None, description="the judge's model; default: MODEL (the policy's start)")
    reward_model: str | None = Field(None, description="reward model folder (from `cai train rm`) instead of the judge")

    def judge_spec(self) -> EngineSpec:
        return EngineSpec(backend=self.judge_backend or "auto", model=self.judge_model or self.model,
                          options=self.judge_options)


TrainJob = SFTTrainJob | RewardTrainJob | DPOTrainJob | PPOTrainJob | GRPOTrainJob


TRAIN_JOBS: dict[str, type[TrainJob]] = {
    job.kind: job for job in (SFTTrainJob, RewardTrainJob, DPOTrainJob, PPOTrainJob, GRPOTrainJob)}


def train(job: TrainJob) -> TrainResult:
    """Run the job's trainer (imported here: the trainers load torch and TRL)."""
    common = dict(lora=job.lora_arg(), resume=job.resume, threads=job.threads)
    if isinstance(job, SFTTrainJob):
        from cai.train.sft import train_sft

        return train_sft(job.data, job.model, job.out, trl_args=job.config_args(), **common)
    if isinstance(job, RewardTrainJob):
        from cai.train.reward import train_reward_model

        return train_reward_model(job.data, job.model, job.out, trl_args=job.config_args(),
                                  eval_fraction=job.eval_fraction, loss=job.loss, margin_scale=job.margin_scale,
                                  **common)
    if isinstance(job, DPOTrainJob):
        from cai.train.dpo import train_dpo

        return train_dpo(job.data, job.model, job.out, ref_model=job.ref_model, soft_label=job.soft_label,
                         trl_args=job.config_args(), **common)
    if isinstance(job, PPOTrainJob):
        from cai.train.ppo import train_ppo

        module, _, name = (job.reward_fn or "").partition(":")
        reward_fn = getattr(importlib.import_module(module), name) if job.reward_fn else None
        return train_ppo(job.data, job.model, job.out, reward_model=job.reward_model, ref_model=job.ref_model,
                         reward_fn=reward_fn, config=job.config_args(), **common)
    if isinstance(job, GRPOTrainJob):
        from cai.train.grpo import train_grpo

        return train_grpo(job.data, job.model, job.out, constitution=job.constitution,
                          constitution_by_group=job.constitution_by_group, judge=job.judge_spec(),
                          judge_config=job.judge_config, group_reward=job.group_reward,
                          principle_seed=job.principle_seed, reward_model=job.reward_model,
                          trl_args=job.config_args(), **common)
    raise TypeError(f"not a train job: {type(job).__name__}")
