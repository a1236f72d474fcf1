"""A compact PPO for RL from AI feedback (TRL removed its PPOTrainer in 1.13).

One step:
  1. rollout  `batch_size` prompts, rendered with the chat template exactly as
              TRL and cai's engines render them, sampled up to
              `max_new_tokens`; a completion ends at its first turn-end token.
  2. score    a reward model (the `cai train rm` output) on prompt + completion,
              rendered by the same template, or a Python reward function.
  3. rewards  per token: -kl_coef * (log pi(a_t) - log pi_ref(a_t)) against the
              frozen reference, plus the score on the last token.
  4. GAE      advantages and returns from the value head (a linear layer on
              the policy's last hidden state), advantages whitened.
  5. update   `ppo_epochs` passes over shuffled minibatches: clipped surrogate
              + vf_coef * clipped value loss - ent_coef * entropy.
One JSON line per step goes to OUT/log.jsonl (reward, KL, entropy, losses,
clip fraction, ...). The policy is saved as a plain HF folder (merged when
LoRA), the value head beside it in OUT/value_head.pt.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from cai.files import (
    atomic_open,
    atomic_write_json,
    atomic_write_jsonl,
)
from cai.train.common import (
    TrainError,
    TrainResult,
    check_chat_format,
    describe,
    load_data,
    load_model,
    load_tokenizer,
    lora_config,
    model_path,
    resume_checkpoint,
    save_model,
    set_threads,
    without_discarded,
)
from cai.train.ppo_checkpoint import load_checkpoint, save_checkpoint, truncate_log

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # float32 throughout; one device
RewardFn = Callable[[list[list[dict]], list[str]], Sequence[float]]


class PPOConfig(BaseModel):
    """cai's PPO settings (TRL has no PPO config any more). Defaults suit a
    ~100M model on CPU; scale batch_size and max_new_tokens up on a GPU."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(100, ge=1, description="rollout + update iterations")
    epochs: float | None = Field(None, gt=0, description="if set: steps = ceil(epochs * prompts / batch_size)")
    batch_size: int = Field(16, ge=1, description="prompts (one completion each) per rollout")
    minibatch_size: int = Field(8, ge=1, description="completions per gradient step")
    ppo_epochs: int = Field(4, ge=1, description="passes over each rollout batch")
    max_new_tokens: int = Field(64, ge=1)
    max_prompt_tokens: int = Field(512, ge=1, description="longer prompts are skipped")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (log-probs use the same)")
    learning_rate: float = Field(1e-5, gt=0)
    kl_coef: float = Field(0.05, ge=0, description="per-token KL penalty to the reference")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip_range: float = Field(0.2, gt=0, description="policy ratio clip")
    clip_range_value: float = Field(0.2, gt=0, description="value clip around the rollout's values")
    vf_coef: float = Field(0.1, ge=0)
    ent_coef: float = Field(0.0, ge=0, description="entropy bonus")
    max_grad_norm: float = Field(1.0, gt=0)
    missing_eos_penalty: float = Field(0.0, ge=0, description="subtracted from the score of a cut-off completion")
    save_steps: int = Field(50, ge=1, description="checkpoint every N steps (and at the end)")
    seed: int = 0


class ValueHead(torch.nn.Module):
    """V(s_t) from the policy's last hidden state; starts at zero."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


# ---- data --------------------------------------------------------------------------


def load_prompts(path: str | Path) -> list[list[dict]]:
    """Unique prompts (chats) from a preference dataset's `prompt` column, an SFT
    `messages` column (the turns before the last assistant turn) or a prompt
    JSONL whose `prompt` is a string."""
    ds = load_data(path)
    ds = without_discarded(ds, "prefs" if "chosen" in ds.column_names else "sft", describe(path))
    column = next((c for c in ("prompt", "messages") if c in ds.column_names), None)
    if column is None:
        raise TrainError(f"PPO needs a `prompt` or `messages` column; got {ds.column_names}")
    seen: dict[str, list[dict]] = {}
    for value in ds[column]:
        chat = [{"role": "user", "content": value}] if isinstance(value, str) else [dict(m) for m in value]
        if column == "messages" and chat and chat[-1]["role"] == "assistant":
            chat = chat[:-1]
        chat = [{"role": m["role"], "content": m["content"]} for m in chat]
        seen.setdefault(json.dumps(chat, sort_keys=True), chat)
    return list(seen.values())


def chat_ids(tokenizer, chat: list[dict], generation_prompt: bool = True) -> list[int]:
    """Ids as TRL tokenizes a chat: the template's own special tokens, no extra BOS."""
    enc = tokenizer.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=True, return_dict=True)
    return list(enc["input_ids"])


