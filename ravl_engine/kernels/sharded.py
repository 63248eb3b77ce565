"""Exact cosine K-medoids on rows sharded across processes (map-reduce over torch.distributed).

Each rank holds a contiguous slice of the rows (global rows ``offset .. offset + n_local``). Every step that needs
all rows is a local computation followed by one collective:

- k-medoids++: the candidate draw inverts the global cumulative potential (local cumsums plus the ranks' totals),
  the owner of a drawn row contributes its vector to an all-reduced sum, and every candidate's potential is an
  all-reduced sum;
- assignment: local top-1 search against the medoid vectors, which every rank holds;
- medoid update: cluster sums and counts are all-reduced; each rank scores its members against the sums
  (``x_i . S_c``), the best score per cluster is an all-reduced max and the winning row the all-reduced min of the
  global indices within the tie tolerance of it: the lowest index among (near-)ties, as in one process;
- silhouette and objective: all-reduced sums of the per-row terms.

The functions are written once against :class:`~ravl_engine.kernels.comm.Comm`; with
:class:`~ravl_engine.kernels.comm.LocalComm` (world size 1) :func:`sharded_fit` is the one-process search strategy
(:func:`fit_kmedoids_search`, which :func:`~ravl_engine.kernels.kmedoids.kmedoids_sweep` runs for
``strategy="search"``), while ``ravl_engine.distributed.TorchComm`` runs the same code on a process group (gloo on
CPU, NCCL on GPU).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ravl_engine.kernels.backends import DEFAULT_BLOCK_SIZE, ClusterBackend, TorchBackend
from ravl_engine.kernels.comm import Comm, LocalComm, Shard
from ravl_engine.kernels.cosine import distance, medoid_scores_blocked, squared_norms, tie_tolerance
from ravl_engine.kernels.silhouette import silhouette_from_gram, silhouette_is_defined
from ravl_engine.kernels.sweep import KMedoidsResult, SweepResult, check_ks, run_sweep

__all__ = ["Comm", "LocalComm", "Shard", "fit_kmedoids_search", "sharded_fit", "sharded_pp_init", "sharded_sweep"]


def sharded_pp_init(
    shard: Shard,
    n_centers: int,
    comm: Comm,
    *,
    generator: torch.Generator,
    n_trials: int | None = None,
) -> Tensor:
    """Greedy k-medoids++ seeding (as :func:`~ravl_engine.kernels.seeding.kmedoids_pp_init`, unclipped), sharded.

    Returns:
        [n_centers] int64 global row indices, the same on every rank.
    """
    x, n = shard.x, shard.total
    if not 1 <= n_centers <= n:
        raise ValueError(f"n_centers must be in [1, {n}], got {n_centers}")
    trials = n_trials if n_trials is not None else 2 + int(math.log(n_centers))
    centers = torch.empty(n_centers, dtype=torch.int64)
    is_center = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    first = int(torch.randint(n, (1,), generator=generator))
    centers[0] = first
    _mark(is_center, first, shard)
    closest = distance(x @ shard.rows(torch.tensor([first]), comm)[0], False).square_()
    for j in range(1, n_centers):
        u = torch.rand(trials, generator=generator, dtype=torch.float64)
        cumulative = torch.cumsum(closest, 0)
        local_total = cumulative[-1:] if cumulative.numel() else closest.new_zeros(1)
        totals = comm.gather(local_total.reshape(1).cpu())
        potential = totals.sum() if comm.world > 1 else totals[0]
        if float(potential) > 0.0:
            target = u * potential
            starts = torch.cumsum(totals, 0) - totals
            owner = (torch.searchsorted(torch.cumsum(totals, 0), target, right=False)).clamp_(max=comm.world - 1)
            local = torch.searchsorted(cumulative.cpu(), target - starts[comm.rank]).clamp_(max=x.shape[0] - 1)
            cand = torch.where(owner == comm.rank, local + shard.offset, torch.zeros_like(local))
            cand = comm.sum(cand)
        else:  # every row coincides with a center: the lowest-index row not chosen yet
            free = (~is_center).nonzero()[:1, 0].cpu() + shard.offset
            low = comm.min(free if free.numel() else torch.tensor([n]))
            cand = low.repeat(trials)
        cand_sims = shard.rows(cand, comm) @ x.T  # [trials, n_local]
        new_closest = torch.minimum(closest, distance(cand_sims, False).square_())
        best = int(comm.sum(new_closest.sum(1).cpu()).argmin())
        chosen = int(cand[best])
        centers[j] = chosen
        _mark(is_center, chosen, shard)
        closest = new_closest[best]
    return centers


def _mark(is_center: Tensor, row: int, shard: Shard) -> None:
    if shard.offset <= row < shard.offset + shard.x.shape[0]:
        is_center[row - shard.offset] = True


def sharded_fit(
    shard: Shard,
    init: Tensor,
    comm: Comm,
    *,
    backend: ClusterBackend | None = None,
    max_iter: int = 300,
    with_silhouette: bool = True,
    block_size: int = DEFAULT_BLOCK_SIZE,
    sq_norms: Tensor | None = None,
) -> KMedoidsResult:
    """Alternating cosine K-medoids from global init rows ``init`` [K] (the search strategy's iteration; with
    :class:`LocalComm` it is :func:`fit_kmedoids_search`). ``sq_norms``: this rank's."""
    x, k = shard.x, int(init.numel())
    backend = backend or TorchBackend(block_size=block_size)
    sq_norms = squared_norms(x) if sq_norms is None else sq_norms
    medoids = init.to(torch.int64).clone()
    labels, sims = backend.assign(x, shard.rows(medoids, comm).to(x.dtype))
    positions = torch.arange(x.shape[0], device=x.device) + shard.offset
    stats: list[dict[str, Any]] = []
    converged, n_iter = False, max_iter
    for it in range(1, max_iter + 1):
        sums = comm.sum(torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x))
        counts = comm.sum(torch.bincount(labels, minlength=k))
        score = medoid_scores_blocked(x, labels, sums, sq_norms, block_size)
        top = torch.full((k,), float("-inf"), dtype=score.dtype, device=x.device)
        top = comm.max(top.scatter_reduce(0, labels, score, reduce="amax", include_self=True))
        tol = tie_tolerance(x, counts).to(x.device)
        tied = score >= (top - tol)[labels]
        first = torch.full((k,), shard.total, dtype=torch.int64, device=x.device)
        first = comm.min(first.scatter_reduce(0, labels[tied], positions[tied], reduce="amin", include_self=True))
        new_medoids = torch.where(first < shard.total, first.cpu(), medoids)
        moved = int((new_medoids != medoids).sum())
        medoids = new_medoids
        switched = 0
        if moved:
            new_labels, sims = backend.assign(x, shard.rows(medoids, comm).to(x.dtype))
            switched = int(comm.sum(torch.tensor([int((new_labels != labels).sum())]))[0])
            labels = new_labels
        stats.append({"iter": it, "moved_medoids": moved, "moved_points": switched})
        if moved == 0:
            converged, n_iter = True, it
            break
    dist = distance(sims, False)
    local = medoids - shard.offset
    own = (local >= 0) & (local < x.shape[0])
    dist[local[own].to(x.device)] = 0.0
    objective = float(comm.sum(dist.sum().reshape(1).cpu())[0])
    silhouette = math.nan
    if with_silhouette:
        sums = comm.sum(torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x))
        counts = comm.sum(torch.bincount(labels, minlength=k))
        total = silhouette_from_gram(sums @ x.T, labels, counts, sq_norms, block_size=block_size, reduce="sum")
        total = comm.sum(total.reshape(1).cpu())[0]
        if bool(silhouette_is_defined(counts, shard.total)):
            silhouette = float(total) / shard.total
    return KMedoidsResult(
        medoids=medoids,
        labels=labels,
        n_iter=n_iter,
        converged=converged,
        objective=objective,
        silhouette=silhouette,
        stats=stats,
    )


