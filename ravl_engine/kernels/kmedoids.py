"""Exact cosine K-medoids without an N x N matrix.

For unit vectors the cosine distance is ``d(i, j) = 1 - x_i . x_j``, so the total distance from ``x_i`` to the
other members of its cluster C is ``(|C| - 1) - (x_i . S_C - |x_i|^2)`` with ``S_C`` the sum of the members. The
medoid of C (the member with the smallest total distance) is therefore found from inner products with the cluster
sums: O(N K d) per iteration, like k-means, instead of the O(N^2) of a precomputed distance matrix.

The iteration is the alternating ("Voronoi") K-medoids of scikit-learn-extra's ``method="alternate"``, which the
released RaVL code uses: assign every point to the nearest medoid, move every medoid to the member with the smallest
total distance, stop when no medoid moves. Ties go to the lowest index in both steps, and an empty cluster keeps its
medoid, as in the reference. Candidates whose scores differ by less than the rounding of their sums count as tied
(``cosine.tie_tolerance``), so sums that are equal in exact arithmetic break ties the same way as the reference.

Two strategies compute the same iteration:

- ``cached`` (default when it fits the memory budget): many fits (the K sweep) run in lockstep so that they share
  every tensor op, and share rows: the similarities to the medoids live in a bank with one [N] row per distinct
  medoid point (``bank.MedoidBank``; a sweep's fits share most medoids), and ``G = S @ X.T`` is computed once per
  distinct member set (``bank.distinct_products``, member sets told apart by random 128-bit keys, see
  ``bank.member_keys``), only for clusters whose members changed. The final sums give the silhouette
  (:func:`ravl_engine.kernels.silhouette.silhouette_from_gram` on the shared rows).
- ``search``: no [K, N] table; each iteration assigns by top-1 search through a
  :mod:`ravl_engine.kernels.backends` backend (Faiss when asked or on GPU) and scores medoids in row
  blocks. For N x K too large to cache. It is the sharded iteration in one process
  (:func:`~ravl_engine.kernels.sharded.fit_kmedoids_search`).

The k-medoids++ seeding is in kernels/seeding.py, the medoid bank and member keys in kernels/bank.py, the cosine
primitives in kernels/cosine.py, the result types and the sweep loop in kernels/sweep.py.

``clip=True`` reproduces the released code's distance ``clip(1 - x_i . x_j, 0, 1)``. The sum identity does not hold
for the clipped distance, so that variant sums distances over blocks of pairs: O(N^2 d) time, O(block N) memory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ravl_engine.kernels.backends import DEFAULT_BLOCK_SIZE, ClusterBackend, TorchBackend
from ravl_engine.kernels.bank import (
    MedoidBank,
    cluster_sums,
    distinct_products,
    expand_block,
    member_keys,
    move_members,
)
from ravl_engine.kernels.cosine import distance, squared_norms, tie_tolerance
from ravl_engine.kernels.seeding import kmedoids_pp_init
from ravl_engine.kernels.segment import segment_argmax
from ravl_engine.kernels.sharded import fit_kmedoids_search
from ravl_engine.kernels.silhouette import (
    pairwise_distance_sums,
    silhouette_from_gram,
    silhouette_from_sums,
    silhouette_is_defined,
)
from ravl_engine.kernels.sweep import KMedoidsResult, SweepResult, check_ks, run_sweep

__all__ = ["KMedoidsResult", "SweepResult", "fit_kmedoids", "fit_kmedoids_batch", "kmedoids_sweep"]

STRATEGIES = ("auto", "cached", "search")
TABLE_BYTES = 32 << 20  # preferred [K, N] bytes of one batch of fits of the cached strategy


def _prefix_argmax(sims: Tensor, ks: Sequence[int], *, clip: bool) -> Tensor:
    """Nearest of the first K centers for every K in ``ks``, by one running argmax over ``sims`` [k_max, N].

    Returns [len(ks), N] int64; ties go to the lowest center, like ``max``.
    """
    out = torch.empty(len(ks), sims.shape[1], dtype=torch.int64, device=sims.device)
    rows = sims.clamp(0.0, 1.0) if clip else sims
    best_value = rows[0].clone()
    best_index = torch.zeros(sims.shape[1], dtype=torch.int64, device=sims.device)
    for j in range(sims.shape[0]):
        if j:
            better = rows[j] > best_value
            best_value = torch.where(better, rows[j], best_value)
            best_index.masked_fill_(better, j)
        for f, k in enumerate(ks):
            if k == j + 1:
                out[f] = best_index
    return out


def fit_kmedoids_batch(
    x: Tensor,
    inits: Sequence[Tensor],
    *,
    max_iter: int = 300,
    clip: bool = False,
    init_sims: Tensor | None = None,
    sq_norms: Tensor | None = None,
    with_silhouette: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> list[KMedoidsResult]:
    """Several independent alternating K-medoids fits of the same rows, run in lockstep ("cached" strategy).

    Fit f has ``len(inits[f])`` clusters. All fits share every matmul and every tensor op, so F small fits cost
    about as much dispatch overhead as one; each fit's result is exactly what it would be alone. Clusters are laid
    out as F blocks of ``k_max`` slots (unused slots are never assigned). Memory: [N] rows of similarities to the
    distinct medoids (``bank.MedoidBank``) and of products with the distinct changed cluster sums, each at most
    about one row per slot, plus a few [F, N] index tables.

    Args:
        x: [N, D] float, L2-normalised rows (float64 gives results equal to a float64 dense reference).
        inits: F tensors of distinct row indices, the initial medoids of each fit.
        max_iter: iteration cap per fit (the reference's default is 300).
        clip: use the released code's clipped distance (O(N^2 d) medoid updates).
        init_sims: optional [>= max K, N] inner products of ``inits[f]`` with every row when every init is a
            prefix of the same sequence (the K sweep's case); saves the first similarity pass.
        sq_norms: optional [N] float64 squared row norms.
        with_silhouette: also compute each final clustering's cosine silhouette (cheap for the unclipped
            distance: one product per distinct final cluster sum).
        block_size: rows per block for the clipped pairwise sums.

    Returns:
        One KMedoidsResult per init, in order.
    """
    n, dev = x.shape[0], x.device
    ks = [int(t.numel()) for t in inits]
    n_fits, k_max = len(ks), max(ks)
    n_slots = n_fits * k_max
    sq_norms = squared_norms(x) if sq_norms is None else sq_norms
    fit_of_slot = torch.arange(n_slots, device=dev) // k_max
    real = torch.arange(k_max, device=dev)[None, :] < torch.tensor(ks, device=dev)[:, None]  # [F, k_max]
    offsets = (torch.arange(n_fits, device=dev) * k_max)[:, None]

    medoids = torch.full((n_slots,), -1, dtype=torch.int64, device=dev)
    for f, init in enumerate(inits):
        medoids[f * k_max : f * k_max + ks[f]] = init.to(device=dev, dtype=torch.int64)
    longest = inits[ks.index(k_max)].to(device=dev, dtype=torch.int64)
    prefix = init_sims[:k_max] if init_sims is not None else None
    bank = MedoidBank(x, medoids, clip=clip, block_size=block_size, prefix_points=longest, prefix_sims=prefix)

    all_fits = torch.arange(n_fits, device=dev)
    if init_sims is not None:  # the fits' inits are prefixes of one sequence: one running argmax labels them all
        slots = _prefix_argmax(init_sims[:k_max], ks, clip=clip) + offsets
    else:
        slots = bank.assign(all_fits, k_max) + offsets  # [F, N] global slots
    sums = keys = point_keys = None
    if not clip:
        # member sums S per slot (unused slots stay 0) and member-set keys, kept up to date from the points that
        # switch clusters
        point_keys = member_keys(n, device=dev)
        sums, keys = cluster_sums(x, point_keys, slots, k_max=k_max)
    is_changed = real.reshape(-1).clone()  # slots whose member set changed since their medoid was chosen
    n_iter = [max_iter] * n_fits
    converged = [False] * n_fits
    stats: list[list[dict[str, Any]]] = [[] for _ in range(n_fits)]
    for it in range(1, max_iter + 1):
        changed = is_changed.nonzero().squeeze(1)
        pos = is_changed[slots].reshape(-1).nonzero().squeeze(1)  # (fit, row) pairs; rows ascending per slot
        row, own = pos % n, slots.reshape(-1)[pos]
        if sums is not None and keys is not None:
            # total distance to the own cluster is (|C| - 1) - (x_i . S_c - |x_i|^2): maximise the bracket
            score = torch.empty(0, dtype=torch.float64, device=dev)
            if changed.numel():
                gram, gram_row = distinct_products(sums[changed], keys[changed], x)
                local = torch.zeros(n_slots, dtype=torch.int64, device=dev)
                local[changed] = torch.arange(changed.numel(), device=dev)
                # G of every (fit, row) through the row's own cluster (a gather over the whole grid is faster than
                # indexing the pairs), then the pairs in changed clusters
                own_g = gram.gather(0, gram_row[local[slots]]).view(-1)[pos]
                score = own_g.to(torch.float64) - sq_norms[row]
        else:
            rows = torch.unique(row)
            pair_sums = pairwise_distance_sums(
                x, (slots - offsets).T, k_max, rows=rows, clip=True, block_size=block_size
            )
            score = -pair_sums[torch.searchsorted(rows, row), own // k_max, own % k_max]
        counts = torch.bincount(own, minlength=n_slots)
        best = segment_argmax(score, own, n_slots, tol=tie_tolerance(x, counts))
        # an empty cluster keeps its medoid (and when every changed cluster emptied, there is no row at all)
        new_medoids = torch.where(best >= 0, row[best.clamp_min(0)], medoids) if row.numel() else medoids
        moved = (new_medoids != medoids).nonzero().squeeze(1)
        medoids = new_medoids
        moved_per_fit = torch.bincount(fit_of_slot[moved], minlength=n_fits).tolist()
        switched_per_fit = [0] * n_fits
        is_changed = torch.zeros(n_slots, dtype=torch.bool, device=dev)
        if moved.numel():
            bank.move(moved, medoids[moved])
            # only fits whose medoids moved can change their assignment
            active = torch.tensor([f for f, m in enumerate(moved_per_fit) if m], device=dev)
            new_slots = slots.clone()
            new_slots[active] = bank.assign(active, k_max) + offsets[active]
            switched = new_slots != slots
            switched_per_fit = switched.sum(1).tolist()
            if sums is not None and keys is not None and point_keys is not None:
                sums, keys = move_members(sums, keys, x, point_keys, slots, new_slots, switched, k_max=k_max)
            # a cluster whose member set is unchanged keeps its medoid: same members, same sums, same argmin
            is_changed[slots[switched]] = True
            is_changed[new_slots[switched]] = True
            slots = new_slots
        for f in range(n_fits):
            if converged[f]:
                continue
            stats[f].append({"iter": it, "moved_medoids": moved_per_fit[f], "moved_points": switched_per_fit[f]})
            if moved_per_fit[f] == 0:
                converged[f], n_iter[f] = True, it
        if all(converged):
            break

    counts = torch.bincount(slots.reshape(-1), minlength=n_slots).view(n_fits, k_max)
    labels = slots - offsets  # [F, N]
    silhouettes = [math.nan] * n_fits
    if with_silhouette:
        if sums is not None and keys is not None:
            sil = _batch_silhouette(x, sums, keys, labels, counts, sq_norms)
        else:
            sums = pairwise_distance_sums(x, labels.T, k_max, clip=True, block_size=block_size)
            sil = silhouette_from_sums(sums, labels.T, counts).to(torch.float64).mean(0)
            sil = torch.where(silhouette_is_defined(counts, n), sil, torch.full_like(sil, math.nan))
        silhouettes = sil.tolist()

    dist = distance(bank.similarity(slots), clip)  # [F, N]
    is_medoid = medoids >= 0
    dist.view(-1)[fit_of_slot[is_medoid] * n + medoids[is_medoid]] = 0.0  # a medoid is at distance 0 from itself
    objectives = dist.sum(1).tolist()
    return [
        KMedoidsResult(
            medoids=medoids[f * k_max : f * k_max + ks[f]].clone(),
            labels=labels[f].clone(),
            n_iter=n_iter[f],
            converged=converged[f],
            objective=objectives[f],
            silhouette=silhouettes[f],
            stats=stats[f],
        )
        for f in range(n_fits)
    ]


def _batch_silhouette(
    x: Tensor, sums: Tensor, keys: Tensor, labels: Tensor, counts: Tensor, sq_norms: Tensor
) -> Tensor:
    """Mean silhouette of each fit of a batch from its member sums and keys ([F * k_max, ...], unused slots 0): G =
    S @ X.T computed once per distinct member set and shared by the fits (:func:`silhouette_from_gram` with
    ``rows``)."""
    gram, row = distinct_products(sums, keys, x)
    block = expand_block(counts.numel(), x.element_size())
    return silhouette_from_gram(gram, labels, counts, sq_norms, rows=row.view(counts.shape), block_size=block)


def fit_kmedoids(
    x: Tensor,
    init: Tensor,
    *,
    max_iter: int = 300,
    clip: bool = False,
    init_sims: Tensor | None = None,
    sq_norms: Tensor | None = None,
    with_silhouette: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> KMedoidsResult:
    """Alternating cosine K-medoids from given initial medoids (one fit of :func:`fit_kmedoids_batch`).

    Args:
        x: [N, D] float, L2-normalised rows.
        init: [K] int64 distinct row indices, the initial medoids.
        max_iter, clip, sq_norms, with_silhouette, block_size: as in :func:`fit_kmedoids_batch`.
        init_sims: optional [K, N] inner products of the initial medoids with every row.

    Returns:
        KMedoidsResult.
    """
    return fit_kmedoids_batch(
        x,
        [init],
        max_iter=max_iter,
        clip=clip,
        init_sims=init_sims,
        sq_norms=sq_norms,
        with_silhouette=with_silhouette,
        block_size=block_size,
    )[0]


def kmedoids_sweep(
    x: Tensor,
    ks: Sequence[int],
    *,
    generator: torch.Generator,
    max_iter: int = 300,
    clip: bool = False,
    strategy: str = "auto",
    backend: ClusterBackend | None = None,
    n_trials: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    memory_budget: int = 1 << 30,
    on_k: Callable[[dict[str, Any]], None] | None = None,
) -> SweepResult:
    """Fit K-medoids for every K in ``ks`` and keep the one with the best cosine silhouette.

    One k-medoids++ draw of ``max(ks)`` centers serves every K (its first K centers), so the init and its first
    similarity pass are paid once for the whole sweep. With the cached strategy the fits run in batches of as many K
    as fit in ``memory_budget`` bytes of [K, N] tables (:func:`fit_kmedoids_batch`).

    Args:
        x: [N, D] float, L2-normalised rows.
        ks: candidate K values, each in [2, N - 1].
        generator: CPU generator for the seeding.
        max_iter: iteration cap per K.
        clip: the released code's clipped distance, for K-medoids and silhouette alike (cached strategy only).
        strategy: "cached", "search", or "auto" (cached when two [max K, N] tables fit ``memory_budget``).
        backend: top-1 search backend for the search strategy; default ``TorchBackend``.
        n_trials: k-medoids++ candidates per center (default from ``max(ks)``).
        block_size: rows per block.
        memory_budget: bytes for the [K, N] tables of one batch of fits.
        on_k: called after each K with its stats dict (progress reporting).

    Returns:
        SweepResult: the highest silhouette wins, the smallest K on ties; a NaN silhouette never wins unless all
        are NaN (then the smallest K).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    n = x.shape[0]
    ks = check_ks(ks, n)
    per_k_bytes = 2 * n * ks[-1] * x.element_size()
    if strategy == "auto":
        strategy = "cached" if clip or per_k_bytes <= memory_budget else "search"
    if strategy == "search" and clip:
        raise ValueError("the clipped distance needs strategy 'cached'")
    t0 = time.perf_counter()
    centers, init_sims = kmedoids_pp_init(x, ks[-1], generator=generator, n_trials=n_trials, clip=clip)
    sq_norms = squared_norms(x)
    init_seconds = time.perf_counter() - t0

    if strategy == "search":
        del init_sims  # the search strategy keeps no [K, N] table
        search = backend or TorchBackend(block_size=block_size)
        return run_sweep(
            [[k] for k in ks],
            lambda group: [
                fit_kmedoids_search(
                    x,
                    centers[:k],
                    backend=search,
                    max_iter=max_iter,
                    sq_norms=sq_norms,
                    with_silhouette=True,
                    block_size=block_size,
                )
                for k in group
            ],
            init_seconds=init_seconds,
            strategy=strategy,
            on_k=on_k,
        )
    # as many K per batch as the budget allows, up to about TABLE_BYTES of [K, N] rows, in balanced batches:
    # the whole 20..49 sweep in one batch at 4,000 regions (measured 5-10% faster than two batches on the
    # reference CPU), two fits per batch from about 60,000 regions up
    cap = max(1, min(memory_budget // max(1, per_k_bytes), max(2, TABLE_BYTES // max(1, per_k_bytes // 2))))
    n_batches = -(-len(ks) // cap)
    batch = -(-len(ks) // n_batches)
    return run_sweep(
        [ks[start : start + batch] for start in range(0, len(ks), batch)],
        lambda group: fit_kmedoids_batch(
            x,
            [centers[:k] for k in group],
            max_iter=max_iter,
            clip=clip,
            init_sims=init_sims,
            sq_norms=sq_norms,
            with_silhouette=True,
            block_size=block_size,
        ),
        init_seconds=init_seconds,
        strategy=strategy,
        on_k=on_k,
    )
