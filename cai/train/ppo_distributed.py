"""PPO on one process or on several with DDP (`accelerate launch --multi_gpu`, torchrun).

Under DDP each process samples and scores its own slice of the prompts (`batch_size` each), the
policy and value head are one DistributedDataParallel module, so every backward pass averages the
gradients over the processes and the weights stay identical. The reward moments, the value head's
starting bias and the first-minibatch ratio check use the scores of all processes, so every
process normalises, starts and decides alike; the log row averages all processes. Only the main
process writes (log, checkpoints, OUT). FSDP and DeepSpeed are refused: they shard the weights
that sampling and the reference pass need whole.
"""

from __future__ import annotations

import os

import torch

from cai.train.common import TrainError
from cai.train.distributed import world_size


class Processes:
    """One process: everything is local."""

    count, index, main = 1, 0, True

    def __init__(self, device: str):
        self.device = device

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """`x` of every process, concatenated in process order."""
        return x

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over the processes."""
        return values

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return module

    def barrier(self) -> None:
        pass


class DDPProcesses(Processes):
    """Several processes started by `accelerate launch` (or torchrun): DDP through accelerate."""

    def __init__(self):
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.count, self.index = self.accelerator.num_processes, self.accelerator.process_index
        self.main = self.accelerator.is_main_process
        self.device = str(self.accelerator.device)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x if x.is_floating_point() else x.float()  # gloo gathers no bool
        return self.accelerator.gather(x.to(self.device).contiguous()).to(dtype)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        vector = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        return dict(zip(keys, self.accelerator.reduce(vector, "mean").tolist()))

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.prepare_model(module)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


def processes(device: str) -> Processes:
    """The processes this run trains on, from the launcher's environment."""
    if world_size() == 1:
        return Processes(device)
    sharded = [name for name, var in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
               if os.environ.get(var, "").lower() == "true"]
    if sharded:
        raise TrainError(
            f"cai train ppo runs on one process or with DDP, not {sharded[0]}: its rollouts and reference pass "
            "need the whole model on each process. Launch it with the ddp accelerate config "
            "(accelerate launch --config_file cai/recipes/accelerate/ddp.yaml) or --multi_gpu, "
            "and use --lora if the model does not fit on one GPU")
    return DDPProcesses()


def in_sync(procs: Processes, modules: list[torch.nn.Module]) -> bool:
    """Whether every process holds the same trainable weights (a sum per process, compared)."""
    total = sum(p.detach().double().sum() for m in modules for p in m.parameters() if p.requires_grad)
    sums = procs.gather(torch.as_tensor(total, dtype=torch.float64).reshape(1))
    return bool(torch.allclose(sums, sums[:1].expand_as(sums), rtol=1e-6, atol=1e-6))
