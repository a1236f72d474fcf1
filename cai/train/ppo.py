"""A compact PPO for RL from AI feedback (TRL removed its PPOTrainer in 1.13).

Before training (a fresh run): `reward_norm_warmup` batches are sampled and scored, with no
update, to start the reward moments and to set the value head's bias to their mean normalised score.

One step:
  1. rollout  `batch_size` prompts, rendered with the chat template exactly as
              TRL and cai's engines render them, sampled up to `max_new_tokens`
              with every sampling setting explicit (nothing from the model's
              generation_config); a completion ends at its first turn-end token.
  2. score    a reward model (the `cai train rm` output) on prompt + completion
              (a cut-off completion is not rendered as a finished turn), or a
              Python reward function; then normalised by the running mean/std
              (`reward_norm`), minus `missing_eos_penalty` if cut off.
  3. rewards  per token: -kl_coef * (log pi(a_t) - log pi_ref(a_t)) against the
              frozen reference, plus the normalised score on the last token.
  4. GAE      advantages and returns from the value head (a linear layer on
              the policy's last hidden state), advantages whitened.
  5. update   `ppo_epochs` passes over shuffled minibatches: clipped surrogate
              + vf_coef * clipped value loss - ent_coef * entropy; the policy's
              and the value head's gradients are clipped apart. On the first
              minibatch the sampled tokens' probabilities must match the
              update's (`first_ratio` ~ 1; see `ratio_check`).
One JSON line per step goes to OUT/log.jsonl (reward, KL, entropy, losses,
first_ratio, ...). The policy is saved as a plain HF folder (merged when
LoRA), the value head beside it in OUT/value_head.pt. Checkpoints hold the
trainable weights, the value head, the optimiser and the reward moments, so a
resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from cai.files import atomic_open, atomic_write_json, atomic_write_jsonl
from cai.train.common import (
    TrainError,
    TrainResult,
    check_chat_format,
    describe,
    load_model,
    load_tokenizer,
    log,
    lora_config,
    model_path,
    resume_checkpoint,
    save_model,
    set_threads,
)
from cai.train.ppo_checkpoint import load_checkpoint, save_checkpoint, truncate_log
from cai.train.ppo_config import PPOConfig
from cai.train.ppo_core import (
    PolicyWithValue,
    RewardNorm,
    ValueHead,
    autocast,
    disable_dropout,
    masked_mean,
    ppo_update,
    score_batch,
)
from cai.train.ppo_distributed import Processes, in_sync, processes
from cai.train.ppo_rollout import (
    RewardFn,
    chat_ids,
    function_scorer,
    generation_config,
    load_prompts,
    prompt_batch,
    reward_model_scorer,
    rollout,
    score_rollout,
)

__all__ = ["PPOConfig", "RewardFn", "train_ppo", "load_prompts"]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # one device; float32 weights, bf16 autocast on GPU
WARMUP_SEED = 1_000_003  # warm-up batches draw prompts and samples apart from the training steps


def resolve_config(config: PPOConfig | dict[str, Any] | None) -> PPOConfig:
    """The settings, with bf16 and gradient checkpointing decided for this machine when left None."""
    try:
        cfg = config.model_copy() if isinstance(config, PPOConfig) else PPOConfig(**(config or {}))
    except ValidationError as exc:
        raise TrainError(f"PPO settings: {exc}") from None
    cuda = DEVICE == "cuda"
    if cfg.bf16 is None:
        cfg.bf16 = cuda and torch.cuda.is_bf16_supported()
    if cfg.gradient_checkpointing is None:
        cfg.gradient_checkpointing = cuda
    return cfg


# ---- one step ----------------------------------------------------------------------


def sample(run: dict[str, Any], step: int, seed: int):
    """Rollout and raw scores of this process's `batch_size` prompts of `step` (its slice of the
    `batch_size x processes` prompts the step draws), seeded per step and process."""
    cfg, procs = run["cfg"], run["procs"]
    indices = prompt_batch(len(run["prompts"]), step, cfg.batch_size * procs.count, seed)
    chats = [run["prompts"][i] for i in indices[procs.index * cfg.batch_size : (procs.index + 1) * cfg.batch_size]]
    torch.manual_seed((seed + step) * procs.count + procs.index)
    batch = rollout(run, chats)
    with autocast(cfg, run["device"]):
        raw = score_rollout(run["scorer"], chats, batch)
    return batch, raw


def final_scores(run: dict[str, Any], raw: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
    """Normalised scores (as `reward_norm` says), minus the missing-EOS penalty for cut-off completions."""
    cfg = run["cfg"]
    scores = raw if cfg.reward_norm == "none" else run["norm"].normalise(raw)
    return scores - cfg.missing_eos_penalty * (~ended).float()


@torch.no_grad()
def warm_up(run: dict[str, Any]) -> dict[str, Any] | None:
    """Sample and score `reward_norm_warmup` batches (no update): the reward moments start from them
    and the value head's bias is set to their mean final score. Without warm-up batches the first
    training batch sets the bias."""
    cfg = run["cfg"]
    if cfg.reward_norm_warmup == 0:
        run["init_value_bias"] = True
        return None
    raws, ended = [], []
    for k in range(cfg.reward_norm_warmup):
        batch, raw = sample(run, k, cfg.seed + WARMUP_SEED)
        raws.append(run["procs"].gather(raw))
        ended.append(run["procs"].gather(batch["ended"]))
    raw, ended = torch.cat(raws), torch.cat(ended)
    if cfg.reward_norm != "none":
        run["norm"].update(raw.tolist())
    bias = final_scores(run, raw, ended).mean().item()
    run["head"].linear.bias.fill_(bias)
    summary = {"batches": cfg.reward_norm_warmup, "reward_mean": raw.mean().item(),
               "reward_std": raw.std().item() if len(raw) > 1 else 0.0, "value_bias": bias,
               "ended_rate": ended.float().mean().item()}
    log.info("PPO reward warm-up: %s", summary)
    return summary


def ppo_step(run: dict[str, Any], step: int) -> dict[str, float]:
    """One rollout + score + update; the log row."""
    cfg, procs = run["cfg"], run["procs"]
    started = time.perf_counter()
    batch, raw = sample(run, step, cfg.seed)
    raw_all, ended_all = procs.gather(raw), procs.gather(batch["ended"])
    if cfg.reward_norm == "running":
        run["norm"].update(raw_all.tolist())
    scores = final_scores(run, raw, batch["ended"])
    if run.pop("init_value_bias", False):
        with torch.no_grad():
            run["head"].linear.bias.fill_(final_scores(run, raw_all, ended_all).mean().item())
    b = score_batch(run, batch, scores)
    stats = ppo_update(run, batch, b, step)
    mask = batch["cmask"]
    local = {
        "score": scores.mean().item(), "kl": b["kl"].mean().item(), "entropy": masked_mean(b["entropy"], mask).item(),
        "non_score_reward": b["non_score"].mean().item(), "value": masked_mean(b["values"], mask).item(), **stats,
        "completion_tokens": mask.sum(1).mean().item(), "ended_rate": batch["ended"].float().mean().item(),
    }
    return {
        "step": step + 1, "reward": raw_all.mean().item(), "reward_std": raw_all.std().item() if len(raw_all) > 1 else 0.0,
        "reward_running_mean": run["norm"].mean, "reward_running_std": run["norm"].std, **procs.mean(local),
        "seconds": round(time.perf_counter() - started, 3),
    }


# ---- entry point -------------------------------------------------------------------


def load_policy(path: str, lora, cfg: PPOConfig, device: str):
    """The policy (LoRA-wrapped if asked), dropout off, checkpointing on if asked, on `device`."""
    policy = load_model(path)
    disable_dropout(policy)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        from peft import get_peft_model

        policy = get_peft_model(policy, lora_config(lora, "CAUSAL_LM"))
        disable_dropout(policy)  # LoRA's own dropout too
    return policy.to(device).eval()


def build_run(data, model, reward_model, reward_fn, ref_model, lora, cfg: PPOConfig,
              procs: Processes | None = None) -> dict[str, Any]:
    procs = procs or Processes(DEVICE)
    device = procs.device
    path = model_path(model)
    tok = load_tokenizer(path, padding_side="left")
    end_ids = check_chat_format(tok)
    policy = load_policy(path, lora, cfg, device)
    ref = None
    if ref_model or not lora:
        ref = load_model(model_path(ref_model) if ref_model else path).to(device).eval().requires_grad_(False)
    head = ValueHead(policy.config.hidden_size).to(device)
    params = ([p for p in policy.parameters() if p.requires_grad], list(head.parameters()))
    optimizer = torch.optim.AdamW(params[0] + params[1], lr=cfg.learning_rate, eps=1e-5, weight_decay=cfg.weight_decay)
    prompts = [c for c in load_prompts(data) if len(chat_ids(tok, c)) <= cfg.max_prompt_tokens]
    if not prompts:
        raise TrainError(f"no prompt of at most {cfg.max_prompt_tokens} tokens in {data}")
    scorer = function_scorer(reward_fn) if reward_fn else reward_model_scorer(model_path(reward_model), device)
    return dict(cfg=cfg, policy=policy, ref=ref, head=head, optimizer=optimizer, params=params, tokenizer=tok,
                end_ids=end_ids, prompts=prompts, scorer=scorer, model_path=path, device=device, procs=procs,
                trainer=procs.wrap(PolicyWithValue(policy, head)), norm=RewardNorm(),
                generation_config=generation_config(cfg, tok, end_ids))


def train_steps(run: dict[str, Any], out: Path, start: int) -> list[dict[str, Any]]:
    """Steps `start`..steps-1; the main process writes the log each step and the checkpoints."""
    cfg, procs = run["cfg"], run["procs"]
    log_path = out / "log.jsonl"
    history = truncate_log(log_path, start) if procs.main else []  # a fresh run (start 0) keeps no row
    rows = []
    for step in range(start, cfg.steps):
        rows.append(ppo_step(run, step))
        history.append(rows[-1])
        if procs.main:
            atomic_write_jsonl(log_path, history)  # the whole log each step: a kill never leaves half a line
        if (step + 1) % cfg.save_steps == 0 or step + 1 == cfg.steps:
            if procs.main:
                save_checkpoint(run, out, step + 1)
            procs.barrier()
    return rows


def save_outputs(run: dict[str, Any], out: Path) -> None:
    head = run["head"]
    with atomic_open(out / "value_head.pt", "wb") as f:
        torch.save({"state_dict": head.state_dict(), "hidden_size": head.linear.in_features}, f)
    atomic_write_json(out / "ppo_config.json", run["cfg"].model_dump())
    run["tokenizer"].padding_side = "right"  # as loaded elsewhere; engines pad left themselves
    save_model(run["policy"], run["tokenizer"], out, run["end_ids"])


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
    cfg = resolve_config(config)
    procs = processes(DEVICE)  # before any model loads: FSDP and DeepSpeed are refused here
    n_threads = set_threads(threads)
    out = Path(out)
    run = build_run(data, model, reward_model, reward_fn, ref_model, lora, cfg, procs)
    if cfg.epochs is not None:
        cfg.steps = max(1, math.ceil(cfg.epochs * len(run["prompts"]) / (cfg.batch_size * procs.count)))
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = resume_checkpoint(resume, out)
    start = load_checkpoint(run, Path(checkpoint)) if checkpoint else 0
    warmup = warm_up(run) if start == 0 else None
    started = time.perf_counter()
    rows = train_steps(run, out, start)
    metrics = {
        "trainer": "ppo", "model": run["model_path"], "data": describe(data), "prompts": len(run["prompts"]),
        "reward_model": reward_model, "lora": bool(lora), "threads": n_threads, "resumed_from": checkpoint,
        "world_size": procs.count, "steps": cfg.steps, "bf16": cfg.bf16,
        "gradient_checkpointing": cfg.gradient_checkpointing, "reward_warmup": warmup,
        "reward_norm": run["norm"].model_dump(), "steps_run": len(rows),
        "seconds": round(time.perf_counter() - started, 1), "last": rows[-1] if rows else None,
    }
    if procs.count > 1:
        metrics["weights_in_sync"] = in_sync(procs, [run["policy"], run["head"]])
    if procs.main:
        save_outputs(run, out)
        atomic_write_json(out / "metrics.json", metrics)
    procs.barrier()  # no process returns before OUT is written
    return TrainResult(out=str(out), metrics=metrics)
