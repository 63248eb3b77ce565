"""torch.distributed plumbing shared by the stages: who am I, wait for the others, launched by torchrun?

Stages call :func:`rank_world` and :func:`barrier`, which fall back to rank 0 of 1 when no process group exists, so
world size 1 runs the same code as a multi-process launch. The CLI calls :func:`init_from_env` so that
``torchrun --nproc-per-node N -m ravl_engine.cli embed ...`` works without extra flags.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the current process group; (0, 1) without one."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1), once.

    The backend is NCCL for CUDA devices and gloo otherwise; with CUDA each rank takes ``cuda:LOCAL_RANK``.

    Returns:
        True when this process now belongs to a group of more than one rank.
    """
    if is_distributed():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    logger.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return True


def local_device(device: str) -> str:
    """``cuda`` -> ``cuda:LOCAL_RANK`` under a multi-process launch; any other device unchanged."""
    if device == "cuda" and is_distributed():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device
