"""Segment reductions over index tensors (no Python loops over segments)."""

from __future__ import annotations

import torch
from torch import Tensor


def segment_argmax(values: Tensor, segments: Tensor, num_segments: int) -> Tensor:
    """Position of the largest value in each segment, the lowest position on ties.

    Args:
        values: [n] float, any order.
        segments: [n] int64 in [0, num_segments).
        num_segments: number of segments S.

    Returns:
        [S] int64 positions into ``values``; -1 for an empty segment. NaN values never win.
    """
    n = values.shape[0]
    best = torch.full((num_segments,), float("-inf"), dtype=values.dtype, device=values.device)
    best = best.scatter_reduce(0, segments, values, reduce="amax", include_self=True)
    is_best = values == best[segments]
    positions = torch.arange(n, device=values.device)
    first = torch.full((num_segments,), n, dtype=torch.int64, device=values.device)
    first = first.scatter_reduce(0, segments[is_best], positions[is_best], reduce="amin", include_self=True)
    return torch.where(first == n, torch.full_like(first, -1), first)


def segment_argmin(values: Tensor, segments: Tensor, num_segments: int) -> Tensor:
    """Like :func:`segment_argmax` for the smallest value (lowest position on ties)."""
    return segment_argmax(-values, segments, num_segments)
