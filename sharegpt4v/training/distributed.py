"""The launch's processes: rank and world size from the environment, and the collectives (no-ops alone)."""

from __future__ import annotations

import os
import socket
from typing import Any

import torch


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment (torchrun, deepspeed)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_process_env() -> dict[str, str]:
    """What DeepSpeed needs to run one process without looking for MPI."""
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}


def _dist_on() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _barrier() -> None:
    if _dist_on():
        torch.distributed.barrier()


def _gather(obj: Any) -> list[Any]:
    if not _dist_on():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    if not _dist_on():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def _local_first(local_rank: int, fn: Any) -> Any:
    """Run `fn` on local rank 0 first (e.g. one download into a node's cache), then on the others."""
    if local_rank == 0:
        result = fn()
        _barrier()
        return result
    _barrier()
    return fn()