def fit_kmedoids_search(
    x: Tensor,
    init: Tensor,
    *,
    backend: ClusterBackend,
    max_iter: int = 300,
    sq_norms: Tensor | None = None,
    with_silhouette: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> KMedoidsResult:
    """The "search" strategy: :func:`sharded_fit` in one process (all rows, :class:`LocalComm`), medoids on x's device.

    The same iteration as :func:`~ravl_engine.kernels.kmedoids.fit_kmedoids` without any [K, N] table (unclipped
    only): each iteration assigns by top-1 search of the medoids (``backend``: Faiss IndexFlatIP or blocked matmul)
    and scores members against the cluster sums in row blocks. O(N K d) time per iteration, O(N + K d) extra memory.
    Ties between equidistant medoids follow the backend (the torch backend takes the lowest index, like the cached
    strategy; Faiss does not promise an order).

    Args:
        x: [N, D] float, L2-normalised rows.
        init: [K] int64 distinct row indices.
        backend: top-1 search backend.
        max_iter, sq_norms, with_silhouette, block_size: as in
            :func:`~ravl_engine.kernels.kmedoids.fit_kmedoids_batch`.
    """
    fit = sharded_fit(
        Shard(x=x, offset=0, total=x.shape[0]),
        init,
        LocalComm(),
        backend=backend,
        max_iter=max_iter,
        with_silhouette=with_silhouette,
        block_size=block_size,
        sq_norms=sq_norms,
    )
    return replace(fit, medoids=fit.medoids.to(x.device))


def sharded_sweep(
    x: Tensor,
    ks: Sequence[int],
    comm: Comm,
    *,
    generator: torch.Generator,
    max_iter: int = 300,
    n_trials: int | None = None,
    backend: ClusterBackend | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    on_k: Callable[[dict[str, Any]], None] | None = None,
) -> SweepResult:
    """K sweep over sharded rows: one k-medoids++ draw, a fit per K, the best silhouette wins (smallest K on ties).

    Args:
        x: [n_local, D] this rank's L2-normalised rows (global order = rank order).
        ks: candidate K values, each in [2, N - 1] for the global N.
        comm: collectives (:class:`LocalComm` for one process).
        generator: CPU generator, seeded alike on every rank.
    """
    shard = Shard.of(x, comm)
    ks = check_ks(ks, shard.total)
    t0 = time.perf_counter()
    centers = sharded_pp_init(shard, ks[-1], comm, generator=generator, n_trials=n_trials)
    return run_sweep(
        [[k] for k in ks],
        lambda group: [
            sharded_fit(shard, centers[:k], comm, backend=backend, max_iter=max_iter, block_size=block_size)
            for k in group
        ],
        init_seconds=time.perf_counter() - t0,
        strategy="sharded",
        on_k=on_k,
        shard=shard,
    )
