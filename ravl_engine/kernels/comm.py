"""The collectives the sharded K-medoids is written against (:class:`Comm`), the one-process :class:`LocalComm`, and
:class:`Shard`, a rank's contiguous slice of the rows. The torch.distributed implementation (``TorchComm``) lives
with the engine's process-group code, in ravl_engine/distributed.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


class Comm(Protocol):
    """The collectives the sharded K-medoids needs; every rank calls each one in the same order."""

    rank: int
    world: int

    def sum(self, t: Tensor) -> Tensor: ...
    def max(self, t: Tensor) -> Tensor: ...
    def min(self, t: Tensor) -> Tensor: ...
    def gather(self, t: Tensor) -> Tensor:
        """Concatenate every rank's tensor along dim 0, in rank order (lengths may differ)."""
        ...


class LocalComm:
    """World size 1: every collective is the identity."""

    rank = 0
    world = 1

    def sum(self, t: Tensor) -> Tensor:
        return t

    def max(self, t: Tensor) -> Tensor:
        return t

    def min(self, t: Tensor) -> Tensor:
        return t

    def gather(self, t: Tensor) -> Tensor:
        return t


@dataclass(frozen=True)
class Shard:
    """This rank's rows: ``x`` [n_local, D] unit rows, global rows ``offset .. offset + n_local`` of ``total``."""

    x: Tensor
    offset: int
    total: int

    @classmethod
    def of(cls, x: Tensor, comm: Comm) -> Shard:
        counts = comm.gather(torch.tensor([x.shape[0]], dtype=torch.int64))
        return cls(x=x, offset=int(counts[: comm.rank].sum()), total=int(counts.sum()))

    def rows(self, index: Tensor, comm: Comm) -> Tensor:
        """The vectors of global rows ``index`` [M] on every rank ([M, D]): owners contribute, the rest add 0."""
        local = index - self.offset
        mine = (local >= 0) & (local < self.x.shape[0])
        out = self.x.new_zeros(index.shape[0], self.x.shape[1])
        out[mine] = self.x[local[mine]]
        return comm.sum(out)
