"""The K-medoids result types and the one K-sweep driver that the cached, search and sharded sweeps share: fit
every K, record its stats, keep the fit with the best silhouette (the smallest K on ties, NaN never wins unless
every K's silhouette is NaN)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ravl_engine.kernels.comm import Shard


@dataclass(frozen=True, slots=True)
class KMedoidsResult:
    """One K-medoids fit.

    Attributes:
        medoids: [K] int64 row indices of the medoids (global row indices for a sharded fit).
        labels: [N] int64 cluster of each row, in [0, K) (a sharded fit: this rank's rows).
        n_iter: iterations run.
        converged: False when ``max_iter`` stopped the loop with medoids still moving.
        objective: sum over rows of the cosine distance to their medoid (clipped when ``clip``).
        silhouette: mean cosine silhouette of the result (NaN unless asked for, or when undefined).
        stats: one dict per iteration: ``iter``, ``moved_medoids``, ``moved_points``.
    """

    medoids: Tensor
    labels: Tensor
    n_iter: int
    converged: bool
    objective: float
    silhouette: float = math.nan
    stats: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SweepResult:
    """The best fit of a K sweep and the silhouette of every K tried.

    Attributes:
        k: the chosen K (highest silhouette; the smallest K on ties).
        fit: the K-medoids fit for ``k``.
        silhouettes: K -> mean silhouette (NaN when undefined: fewer than 2 non-empty clusters).
        stats: one dict per K: ``k``, ``silhouette``, ``n_iter``, ``converged``, ``objective``, ``seconds``.
        strategy: "cached", "search" or "sharded".
        shard: a sharded sweep's place of this rank among the rows (None for the one-process strategies).
    """

    k: int
    fit: KMedoidsResult
    silhouettes: dict[int, float]
    stats: list[dict[str, Any]]
    strategy: str = "cached"
    shard: Shard | None = None


def silhouette_rank(silhouette: float) -> float:
    """Sort key of a K in a sweep: its silhouette, with NaN (undefined) below every number."""
    return float("-inf") if math.isnan(silhouette) else silhouette


def run_sweep(
    groups: Sequence[Sequence[int]],
    fit_group: Callable[[Sequence[int]], Sequence[KMedoidsResult]],
    *,
    init_seconds: float,
    strategy: str,
    on_k: Callable[[dict[str, Any]], None] | None = None,
    shard: Shard | None = None,
) -> SweepResult:
    """Fit the K values of ``groups`` (ascending, fitted one group at a time by ``fit_group``) and keep the best.

    Only the best fit so far is kept (a fit holds [N] labels). Each K's ``seconds`` is its group's time over the
    group's size, the first group's including the seeding (``init_seconds``).
    """
    best: tuple[float, int, KMedoidsResult] | None = None
    silhouettes: dict[int, float] = {}
    stats: list[dict[str, Any]] = []
    for i, group in enumerate(groups):
        t0 = time.perf_counter()
        fits = fit_group(group)
        seconds = (time.perf_counter() - t0 + (init_seconds if i == 0 else 0.0)) / len(group)
        for k, fit in zip(group, fits, strict=True):
            silhouettes[k] = fit.silhouette
            entry = {
                "k": k,
                "silhouette": fit.silhouette,
                "n_iter": fit.n_iter,
                "converged": fit.converged,
                "objective": fit.objective,
                "seconds": seconds,
            }
            stats.append(entry)
            if on_k is not None:
                on_k(entry)
            key = silhouette_rank(fit.silhouette)
            if best is None or key > best[0]:  # strict, K ascending: the smallest K wins ties
                best = (key, k, fit)
    if best is None:
        raise ValueError("a K sweep needs at least one K")
    return SweepResult(k=best[1], fit=best[2], silhouettes=silhouettes, stats=stats, strategy=strategy, shard=shard)


def check_ks(ks: Sequence[int], n: int) -> list[int]:
    """The distinct K values ascending; each must be in [2, n - 1] for ``n`` rows."""
    out = sorted(set(int(k) for k in ks))
    if not out or out[0] < 2 or out[-1] > n - 1:
        raise ValueError(f"every K must be in [2, {n - 1}] for {n} rows; got {out}")
    return out