def prompt_batch(n: int, step: int, size: int, seed: int) -> list[int]:
    """Indices for `step`: consecutive slices of a fresh seeded permutation per epoch (resume-safe)."""
    out = []
    for k in range(step * size, (step + 1) * size):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + k // n))
        out.append(int(perm[k % n]))
    return out


# ---- model passes ------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


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


@torch.no_grad()
def rollout(policy, tokenizer, chats: list[list[dict]], cfg: PPOConfig, end_ids: list[int]) -> dict[str, Any]:
    """Sample one completion per chat. Tokens after the first turn end are padding (mask 0)."""
    from transformers import GenerationConfig

    device = next(policy.parameters()).device
    enc = tokenizer.pad({"input_ids": [chat_ids(tokenizer, c) for c in chats]}, padding=True, return_tensors="pt").to(device)
    gen = GenerationConfig(
        do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0, max_new_tokens=cfg.max_new_tokens,
        eos_token_id=end_ids, pad_token_id=tokenizer.pad_token_id,
    )
    seq = policy.generate(**enc, generation_config=gen)
    n_prompt = enc["input_ids"].shape[1]
    new = seq[:, n_prompt:]
    is_end = torch.isin(new, torch.tensor(end_ids, device=device))
    after_end = (is_end.long().cumsum(-1) - is_end.long()) > 0
    new = new.masked_fill(after_end, tokenizer.pad_token_id)
    cmask = (~after_end).float()
    texts = [tokenizer.decode(row[m.bool() & ~e], skip_special_tokens=True) for row, m, e in zip(new, cmask, is_end)]
    return {
        "seq": torch.cat([enc["input_ids"], new], 1), "mask": torch.cat([enc["attention_mask"], cmask.long()], 1),
        "cmask": cmask, "n_prompt": n_prompt, "texts": texts, "ended": is_end.any(-1),
    }


def reward_model_scorer(path: str, batch_size: int = 16):
    """Score chats with an AutoModelForSequenceClassification saved by `cai train rm`."""
    tok = load_tokenizer(path, padding_side="right")
    check_chat_format(tok)
    rm = load_model(path, "reward", pad_token_id=tok.pad_token_id).to(DEVICE).eval()

    @torch.no_grad()
    def score(prompts: list[list[dict]], texts: list[str]) -> list[float]:
        chats = [p + [{"role": "assistant", "content": t}] for p, t in zip(prompts, texts)]
        ids = [chat_ids(tok, c, generation_prompt=False) for c in chats]
        out = []
        for k in range(0, len(ids), batch_size):
            enc = tok.pad({"input_ids": ids[k : k + batch_size]}, padding=True, return_tensors="pt")
            out += rm(**enc.to(rm.device)).logits[:, 0].float().tolist()
        return out

    return score


# ---- advantages and the update -----------------------------------------------------


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


def whiten(x, mask):
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


@torch.no_grad()
def score_batch(policy, head, ref, batch, scores, cfg: PPOConfig) -> dict[str, Any]:
    """Old log-probs, values and reference log-probs; per-token rewards; GAE."""
    chunks = defaultdict(list)
    for idx in torch.arange(len(scores)).split(cfg.minibatch_size):
        args = (batch["seq"][idx], batch["mask"][idx], batch["n_prompt"], cfg.temperature)
        logp, entropy, values = forward(policy, head, *args)
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
    rewards = -cfg.kl_coef * kl
    last = mask.sum(1).long().clamp(min=1) - 1
    rewards[torch.arange(len(scores), device=mask.device), last] += scores
    adv, returns = gae(rewards, b["values"], mask, cfg.gamma, cfg.lam)
    return b | {"adv": whiten(adv, mask), "returns": returns, "kl": kl.sum(1), "non_score": rewards.sum(1) - scores}


