"""Which process this is when a trainer runs under `accelerate launch` (or torchrun).

Read from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK), so it answers the same
before and after torch.distributed is initialised and costs nothing in a single process.
"""

from __future__ import annotations

import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True in the process that writes outputs, logs and metrics (rank 0, or the only process)."""
    return rank() == 0
