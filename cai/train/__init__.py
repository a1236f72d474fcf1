"""Trainers over cai's datasets: SFT, reward model, DPO and GRPO (online, the
constitutional judge as reward) are thin over TRL (`trl_args` go into TRL's own
config classes); PPO is cai's own (TRL >= 1.13 has none). Each reads a dataset from disk and writes OUT/ (a plain HF model
folder), OUT/log.jsonl and OUT/metrics.json.

    from cai.train import train_sft, train_reward_model, train_dpo, train_ppo, train_grpo
    train_sft("jobs/sft/sft.parquet", out="runs/sft", trl_args={"num_train_epochs": 1})

Names are imported on first use, so `import cai.train.jobs` (recipes, the CLI's help) loads no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "PPOConfig": "cai.train.ppo", "TrainError": "cai.train.data", "TrainResult": "cai.train.common",
    "load_data": "cai.train.data", "train_dpo": "cai.train.dpo", "train_grpo": "cai.train.grpo",
    "train_ppo": "cai.train.ppo", "train_reward_model": "cai.train.reward", "train_sft": "cai.train.sft",
}
__all__ = ["PPOConfig", "TrainError", "TrainResult", "load_data", "train_dpo", "train_grpo", "train_ppo",
           "train_reward_model", "train_sft"]

if TYPE_CHECKING:
    from cai.train.common import TrainResult
    from cai.train.data import TrainError, load_data
    from cai.train.dpo import train_dpo
    from cai.train.grpo import train_grpo
    from cai.train.ppo import PPOConfig, train_ppo
    from cai.train.reward import train_reward_model
    from cai.train.sft import train_sft


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cai.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