def ppo_update(policy, head, optimizer, batch, b, cfg: PPOConfig, generator) -> dict[str, float]:
    """ppo_epochs x minibatches of clipped PPO; returns mean losses and clip fraction."""
    stats = defaultdict(list)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for _ in range(cfg.ppo_epochs):
        for idx in torch.randperm(len(b["adv"]), generator=generator).split(cfg.minibatch_size):
            mask = batch["cmask"][idx]
            seq, seq_mask = batch["seq"][idx], batch["mask"][idx]
            logp, entropy, values = forward(policy, head, seq, seq_mask, batch["n_prompt"], cfg.temperature)
            ratio = (logp - b["logp"][idx]).exp()
            adv = b["adv"][idx]
            clipped = ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)
            pg_loss = masked_mean(torch.max(-adv * ratio, -adv * clipped), mask)
            old_v, ret = b["values"][idx], b["returns"][idx]
            v_clipped = old_v + (values - old_v).clamp(-cfg.clip_range_value, cfg.clip_range_value)
            vf_loss = 0.5 * masked_mean(torch.max((values - ret) ** 2, (v_clipped - ret) ** 2), mask)
            ent = masked_mean(entropy, mask)
            loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * ent
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            stats["pg_loss"].append(pg_loss.item())
            stats["vf_loss"].append(vf_loss.item())
            stats["clipfrac"].append(masked_mean(((ratio - 1).abs() > cfg.clip_range).float(), mask).item())
            stats["approx_kl"].append(masked_mean(0.5 * (logp - b["logp"][idx]) ** 2, mask).item())
    return {k: sum(v) / len(v) for k, v in stats.items()}


def ppo_step(run: dict[str, Any], step: int) -> dict[str, float]:
    """One rollout + score + update; the log row."""
    cfg, policy, tok = run["cfg"], run["policy"], run["tokenizer"]
    started = time.perf_counter()
    torch.manual_seed(cfg.seed + step)
    chats = [run["prompts"][i] for i in prompt_batch(len(run["prompts"]), step, cfg.batch_size, cfg.seed)]
    batch = rollout(policy, tok, chats, cfg, run["end_ids"])
    scores = torch.tensor([float(s) for s in run["scorer"](chats, batch["texts"])], device=batch["cmask"].device)
    raw = scores.clone()
    scores = scores - cfg.missing_eos_penalty * (~batch["ended"]).float()
    b = score_batch(policy, run["head"], run["ref"], batch, scores, cfg)
    gen = torch.Generator().manual_seed(cfg.seed + step)
    stats = ppo_update(policy, run["head"], run["optimizer"], batch, b, cfg, gen)
    mask = batch["cmask"]
    return {
        "step": step + 1, "reward": raw.mean().item(), "reward_std": raw.std().item() if len(raw) > 1 else 0.0,
        "kl": b["kl"].mean().item(), "entropy": masked_mean(b["entropy"], mask).item(),
        "non_score_reward": b["non_score"].mean().item(), **stats,
        "completion_tokens": mask.sum(1).mean().item(), "ended_rate": batch["ended"].float().mean().item(),
        "seconds": round(time.perf_counter() - started, 3),
    }


# ---- entry point -------------------------------------------------------------------


