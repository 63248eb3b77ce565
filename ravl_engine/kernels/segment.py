"""Segment reductions over index tensors (no Python loops over segments)."""

from __future__ import annotations

import torch
from torch import Tensor


def segment_argmax(values: Tensor, segments: Tensor, num_segments: int, *, tol: Tensor | float = 0.0) -> Tensor:
    """Position of the largest value in each segment, the lowest position on ties.

    Args:
        values: [n] float, any order.
        segments: [n] int64 in [0, num_segments).
        num_segments: number of segments S.
        tol: values within ``tol`` of their segment's maximum count as ties (a float, or [S] per segment); lets
            rounding noise in sums that are equal in exact arithmetic fall back to the lowest-position rule.

    Returns:
        [S] int64 positions into ``values``; -1 for an empty segment (and for one whose maximum is NaN).
    """
    n = values.shape[0]
    best = torch.full((num_segments,), float("-inf"), dtype=values.dtype, device=values.device)
    best = best.scatter_reduce(0, segments, values, reduce="amax", include_self=True)
    slack = tol[segments] if isinstance(tol, Tensor) else tol
    is_best = values >= best[segments] - slack
    positions = torch.arange(n, device=values.device)
    first = torch.full((num_segments,), n, dtype=torch.int64, device=values.device)
    first = first.scatter_reduce(0, segments[is_best], positions[is_best], reduce="amin", include_self=True)
    return torch.where(first == n, torch.full_like(first, -1), first)


def segment_argmin(values: Tensor, segments: Tensor, num_segments: int, *, tol: Tensor | float = 0.0) -> Tensor:
    """Like :func:`segment_argmax` for the smallest value (lowest position on ties)."""
    return segment_argmax(-values, segments, num_segments, tol=tol)
