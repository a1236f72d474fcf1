"""cai's PPO settings (TRL has no PPO config any more). No torch here: recipes and the CLI read the
field names without loading a model stack."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class PPOConfig(BaseModel):
    """Defaults suit a ~100M model on CPU; on a GPU scale batch_size up (bf16 and gradient
    checkpointing switch themselves on there). Reward-side settings (missing_eos_penalty,
    clip_range_value) are in normalised reward units unless reward_norm is "none"."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(100, ge=1, description="rollout + update iterations")
    epochs: float | None = Field(None, gt=0, description="if set: steps = ceil(epochs * prompts / batch_size)")
    batch_size: int = Field(16, ge=1, description="prompts (one completion each) per rollout")
    minibatch_size: int = Field(8, ge=1, description="completions per gradient step")
    ppo_epochs: int = Field(4, ge=1, description="passes over each rollout batch")
    max_new_tokens: int = Field(192, ge=1, description="completion cap; 192 like phase 2's policy samples")
    max_prompt_tokens: int = Field(512, ge=1, description="longer prompts are skipped")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (log-probs use the same)")
    learning_rate: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (0 as in TRL's trainers)")
    kl_coef: float = Field(0.05, ge=0, description="per-token KL penalty to the reference")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip_range: float = Field(0.2, gt=0, description="policy ratio clip")
    clip_range_value: float = Field(0.2, gt=0, description="value clip around the rollout's values (reward units)")
    vf_coef: float = Field(0.1, ge=0)
    ent_coef: float = Field(0.0, ge=0, description="entropy bonus")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient-norm clip of the policy's parameters")
    value_max_grad_norm: float = Field(1.0, gt=0, description="gradient-norm clip of the value head, on its own")
    reward_norm: Literal["running", "warmup", "none"] = Field(
        "running", description="scores -> (score - mean) / std with running: moments over every batch so far "
        "(warm-up batches included); warmup: moments of the warm-up batches only, then fixed; none: raw scores")
    reward_norm_warmup: int = Field(
        1, ge=0, description="batches sampled and scored before training (no update) to start the reward "
        "moments and the value head's bias; 0: both start from the first training batch")
    missing_eos_penalty: float = Field(
        1.0, ge=0, description="subtracted from the normalised score of a completion cut at max_new_tokens")
    ratio_tolerance: float = Field(
        0.05, gt=0, description="largest |mean ratio - 1| between the update's first forward pass and the "
        "sampling distribution (first_ratio) before ratio_check acts")
    ratio_check: Literal["raise", "warn", "off"] = Field(
        "raise", description="what a first_ratio outside ratio_tolerance does")
    bf16: bool | None = Field(None, description="bfloat16 autocast (weights and optimiser stay float32); "
                              "None: on with a CUDA GPU that supports it, off on CPU")
    gradient_checkpointing: bool | None = Field(None, description="recompute activations in the backward pass; "
                                                "None: on with a CUDA GPU, off on CPU")
    save_steps: int = Field(50, ge=1, description="checkpoint every N steps (and at the end)")
    seed: int = 0

    @model_validator(mode="after")
    def _warmup_needs_batches(self) -> PPOConfig:
        if self.reward_norm == "warmup" and self.reward_norm_warmup == 0:
            raise ValueError("reward_norm=warmup needs reward_norm_warmup >= 1 (the batches its moments come from)")
        return self