def build_run(data, model, reward_model, reward_fn, ref_model, lora, cfg: PPOConfig) -> dict[str, Any]:
    path = model_path(model)
    tok = load_tokenizer(path, padding_side="left")
    end_ids = check_chat_format(tok)
    policy = load_model(path)
    ref = None
    if lora:
        from peft import get_peft_model

        policy = get_peft_model(policy, lora_config(lora, "CAUSAL_LM"))
    if ref_model or not lora:
        ref = load_model(model_path(ref_model) if ref_model else path).to(DEVICE).eval().requires_grad_(False)
    policy.to(DEVICE).eval()  # eval: no dropout, so rollout and update see the same policy
    head = ValueHead(policy.config.hidden_size).to(DEVICE)
    params = [p for p in policy.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, eps=1e-5)
    prompts = [c for c in load_prompts(data) if len(chat_ids(tok, c)) <= cfg.max_prompt_tokens]
    if not prompts:
        raise TrainError(f"no prompt of at most {cfg.max_prompt_tokens} tokens in {data}")
    scorer = reward_fn or reward_model_scorer(model_path(reward_model))
    return dict(cfg=cfg, policy=policy, ref=ref, head=head, optimizer=optimizer, tokenizer=tok,
                end_ids=end_ids, prompts=prompts, scorer=scorer, model_path=path)


def train_ppo(
    data: str | Path,
    model: str | None = None,
    out: str | Path = "runs/ppo",
    *,
    reward_model: str | None = None,
    reward_fn: RewardFn | None = None,
    ref_model: str | None = None,
    lora: bool | dict[str, Any] = False,
    config: PPOConfig | dict[str, Any] | None = None,
    resume: bool | str = False,
    threads: int | None = None,
) -> TrainResult:
    """PPO of `model` (usually the SFT output) against a reward model folder
    (`reward_model`, from `cai train rm`) or `reward_fn(prompts, completions)
    -> scores`. The reference is `ref_model` or a frozen copy of `model` (with
    LoRA: `model` with its adapter disabled, no copy). Prompts come from
    `data`. `resume=True` continues from the last OUT/checkpoint-N. Writes OUT
    (the policy; reloads with AutoModelForCausalLM), OUT/value_head.pt,
    OUT/log.jsonl, OUT/ppo_config.json and OUT/metrics.json."""
    if (reward_model is None) == (reward_fn is None):
        raise TrainError("PPO needs exactly one of a reward model folder or a reward function")
    cfg = config.model_copy() if isinstance(config, PPOConfig) else PPOConfig(**(config or {}))
    n_threads = set_threads(threads)
    out = Path(out)
    run = build_run(data, model, reward_model, reward_fn, ref_model, lora, cfg)
    if cfg.epochs is not None:
        cfg.steps = max(1, math.ceil(cfg.epochs * len(run["prompts"]) / cfg.batch_size))
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = resume_checkpoint(resume, out)
    start = load_checkpoint(run, Path(checkpoint)) if checkpoint else 0
    log_path = out / "log.jsonl"
    history = truncate_log(log_path, start)  # a fresh run (start 0) keeps no row
    started, rows = time.perf_counter(), []
    for step in range(start, cfg.steps):
        rows.append(ppo_step(run, step))
        history.append(rows[-1])
        atomic_write_jsonl(log_path, history)  # the whole log each step: a kill never leaves half a line
        if (step + 1) % cfg.save_steps == 0 or step + 1 == cfg.steps:
            save_checkpoint(run, out, step + 1)
    head = run["head"]
    with atomic_open(out / "value_head.pt", "wb") as f:
        torch.save({"state_dict": head.state_dict(), "hidden_size": head.linear.in_features}, f)
    atomic_write_json(out / "ppo_config.json", cfg.model_dump())
    run["tokenizer"].padding_side = "right"  # as loaded elsewhere; engines pad left themselves
    save_model(run["policy"], run["tokenizer"], out, run["end_ids"])
    metrics = {
        "trainer": "ppo", "model": run["model_path"], "data": describe(data), "prompts": len(run["prompts"]),
        "reward_model": reward_model, "lora": bool(lora), "threads": n_threads, "resumed_from": checkpoint,
        "steps": cfg.steps,
        "steps_run": len(rows), "seconds": round(time.perf_counter() - started, 1), "last": rows[-1] if rows else None,
    }
    atomic_write_json(out / "metrics.json", metrics)
    return TrainResult(out=str(out), metrics=metrics)
