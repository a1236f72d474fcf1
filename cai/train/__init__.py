"""Trainers over cai's datasets: SFT, reward model and DPO are thin over TRL
(`trl_args` go into TRL's own config classes); PPO is cai's own (TRL >= 1.13
has none). Each reads a dataset from disk and writes OUT/ (a plain HF model
folder), OUT/log.jsonl and OUT/metrics.json.

    from cai.train import train_sft, train_reward_model, train_dpo, train_ppo
    train_sft("jobs/sft/sft.parquet", out="runs/sft", trl_args={"num_train_epochs": 1})
"""

from cai.train.common import TrainError, TrainResult, load_data
from cai.train.dpo import train_dpo
from cai.train.ppo import PPOConfig, train_ppo
from cai.train.reward import train_reward_model
from cai.train.sft import train_sft

__all__ = [
    "PPOConfig",
    "TrainError",
    "TrainResult",
    "load_data",
    "train_dpo",
    "train_ppo",
    "train_reward_model",
    "train_sft",
]
