"""torch.distributed plumbing shared by the stages: who am I, wait for the others, launched by torchrun?

Stages call :func:`rank_world` and :func:`barrier`, which fall back to rank 0 of 1 when no process group exists, so
world size 1 runs the same code as a multi-process launch. The CLI calls :func:`init_from_env` so that
``torchrun --nproc-per-node N -m ravl_engine.cli embed ...`` works without extra flags. :class:`TorchComm` gives the
sharded kernels (kernels/sharded.py, written against ``kernels.comm.Comm``) the process group's collectives.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ravl_engine.errors import ConfigError

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


def check_device(device: str) -> str:
    """``device`` unchanged if this machine has it.

    Raises:
        ConfigError: not a torch device name, or a CUDA / MPS device this machine does not have.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"{device!r} is not a torch device; use cpu, cuda or cuda:N") from err
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{device!r}: this machine has no usable CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"{device!r}: there are only {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{device!r}: MPS is not available on this machine; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{device!r}: ravl-engine runs on cpu, cuda or mps devices")
    return device


def local_device(device: str) -> str:
    """``cuda`` -> ``cuda:LOCAL_RANK`` under a multi-process launch; any other device unchanged."""
    if device == "cuda" and is_distributed():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def local_share(batch: Tensor) -> Tensor:
    """This rank's equal, contiguous share of a global batch of indices (the tail that does not divide evenly is
    dropped); the whole batch without a process group."""
    rank, world = rank_world()
    if world == 1:
        return batch
    return batch[: batch.numel() - batch.numel() % world].chunk(world)[rank]


def gather_with_grad(t: Tensor) -> Tensor:
    """Every rank's rows concatenated in rank order, gradients flowing back to each rank's own rows (equal shapes
    on every rank). Identity without a process group."""
    if not is_distributed():
        return t
    import torch.distributed.nn.functional as dist_fn  # noqa: PLC0415

    return torch.cat(dist_fn.all_gather(t))


def gather(t: Tensor) -> Tensor:
    """Every rank's rows concatenated in rank order, no gradient (equal shapes). Identity without a group."""
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def wrap_ddp(module: nn.Module, device: str) -> nn.Module:
    """``module`` in DistributedDataParallel under a multi-process launch, else unchanged. On GPUs BatchNorm becomes
    SyncBatchNorm; on CPU (gloo) each rank keeps its own batch statistics, since SyncBatchNorm needs a GPU."""
    if not is_distributed() or dist.get_world_size() == 1:
        return module
    cuda = torch.device(device).type == "cuda"
    if cuda:
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return nn.parallel.DistributedDataParallel(module, device_ids=[torch.device(device).index] if cuda else None)


def sync_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank, so that all ranks hold the same model."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank; ``value`` itself without a process group."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class TorchComm:
    """:class:`~ravl_engine.kernels.comm.Comm` over torch.distributed's default process group (must be initialised)."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()

    def _reduce(self, t: Tensor, op: Any) -> Tensor:
        out = t.clone()
        dist.all_reduce(out, op=op)
        return out

    def sum(self, t: Tensor) -> Tensor:
        return self._reduce(t, dist.ReduceOp.SUM)

    def max(self, t: Tensor) -> Tensor:
        return self._reduce(t, dist.ReduceOp.MAX)

    def min(self, t: Tensor) -> Tensor:
        return self._reduce(t, dist.ReduceOp.MIN)

    def gather(self, t: Tensor) -> Tensor:
        """Every rank's tensor concatenated along dim 0 in rank order (lengths may differ: padded, then cut)."""
        n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        longest = int(max(int(s) for s in sizes))
        padded = t.new_zeros((longest, *t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.zeros_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: int(s)] for p, s in zip(parts, sizes, strict=True)])
