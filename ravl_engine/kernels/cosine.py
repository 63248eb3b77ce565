"""Cosine primitives shared by the K-medoids kernels (one process and sharded): distances from similarities, the
tie tolerance of medoid scores, squared row norms and blocked medoid scores."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def distance(sims: Tensor, clip: bool) -> Tensor:
    """Cosine distance from similarities, in float64; clipped to [0, 1] (released code) or floored at 0."""
    d = torch.rsub(sims.to(torch.float64), 1.0)
    return d.clamp_(0.0, 1.0) if clip else d.clamp_min_(0.0)


def tie_tolerance(x: Tensor, counts: Tensor) -> Tensor:
    """Per-cluster slack under which two medoid candidates count as tied: rounding of sums of ``|C|`` inner
    products in x's dtype (about ``4 sqrt(d) eps |C|``). Equal-in-exact-arithmetic sums (every two-member cluster
    has one) then take the lowest index, like the dense reference.
    """
    eps = torch.finfo(x.dtype).eps
    return 4.0 * math.sqrt(x.shape[1]) * eps * (counts.to(torch.float64) + 1.0)


def squared_norms(x: Tensor) -> Tensor:
    """[N] float64 squared L2 norms of the rows of x."""
    return torch.linalg.vector_norm(x, dim=1).to(torch.float64).square()


def medoid_scores_blocked(x: Tensor, labels: Tensor, sums: Tensor, sq_norms: Tensor, block_size: int) -> Tensor:
    """x_i . S_{c_i} - |x_i|^2 for every row, float64, in row blocks (no [K, N] table)."""
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], block_size):
        stop = start + block_size
        dots = (x[start:stop] @ sums.T).gather(1, labels[start:stop, None]).squeeze(1)
        out[start:stop] = dots.to(torch.float64) - sq_norms[start:stop]
    return out
