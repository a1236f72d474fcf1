"""A recipe's training stages under `accelerate launch`: the `launcher:` setting and the command it makes.

    launcher: {accelerate_config: ddp, num_processes: 8}

runs each training stage (`cai run RUN/02-sft/job.json`, ...) as

    python -m accelerate.commands.launch --config_file cai/recipes/accelerate/ddp.yaml \
        --num_processes 8 -m cai run RUN/02-sft/job.json

Generation, judging and evaluation stages stay in one process (their engines manage the GPUs
themselves). The shipped configs are cai/recipes/accelerate/{ddp,fsdp,zero2,zero3}.yaml; zero2 and
zero3 need DeepSpeed (`pip install deepspeed`), checked before the stage starts.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cai.train.data import TrainError

SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "recipes" / "accelerate"
LAUNCHED = ("sft", "rm", "dpo", "ppo")
SHARDED = ("FSDP", "DEEPSPEED")


def config_file(spec: str) -> Path:
    """A shipped config's name (`ddp`, `fsdp`, `zero2`, `zero3`) or an accelerate config YAML file."""
    shipped = SHIPPED_CONFIGS / f"{spec}.yaml"
    if shipped.is_file() and not Path(spec).exists():
        return shipped
    if Path(spec).is_file():
        return Path(spec).resolve()
    names = ", ".join(p.stem for p in sorted(SHIPPED_CONFIGS.glob("*.yaml")))
    raise TrainError(f"accelerate config {spec!r}: no such file, and not a shipped config ({names})")


def distributed_type(path: Path) -> str:
    """The config's `distributed_type` (MULTI_GPU, FSDP, DEEPSPEED, ...)."""
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise TrainError(f"{path}: not a readable accelerate config: {exc}") from None
    if not isinstance(config, dict) or not config.get("distributed_type"):
        raise TrainError(f"{path}: an accelerate config needs distributed_type (MULTI_GPU, FSDP, DEEPSPEED); "
                         "write one with `accelerate config --config_file FILE`")
    return str(config["distributed_type"]).upper()


class Launcher(BaseModel):
    """How a recipe's training stages are launched: `accelerate launch` with one process per GPU."""

    model_config = ConfigDict(extra="forbid")
    accelerate_config: str = Field(
        description="a shipped accelerate config (ddp, fsdp, zero2, zero3: cai/recipes/accelerate/NAME.yaml) or "
        "an accelerate config YAML file")
    num_processes: int | None = Field(
        None, ge=1, description="processes (GPUs) per training stage; default: every GPU visible when the stage "
        "starts. batch_size is per process: the global batch is processes x batch_size x gradient accumulation")
    stages: list[Literal[LAUNCHED]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(LAUNCHED), description="the training stages launched (recipe keys; ppo with "
        "DDP only); grpo with the judge as its reward trains in one process")
    args: list[str] = Field(default_factory=list, description="more `accelerate launch` flags, as given "
                            "(e.g. [--main_process_port, '29501'])")

    @field_validator("accelerate_config")
    @classmethod
    def _readable(cls, spec: str) -> str:
        try:
            distributed_type(config_file(spec))
        except TrainError as exc:
            raise ValueError(str(exc)) from None
        return spec

    def check(self, method: str) -> None:
        """Refuse what cannot run: cai's PPO needs the whole model on every process (DDP, not sharded)."""
        kind = distributed_type(config_file(self.accelerate_config))
        if method == "ppo" and "ppo" in self.stages and kind in SHARDED:
            raise TrainError(f"launcher: PPO runs on one process or with DDP, not {kind} "
                             f"({self.accelerate_config}); use accelerate_config: ddp, or leave ppo out of "
                             "launcher.stages")

    def command(self, target: list[str]) -> list[str]:
        """`python -m accelerate.commands.launch ... TARGET` (TARGET: `-m cai run JOB.json`). Checks
        that DeepSpeed is installed when the config needs it, and counts the GPUs when
        num_processes is unset."""
        path = config_file(self.accelerate_config)
        if distributed_type(path) == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
            raise TrainError(f"launcher: {self.accelerate_config} runs DeepSpeed, which is not installed: "
                             "pip install deepspeed (or use accelerate_config: fsdp)")
        processes = self.num_processes or visible_gpus()
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path),
                "--num_processes", str(processes), *self.args, *target]


def visible_gpus() -> int:
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise TrainError("launcher: num_processes is unset and no CUDA GPU is visible; set launcher.num_processes")
    return count


def shown(command: list[str]) -> list[str]:
    """The command as a person types it: `cai ...` for `python -m cai ...`, `accelerate launch ...` for
    `python -m accelerate.commands.launch ...`."""
    for module, words in (("cai", ["cai"]), ("accelerate.commands.launch", ["accelerate", "launch"])):
        if command[1:3] == ["-m", module]:
            return [*words, *command[3:]]
    return command
