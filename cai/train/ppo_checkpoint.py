"""PPO checkpoints (trainable weights, value head, optimizer, reward moments, settings) and the log rows a resume keeps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from cai.files import atomic_write_json, atomic_write_jsonl, read_jsonl
from cai.train.common import TrainError, log
from cai.train.ppo_core import RewardNorm


def save_checkpoint(run: dict[str, Any], out: Path, step: int, keep: int = 2) -> None:
    folder = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainable = {n: p.detach() for n, p in run["policy"].named_parameters() if p.requires_grad}
    torch.save(trainable, tmp / "policy_trainable.pt")
    torch.save(run["head"].state_dict(), tmp / "value_head.pt")
    torch.save(run["optimizer"].state_dict(), tmp / "optimizer.pt")
    state = {"step": step, "config": run["cfg"].model_dump(), "reward_norm": run["norm"].model_dump()}
    atomic_write_json(tmp / "state.json", state)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    ckpts = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in ckpts[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(run: dict[str, Any], folder: Path) -> int:
    """Restore trainable weights, value head, optimizer and reward moments; return the step to continue from."""
    trainable = torch.load(folder / "policy_trainable.pt", map_location="cpu")
    missing = set(trainable) - {n for n, _ in run["policy"].named_parameters()}
    if missing:
        raise TrainError(f"{folder} does not match this model (e.g. {sorted(missing)[:2]}); same --lora setting?")
    run["policy"].load_state_dict(trainable, strict=False)
    run["head"].load_state_dict(torch.load(folder / "value_head.pt", map_location="cpu"))
    run["optimizer"].load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu"))
    state = json.loads((folder / "state.json").read_text())
    if "reward_norm" in state:
        run["norm"] = RewardNorm(**state["reward_norm"])
    else:
        log.warning("%s holds no reward moments (an older cai): normalisation starts again from this batch", folder)
    free = ("steps", "epochs", "save_steps")
    changed = [k for k, v in state["config"].items() if k not in free and getattr(run["cfg"], k, None) != v]
    if changed:
        log.warning("resuming %s with changed settings: %s", folder, ", ".join(changed))
    return state["step"]


def truncate_log(path: Path, step: int) -> list[dict[str, Any]]:
    """The log rows up to the checkpoint we resume from; the rows written after it are dropped."""
    rows = [row for row in read_jsonl(path) if row["step"] <= step] if path.exists() else []
    atomic_write_jsonl(path, rows)
    return rows
