"""PPO's numbers: reward normalisation, the value head, per-token rewards and GAE, and the clipped
update with separate gradient clipping for the policy and the value head.

Why rewards are normalised. The score lands on a completion's last token and GAE carries it back
with (gamma*lam)^k, so with a value head that knows nothing the end token of every completion gets
the largest advantage. A reward model's constant offset then becomes a length push: +50 on every
completion makes the end token look good and completions shrink (on the tiny test model, 14 -> 3
tokens in 8 steps). Centring the scores on their running mean (and starting the value head's bias
at the mean normalised score) removes the offset before GAE sees it.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel

from cai.train.common import TrainError, log
from cai.train.ppo_config import PPOConfig


class ValueHead(torch.nn.Module):
    """V(s_t) from the policy's last hidden state; weights start at zero, the bias at the mean score."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


class RewardNorm(BaseModel):
    """Running mean and variance of raw scores (Chan et al.'s parallel update, in float64).

    Saved in every checkpoint, so a resumed run normalises exactly as an uninterrupted one."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean

    def update(self, scores: list[float]) -> None:
        n = len(scores)
        if n == 0:
            return
        batch_mean = math.fsum(scores) / n
        batch_m2 = math.fsum((x - batch_mean) ** 2 for x in scores)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0

    def normalise(self, scores: torch.Tensor) -> torch.Tensor:
        """(score - mean) / std; a constant reward so far (std ~ 0) is only centred."""
        scale = self.std if self.std > 1e-6 else 1.0
        return ((scores.double() - self.mean) / scale).to(scores.dtype)


# ---- helpers -----------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x, mask):
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def autocast(cfg: PPOConfig, device: torch.device | str):
    """bf16 autocast when cfg.bf16 (resolved at build time), else nothing."""
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()


def disable_dropout(model) -> None:
    """Dropout off everywhere (TRL's disable_dropout_in_model, plus attention dropout kept as a float),
    so the update may run in train mode (gradient checkpointing needs it) and still see the rollout's policy."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout_p"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


class PolicyWithValue(torch.nn.Module):
    """The policy and its value head as one module: what DDP wraps, so one backward pass
    averages both over the processes."""

    def __init__(self, policy, head: ValueHead):
        super().__init__()
        self.policy, self.head = policy, head

    def forward(self, seq, mask, n_prompt: int, temperature: float):
        return forward(self.policy, self.head, seq, mask, n_prompt, temperature)


def forward(model, head, seq, mask, n_prompt: int, temperature: float):
    """Per completion token: log-prob of the sampled token, entropy, and V(s_t)
    (None without a head). Positions come from the mask, so left padding is exact."""
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    n_new = seq.shape[1] - n_prompt
    out = model(
        input_ids=seq, attention_mask=mask, position_ids=positions,
        output_hidden_states=head is not None, logits_to_keep=n_new + 1, use_cache=False,
    )
    logits = out.logits[:, :-1].float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, seq[:, n_prompt:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    values = head(out.hidden_states[-1][:, n_prompt - 1 : -1]) if head is not None else None
    return logp, entropy, values


# ---- advantages --------------------------------------------------------------------


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation over the completion tokens; beyond the end everything is 0."""
    rewards, values = rewards * mask, values * mask
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        adv[:, t] = running
    return adv, adv + values


def advantages(scores, values, kl, mask, cfg: PPOConfig):
    """Per-token rewards (-kl_coef * KL, plus the score on the last token), GAE, whitened advantages.
    Returns (advantages, returns, per-token rewards)."""
    rewards = -cfg.kl_coef * kl * mask
    last = mask.sum(1).long().clamp(min=1) - 1
    rewards[torch.arange(len(scores), device=mask.device), last] += scores
    adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    return whiten(adv, mask), returns, rewards


@torch.no_grad()
def score_batch(run: dict[str, Any], batch, scores) -> dict[str, Any]:
    """Old log-probs, values and reference log-probs (eval mode, as sampled); rewards; GAE."""
    cfg, policy, ref = run["cfg"], run["policy"], run["ref"]
    policy.eval()
    chunks = defaultdict(list)
    for idx in torch.arange(len(scores)).split(cfg.minibatch_size):
        args = (batch["seq"][idx], batch["mask"][idx], batch["n_prompt"], cfg.temperature)
        with autocast(cfg, run["device"]):
            logp, entropy, values = forward(policy, run["head"], *args)
            if ref is None:  # LoRA: the reference is the model with its adapter off
                with policy.disable_adapter():
                    ref_logp = forward(policy, None, *args)[0]
            else:
                ref_logp = forward(ref, None, *args)[0]
        for k, v in (("logp", logp), ("entropy", entropy), ("values", values), ("ref_logp", ref_logp)):
            chunks[k].append(v)
    b = {k: torch.cat(v) for k, v in chunks.items()}
    mask = batch["cmask"]
    kl = (b["logp"] - b["ref_logp"]) * mask
    adv, returns, rewards = advantages(scores, b["values"], kl, mask, cfg)
    return b | {"adv": adv, "returns": returns, "kl": kl.sum(1), "non_score": rewards.sum(1) - scores}


# ---- the update --------------------------------------------------------------------


def minibatch_loss(run: dict[str, Any], batch, b, idx):
    """Clipped surrogate + vf_coef * clipped value loss - ent_coef * entropy on one minibatch."""
    cfg = run["cfg"]
    mask = batch["cmask"][idx]
    with autocast(cfg, run["device"]):
        logp, entropy, values = run["trainer"](batch["seq"][idx], batch["mask"][idx], batch["n_prompt"], cfg.temperature)
    ratio = (logp - b["logp"][idx]).exp()
    adv = b["adv"][idx]
    clipped = ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)
    pg_loss = masked_mean(torch.max(-adv * ratio, -adv * clipped), mask)
    old_v, ret = b["values"][idx], b["returns"][idx]
    v_clipped = old_v + (values - old_v).clamp(-cfg.clip_range_value, cfg.clip_range_value)
    vf_loss = 0.5 * masked_mean(torch.max((values - ret) ** 2, (v_clipped - ret) ** 2), mask)
    ent = masked_mean(entropy, mask)
    stats = {
        "pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(),
        "clipfrac": masked_mean(((ratio - 1).abs() > cfg.clip_range).float(), mask).item(),
        "approx_kl": masked_mean(0.5 * (logp - b["logp"][idx]) ** 2, mask).item(),
    }
    sample_ratio = masked_mean((logp.detach() - batch["sample_logp"][idx]).exp(), mask).item()
    return pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * ent, stats, sample_ratio


def check_first_ratio(ratio: float, cfg: PPOConfig, step: int) -> None:
    """The update's first forward pass must give the sampled tokens the probabilities they were
    sampled with; if not, the samples came from another distribution than the one PPO trains."""
    if cfg.ratio_check == "off" or abs(ratio - 1) <= cfg.ratio_tolerance:
        return
    message = (
        f"PPO step {step + 1}: first_ratio = {ratio:.4f} (mean pi_train / pi_sample over the first minibatch; "
        f"tolerance {cfg.ratio_tolerance}): the rollout sampled from a different distribution than the update "
        "computes, e.g. a generation setting that leaked into sampling (repetition_penalty, no_repeat_ngram_size, "
        "top_k), dropout, or bf16 noise. Check the model's generation_config and the model; raise ratio_tolerance "
        "or set ratio_check=warn only if the gap is numerical."
    )
    if cfg.ratio_check == "raise":
        raise TrainError(message)
    log.warning(message)


def ppo_update(run: dict[str, Any], batch, b, step: int) -> dict[str, float]:
    """ppo_epochs x shuffled minibatches; gradients clipped apart for the policy and the value head."""
    cfg, optimizer = run["cfg"], run["optimizer"]
    policy_params, head_params = run["params"]
    generator = torch.Generator().manual_seed(cfg.seed + step)
    run["policy"].train()  # dropout is off (disable_dropout); train mode lets gradient checkpointing run
    stats, first_ratio = defaultdict(list), None
    for _ in range(cfg.ppo_epochs):
        for idx in torch.randperm(len(b["adv"]), generator=generator).split(cfg.minibatch_size):
            loss, mb_stats, sample_ratio = minibatch_loss(run, batch, b, idx)
            if first_ratio is None:  # every process decides on the mean of all, so all stop together
                first_ratio = run["procs"].mean({"r": sample_ratio})["r"]
                check_first_ratio(first_ratio, cfg, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            mb_stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(policy_params, cfg.max_grad_norm).item()
            mb_stats["value_grad_norm"] = torch.nn.utils.clip_grad_norm_(head_params, cfg.value_max_grad_norm).item()
            optimizer.step()
            for k, v in mb_stats.items():
                stats[k].append(v)
    run["policy"].eval()
    return {k: sum(v) / len(v) for k, v in stats.items()} | {"first_ratio": first_ratio}
