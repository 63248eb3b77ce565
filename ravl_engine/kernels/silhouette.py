"""Exact silhouette under cosine distance in O(N K d), and blocked pairwise distance sums.

With ``S_C`` the sum of the (unit) members of cluster C, the total distance from ``x_i`` to C is
``|C| - x_i . S_C``, minus the self term ``1 - |x_i|^2`` when ``x_i`` is in C. That gives the silhouette's
``a_i`` (mean distance to the own cluster, self excluded) and ``b_i`` (smallest mean distance to another
non-empty cluster) from one [K, N] matmul, processed in blocks. Conventions follow scikit-learn's
``silhouette_score``: singletons score 0, empty clusters do not count, 0/0 is 0.

The functions accept several labellings of the same rows at once (a leading "fit" axis F), which
is how the K sweep evaluates many K values in one pass.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ravl_engine.kernels.backends import DEFAULT_BLOCK_SIZE


def pairwise_distance_sums(
    x: Tensor,
    labels: Tensor,
    k: int,
    *,
    rows: Tensor | None = None,
    clip: bool,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Tensor:
    """Sum of distances from selected rows to every cluster, by explicit blocks of pairs: O(len(rows) N d).

    Used for the clipped distance ``clip(1 - x_i . x_j, 0, 1)``, where the sum identity does not hold.

    Args:
        x: [N, D] float, L2-normalised rows.
        labels: [N] or [N, F] int64 clusters in [0, k) (F labellings of the same rows).
        k: number of cluster ids.
        rows: [M] int64 rows to compute (default: all N).
        clip: clip distances to [0, 1] (else floor at 0, like scikit-learn's cosine distance).
        block_size: the number of (row, column) pairs held at once is about ``block_size * 64``.

    Returns:
        [M, k] (or [M, F, k]) float64; the distance of a row to itself counts as 0.
    """
    labels2 = labels[:, None] if labels.ndim == 1 else labels
    rows = torch.arange(x.shape[0], device=x.device) if rows is None else rows
    out = torch.zeros(rows.numel(), labels2.shape[1], k, dtype=torch.float64, device=x.device)
    step = max(1, (block_size * 64) // max(1, x.shape[0]))
    for start in range(0, rows.numel(), step):
        idx = rows[start : start + step]
        d = 1.0 - (x[idx] @ x.T).to(torch.float64)
        d = d.clamp(0.0, 1.0) if clip else d.clamp_min(0.0)
        d[torch.arange(idx.numel(), device=x.device), idx] = 0.0
        for f in range(labels2.shape[1]):
            out[start : start + step, f].index_add_(1, labels2[:, f], d)
    return out[:, 0] if labels.ndim == 1 else out


def silhouette_from_sums(sums: Tensor, labels: Tensor, counts: Tensor) -> Tensor:
    """Per-row silhouette from distance sums.

    Args:
        sums: [M, K] or [M, F, K] float, total distance of each row to each cluster (self excluded).
        labels: [M] or [M, F] int64, each row's cluster.
        counts: [K] or [F, K] cluster sizes over all N rows.

    Returns:
        [M] or [M, F] silhouette values, dtype of ``sums``.
    """
    counts = counts.to(sums.dtype)
    own_count = counts.expand_as(sums).gather(-1, labels[..., None]).squeeze(-1)
    a = sums.gather(-1, labels[..., None]).squeeze(-1) / (own_count - 1.0)
    means = sums / counts  # empty clusters give inf or nan; both are masked below
    means.masked_fill_(counts == 0, float("inf"))
    means.scatter_(-1, labels[..., None], float("inf"))
    b = means.min(dim=-1).values
    s = (b - a) / torch.maximum(a, b)
    s = torch.where(own_count > 1, s, torch.zeros_like(s))
    return torch.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)


def silhouette_is_defined(counts: Tensor, n: int) -> Tensor:
    """Whether the silhouette is defined: 2 <= non-empty clusters <= n - 1 (per labelling)."""
    nonempty = (counts > 0).sum(-1)
    return (nonempty >= 2) & (nonempty <= n - 1)


def silhouette_from_gram(
    gram: Tensor,
    labels: Tensor,
    counts: Tensor,
    sq_norms: Tensor,
    *,
    rows: Tensor | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    reduce: str = "mean",
) -> Tensor:
    """Mean silhouette per labelling from G = S @ X.T (S the cluster member sums) by the sum identity.

    The mean distance from x_i to another cluster C is ``1 - G[C, i] / |C|``; to its own cluster, self excluded,
    ``(|C| - G[C, i] - (1 - |x_i|^2)) / (|C| - 1)``. Computed in blocks of columns, in G's dtype (float64 for
    float64 inputs).

    Args:
        gram: [K, N] or [F, K, N] float (cluster-major: one row per cluster); with ``rows``, [U, N] rows that
            clusters share.
        labels: [N] or [F, N] int64.
        counts: [K] or [F, K] cluster sizes.
        sq_norms: [N] float64 squared row norms.
        rows: optional [K] or [F, K] int64 row of ``gram`` holding each cluster's G (the K sweep's fits share most
            clusters: each distinct one is stored once). Clusters sharing a row must have equal sizes.
        block_size: columns (points) per block.
        reduce: "mean", or "sum" of the per-point silhouettes with no definedness check (for a slice of the points
            whose ``counts`` and cluster sums cover all of them: the sharded K-medoids adds the slices' sums).

    Returns:
        float64 scalar tensor (or [F]): the mean silhouette, NaN where fewer than 2 or more than N - 1 clusters
        are non-empty.
    """
    n = gram.shape[-1]
    shared = rows is not None
    if rows is None:
        rows = torch.arange(counts.numel(), device=gram.device).view(counts.shape)
        gram = gram.reshape(counts.numel(), n)  # (n may be 0: a rank with no rows)
    size = counts.to(gram.dtype)
    # per gram row: 1 / |C|, and -inf for empty clusters so that they never give the smallest mean distance
    row_size = torch.zeros(gram.shape[0], dtype=gram.dtype, device=gram.device).scatter_(
        0, rows.reshape(-1), size.reshape(-1)
    )
    inv_size = torch.where(row_size > 0, 1.0 / row_size, torch.zeros_like(row_size))[:, None]
    empty_penalty = torch.where(row_size > 0, 0.0, float("-inf")).to(gram.dtype)[:, None]
    own_size = size.gather(-1, labels)  # [..., N]
    own_g = gram.gather(0, rows.gather(-1, labels).reshape(math.prod(labels.shape[:-1]), n)).view_as(own_size)
    a = ((own_size - own_g - (1.0 - sq_norms).to(gram.dtype)) / (own_size - 1.0)).clamp_min(0.0)
    # b = 1 - the largest G[C, i] / |C| over the other non-empty clusters: the only [clusters, N]-sized step, so
    # it alone runs in column blocks
    best_other = torch.empty_like(own_size)
    for start in range(0, n, block_size):
        ratio = torch.addcmul(empty_penalty, gram[:, start : start + block_size], inv_size)  # [U, B]
        if shared:
            ratio = ratio.index_select(0, rows.reshape(-1))
        ratio = ratio.view(*rows.shape, -1).scatter_(-2, labels[..., None, start : start + block_size], float("-inf"))
        best_other[..., start : start + block_size] = ratio.amax(dim=-2)
    b = (1.0 - best_other).clamp_min(0.0)
    s = (b - a) / torch.maximum(a, b)
    s = torch.nan_to_num(torch.where(own_size > 1, s, torch.zeros_like(s)), nan=0.0, posinf=0.0, neginf=0.0)
    total = s.to(torch.float64).sum(-1)
    if reduce == "sum":
        return total
    mean = total / n
    return torch.where(silhouette_is_defined(counts, n), mean, torch.full_like(mean, math.nan))


def cosine_silhouette(
    x: Tensor,
    labels: Tensor,
    k: int,
    *,
    clip: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> float:
    """Mean silhouette of one clustering under cosine distance, equal to scikit-learn's
    ``silhouette_score(x, labels, metric="cosine")`` (or, with ``clip``, to the score on the released code's
    clipped precomputed matrix).

    Args:
        x: [N, D] float, L2-normalised rows.
        labels: [N] int64 in [0, k).
        k: number of cluster ids (empty ones are ignored).
        clip: clipped distance (O(N^2 d) time) instead of the O(N K d) identity.
        block_size: rows per block.

    Returns:
        The mean silhouette, or NaN when fewer than 2 or more than N - 1 clusters are non-empty (undefined).
    """
    counts = torch.bincount(labels, minlength=k)
    if clip:
        if not bool(silhouette_is_defined(counts, x.shape[0])):
            return math.nan
        sums = pairwise_distance_sums(x, labels, k, clip=True, block_size=block_size)
        return float(silhouette_from_sums(sums, labels, counts).mean())
    cluster_sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    sq_norms = torch.linalg.vector_norm(x, dim=1).to(torch.float64).square()
    gram = cluster_sums @ x.T
    return float(silhouette_from_gram(gram, labels, counts, sq_norms, block_size=block_size))
