"""Exact cosine K-medoids without an N x N matrix.

For unit vectors the cosine distance is ``d(i, j) = 1 - x_i . x_j``, so the total distance from ``x_i`` to the
other members of its cluster C is ``(|C| - 1) - (x_i . S_C - |x_i|^2)`` with ``S_C`` the sum of the members. The
medoid of C (the member with the smallest total distance) is therefore found from inner products with the cluster
sums: O(N K d) per iteration, like k-means, instead of the O(N^2) of a precomputed distance matrix.

The iteration is the alternating ("Voronoi") K-medoids of scikit-learn-extra's ``method="alternate"``, which the
released RaVL code uses: assign every point to the nearest medoid, move every medoid to the member with the smallest
total distance, stop when no medoid moves. Ties go to the lowest index in both steps, and an empty cluster keeps its
medoid, as in the reference. Candidates whose scores differ by less than the rounding of their sums count as tied
(:func:`tie_tolerance`), so sums that are equal in exact arithmetic break ties the same way as the reference.

Two strategies compute the same iteration:

- ``cached`` (default when it fits the memory budget): many fits (the K sweep) run in lockstep so that they share
  every tensor op, and share rows: the similarities to the medoids live in a bank with one [N] row per distinct
  medoid point (:class:`MedoidBank`; a sweep's fits share most medoids), and ``G = S @ X.T`` is computed once per
  distinct member set (:func:`distinct_products`, member sets told apart by random 128-bit keys, see
  :func:`member_keys`), only for clusters whose members changed. The final sums give the silhouette
  (:func:`ravl_engine.kernels.silhouette.silhouette_from_gram` on the shared rows).
- ``search``: no [K, N] table; each iteration assigns by top-1 search through a
  :mod:`ravl_engine.kernels.backends` backend (Faiss when asked or on GPU) and scores medoids in row
  blocks. For N x K too large to cache.

``clip=True`` reproduces the released code's distance ``clip(1 - x_i . x_j, 0, 1)``. The sum identity does not hold
for the clipped distance, so that variant sums distances over blocks of pairs: O(N^2 d) time, O(block N) memory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from ravl_engine.kernels.backends import DEFAULT_BLOCK_SIZE, ClusterBackend, TorchBackend
from ravl_engine.kernels.segment import segment_argmax
from ravl_engine.kernels.silhouette import (
    pairwise_distance_sums,
    silhouette_from_gram,
    silhouette_from_sums,
    silhouette_is_defined,
)
from torch import Tensor

STRATEGIES = ("auto", "cached", "search")
TABLE_BYTES = 32 << 20  # preferred [K, N] bytes of one batch of fits of the cached strategy
EXPAND_BYTES = 4 << 20  # size of the column blocks in which shared rows are expanded to one row per cluster slot
TRANSPOSE_BYTES = 256 << 20  # largest x for which the k-medoids++ seeding keeps a contiguous copy of x.T


@dataclass(frozen=True, slots=True)
class KMedoidsResult:
    """One K-medoids fit.

    Attributes:
        medoids: [K] int64 row indices of the medoids.
        labels: [N] int64 cluster of each row, in [0, K).
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
        strategy: "cached" or "search".
    """

    k: int
    fit: KMedoidsResult
    silhouettes: dict[int, float]
    stats: list[dict[str, Any]]
    strategy: str = "cached"


def _distance(sims: Tensor, clip: bool) -> Tensor:
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


def kmedoids_pp_init(
    x: Tensor,
    n_centers: int,
    *,
    generator: torch.Generator,
    n_trials: int | None = None,
    clip: bool = False,
) -> tuple[Tensor, Tensor]:
    """Greedy k-medoids++ seeding under cosine distance.

    The first center is uniform; each further center is the best (lowest total squared distance) of ``n_trials``
    candidates drawn with probability proportional to the squared distance to the nearest chosen center. The
    sequence does not depend on how many centers are asked for, so the first K centers of one call are the init for
    K: a K sweep draws once.

    Args:
        x: [N, D] float, L2-normalised rows.
        n_centers: number of centers, 1 <= n_centers <= N.
        generator: CPU ``torch.Generator``; all random draws come from it, in a fixed order.
        n_trials: candidates per center; default ``2 + int(log(n_centers))`` (the usual greedy k-means++ rule).
        clip: clip distances to [0, 1] as the released RaVL code does.

    Returns:
        (centers [n_centers] int64, sims [n_centers, N] dtype of x): the chosen rows and their inner products with
        every row (the first K-medoids assignment reuses them).
    """
    n = x.shape[0]
    if not 1 <= n_centers <= n:
        raise ValueError(f"n_centers must be in [1, {n}], got {n_centers}")
    trials = n_trials if n_trials is not None else 2 + int(math.log(n_centers))
    sims = torch.empty(n_centers, n, dtype=x.dtype, device=x.device)

    # a contiguous x.T makes the thin [trials, D] @ [D, N] products about 1.7x faster on CPU (measured, 4000 x 256);
    # skipped when the copy would be large
    xt = x.T.contiguous() if x.numel() * x.element_size() <= TRANSPOSE_BYTES else x.T
    centers = [int(torch.randint(n, (1,), generator=generator))]
    # the draws of every step at once: the CPU generator gives the same sequence as one draw per step
    draws = torch.rand(n_centers - 1, trials, generator=generator, dtype=torch.float64).to(x.device)
    sims[0] = x @ x[centers[0]]
    closest = _distance(sims[0], clip).square_()
    for j in range(1, n_centers):
        cumulative = torch.cumsum(closest, 0)
        potential = cumulative[-1]
        if float(potential) > 0.0:
            cand = torch.searchsorted(cumulative, draws[j - 1] * potential).clamp_(max=n - 1)
        else:
            # every row coincides with a center: take the lowest-index row not chosen yet
            free = min(set(range(len(centers) + 1)) - set(centers))
            cand = torch.full((trials,), free, dtype=torch.int64, device=x.device)
        cand_sims = x[cand] @ xt  # [trials, N]
        new_closest = torch.minimum(closest, _distance(cand_sims, clip).square_())
        best = int(new_closest.sum(1).argmin())
        centers.append(int(cand[best]))
        sims[j] = cand_sims[best]
        closest = new_closest[best]
    return torch.tensor(centers, dtype=torch.int64), sims


def _medoid_scores_blocked(x: Tensor, labels: Tensor, sums: Tensor, sq_norms: Tensor, block_size: int) -> Tensor:
    """x_i . S_{c_i} - |x_i|^2 for every row, float64, in row blocks (no [K, N] table)."""
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], block_size):
        stop = start + block_size
        dots = (x[start:stop] @ sums.T).gather(1, labels[start:stop, None]).squeeze(1)
        out[start:stop] = dots.to(torch.float64) - sq_norms[start:stop]
    return out


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
    distinct medoids (:class:`MedoidBank`) and of products with the distinct changed cluster sums, each at most
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
        sums, keys = _cluster_sums(x, point_keys, slots, k_max=k_max)
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
                sums, keys = _move_members(sums, keys, x, point_keys, slots, new_slots, switched, k_max=k_max)
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

    dist = _distance(bank.similarity(slots), clip)  # [F, N]
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


def member_keys(n: int, *, device: torch.device) -> Tensor:
    """[n, 2] int64 random keys, one per row (fixed seed). A cluster's key is the sum of its members' keys (wrapping
    int64 arithmetic, exact), so equal member sets have equal keys whatever order their sums were built in, and two
    different member sets share a key with probability about 2^-128."""
    generator = torch.Generator().manual_seed(0x5EED)
    info = torch.iinfo(torch.int64)
    return torch.randint(info.min, info.max, (n, 2), generator=generator, dtype=torch.int64).to(device)


def _cluster_sums(x: Tensor, point_keys: Tensor, slots: Tensor, *, k_max: int) -> tuple[Tensor, Tensor]:
    """Member sums [F * k_max, D] and keys [F * k_max, 2] of every fit's clusters (``slots``: [F, N] global slots).

    Fit 0 is summed in full; fit f is fit f - 1 plus the rows whose cluster differs between the two labellings,
    applied as a cumulative sum of per-fit deltas. The K sweep's fits start from prefixes of one center sequence and
    stay close, so consecutive labellings differ in a few hundred rows, not N.
    """
    n_fits = slots.shape[0]
    sums = torch.zeros(n_fits * k_max, x.shape[1], dtype=x.dtype, device=x.device)
    keys = torch.zeros(n_fits * k_max, 2, dtype=torch.int64, device=x.device)
    sums.index_add_(0, slots[0], x)
    keys.index_add_(0, slots[0], point_keys)
    if n_fits > 1:
        fit, row = _differs_from_previous_fit(slots, k_max).nonzero(as_tuple=True)
        fit = fit + 1
        new = slots[fit, row]
        old = slots[fit - 1, row] + k_max  # the previous fit's cluster, in fit f's block
        _add_moves(sums, keys, x, point_keys, new, old, row)
        sums = sums.view(n_fits, k_max, -1).cumsum(0).view(n_fits * k_max, -1)
        keys = keys.view(n_fits, k_max, 2).cumsum(0).view(n_fits * k_max, 2)
    return sums, keys


def _differs_from_previous_fit(slots: Tensor, k_max: int) -> Tensor:
    """[F - 1, N] bool: row i of fit f + 1 is in another cluster than in fit f (``slots`` are global: the same
    cluster index of consecutive fits is k_max apart)."""
    return slots[1:] - slots[:-1] != k_max


def _add_moves(
    sums: Tensor, keys: Tensor, x: Tensor, point_keys: Tensor, to: Tensor, src: Tensor, rows: Tensor
) -> None:
    """Move ``rows`` from clusters ``src`` to clusters ``to`` (sums and keys; the subtraction is one [slots, D]
    difference instead of a negated copy of the moved rows)."""
    moved, moved_keys = x[rows], point_keys[rows]
    gone = torch.zeros_like(sums).index_add_(0, src, moved)
    sums.index_add_(0, to, moved).sub_(gone)
    keys.index_add_(0, to, moved_keys).sub_(torch.zeros_like(keys).index_add_(0, src, moved_keys))


def _move_members(
    sums: Tensor,
    keys: Tensor,
    x: Tensor,
    point_keys: Tensor,
    old: Tensor,
    new: Tensor,
    switched: Tensor,
    *,
    k_max: int,
) -> tuple[Tensor, Tensor]:
    """Sums and keys after the switched (fit, row) pairs moved from their ``old`` to their ``new`` cluster.

    Moving the pairs costs about two row additions per pair; rebuilding every fit with :func:`_cluster_sums` costs
    N plus the rows where consecutive fits' labellings differ. After the first iteration of a K sweep a third of
    the rows switch in most fits while consecutive fits still differ in a few percent of rows (measured: 5,300
    differing rows over 29 pairs of fits at 4,000 regions, against 31,000 switched pairs), so the cheaper of the two
    is taken.
    """
    n_switched = int(switched.sum())
    n_rebuild = x.shape[0] + int(_differs_from_previous_fit(new, k_max).sum())
    if n_rebuild < 2 * n_switched:
        return _cluster_sums(x, point_keys, new, k_max=k_max)
    fit_idx, row_idx = switched.nonzero(as_tuple=True)
    if row_idx.numel():
        _add_moves(sums, keys, x, point_keys, new[fit_idx, row_idx], old[fit_idx, row_idx], row_idx)
    return sums, keys


def group_rows(t: Tensor) -> tuple[Tensor, Tensor]:
    """Groups of equal rows of a 2-D tensor: (first [U], index of the first row of each group, in order of first
    appearance; group [L], the group of each row), so ``t[first][group]`` equals ``t``.

    Like ``torch.unique(t, dim=0, return_inverse=True)`` without its row sort: rows are grouped by their first
    column and every row is checked against its group's first row (a mismatch falls back to ``torch.unique``). For
    member keys the first column alone already tells sets apart but for a 2^-64 chance.
    """
    n = t.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=t.device), torch.zeros(0, dtype=torch.int64, device=t.device)

    def first_rows(group: Tensor) -> Tensor:
        first = torch.full((int(group.max()) + 1,), n, dtype=torch.int64, device=t.device)
        return first.scatter_reduce_(0, group, torch.arange(n, device=t.device), reduce="amin")

    _, group = torch.unique(t[:, 0], return_inverse=True)
    first = first_rows(group)
    if not bool((t == t[first[group]]).all()):
        _, group = torch.unique(t, dim=0, return_inverse=True)
        first = first_rows(group)
    order = torch.argsort(first)  # groups in order of first appearance
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=t.device)
    return first[order], rank[group]


def distinct_products(sums: Tensor, keys: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """``sums @ x.T`` with one product per distinct member set: (products [U, N], row of each input [L]).

    The fits of a K sweep share many clusters (measured: 1,035 cluster slots of a 20..49 sweep held about 160
    distinct member sets on planted data). Clusters with equal keys have equal member sets; their sums may differ
    in the last bits (built in different orders), and one of them stands for all.
    """
    first, row = group_rows(keys)
    return sums[first] @ x.T, row


def _batch_silhouette(
    x: Tensor, sums: Tensor, keys: Tensor, labels: Tensor, counts: Tensor, sq_norms: Tensor
) -> Tensor:
    """Mean silhouette of each fit of a batch from its member sums and keys ([F * k_max, ...], unused slots 0): G =
    S @ X.T computed once per distinct member set and shared by the fits (:func:`silhouette_from_gram` with
    ``rows``)."""
    gram, row = distinct_products(sums, keys, x)
    block = _expand_block(counts.numel(), x.element_size())
    return silhouette_from_gram(gram, labels, counts, sq_norms, rows=row.view(counts.shape), block_size=block)


def _expand_block(n_slots: int, element_size: int) -> int:
    """Columns per block when shared rows are expanded to one row per cluster slot: about EXPAND_BYTES, so the
    expanded [slots, block] table stays small and its memory is reused from block to block."""
    return max(64, EXPAND_BYTES // max(1, element_size * n_slots))


class MedoidBank:
    """Similarities of every row to the medoids of a batch of fits, stored once per distinct medoid point.

    The fits of a K sweep share most medoids (measured: the 1,035 medoid slots of a 20..49 sweep held 66-75 distinct
    points), so a bank of [distinct points, N] rows replaces a [slots, N] table: less memory, fewer products, and no
    copies when medoids move. Row 0 is -inf: unused slots (and only they) point there. With ``clip`` the rows are
    clamped to [0, 1], so that the distance ``clip(1 - s, 0, 1)`` equals ``1 - row``.
    """

    def __init__(
        self,
        x: Tensor,
        medoids: Tensor,
        *,
        clip: bool,
        block_size: int,
        prefix_points: Tensor | None = None,
        prefix_sims: Tensor | None = None,
    ) -> None:
        """``medoids``: [slots] int64, -1 for unused slots. ``prefix_points`` / ``prefix_sims``: optional distinct
        points that include every medoid, with their [P, N] similarities (the K sweep's shared init)."""
        self.x, self.clip, self.block_size = x, clip, block_size
        n, dev = x.shape[0], x.device
        used = medoids >= 0
        capacity = 1 + 2 * int(used.sum())  # a compaction keeps at most the live points, half the capacity
        self.rows = torch.empty(capacity, n, dtype=x.dtype, device=dev)
        self.rows[0] = float("-inf")
        self.point = torch.full((capacity,), -1, dtype=torch.int64, device=dev)  # point of each bank row
        self.row_of_point = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.slot_row = torch.zeros(medoids.shape[0], dtype=torch.int64, device=dev)
        self.size = 1
        if prefix_points is not None and prefix_sims is not None:
            self._append(prefix_points, prefix_sims)
            self.slot_row[used] = self.row_of_point[medoids[used]]
        else:
            self.move(used.nonzero().squeeze(1), medoids[used])

    def _products(self, points: Tensor) -> Tensor:
        sims = self.x[points] @ self.x.T
        return sims.clamp_(0.0, 1.0) if self.clip else sims

    def _append(self, points: Tensor, sims: Tensor | None = None) -> None:
        m = points.numel()
        if self.size + m > self.rows.shape[0]:
            self._compact()
        stop = self.size + m
        self.rows[self.size : stop] = (
            self._products(points) if sims is None else sims.clamp(0.0, 1.0) if self.clip else sims
        )
        self.point[self.size : stop] = points
        self.row_of_point[points] = torch.arange(self.size, stop, device=points.device)
        self.size = stop

    def _compact(self) -> None:
        live = torch.unique(torch.cat([self.slot_row.new_zeros(1), self.slot_row]))  # sorted, row 0 first
        dead = torch.ones(self.size, dtype=torch.bool, device=live.device)
        dead[live] = False
        self.row_of_point[self.point[: self.size][dead & (self.point[: self.size] >= 0)]] = -1
        self.rows[: live.numel()] = self.rows.index_select(0, live)
        self.point[: live.numel()] = self.point.index_select(0, live)
        remap = torch.zeros(self.size, dtype=torch.int64, device=live.device)
        remap[live] = torch.arange(live.numel(), device=live.device)
        self.slot_row = remap[self.slot_row]
        valid = self.point[: live.numel()] >= 0
        self.row_of_point[self.point[: live.numel()][valid]] = valid.nonzero().squeeze(1)
        self.size = live.numel()

    def move(self, slots: Tensor, points: Tensor) -> None:
        """Point ``slots`` at medoid ``points``, computing rows for points not in the bank yet."""
        # slots whose point has no row yet point at row 0 meanwhile: a compaction keeps every row still pointed at
        self.slot_row[slots] = self.row_of_point[points].clamp_min(0)
        new = torch.unique(points[self.row_of_point[points] < 0])
        if new.numel():
            self._append(new)
            self.slot_row[slots] = self.row_of_point[points]

    def assign(self, fits: Tensor, k_max: int) -> Tensor:
        """[len(fits), N] nearest slot (0..k_max-1) of each given fit (slots f * k_max + j); ties go to the lowest
        slot, like the reference's argmin."""
        n = self.x.shape[0]
        out = torch.empty(fits.numel(), n, dtype=torch.int64, device=self.x.device)
        rows = self.rows[: self.size]
        slot_row = self.slot_row.view(-1, k_max)[fits].reshape(-1)
        block = min(self.block_size, _expand_block(slot_row.numel(), self.rows.element_size()))
        for start in range(0, n, block):
            sims = rows[:, start : start + block].index_select(0, slot_row).view(fits.numel(), k_max, -1)
            out[:, start : start + block] = sims.max(dim=1).indices
        return out

    def similarity(self, slots: Tensor) -> Tensor:
        """[F, N] similarity of every row to the medoid of its slot (``slots``: [F, N] global slot indices)."""
        return self.rows.gather(0, self.slot_row[slots])


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
    """The same iteration as :func:`fit_kmedoids` without any [K, N] table ("search" strategy, unclipped only).

    Each iteration assigns by top-1 search of the medoids (``backend``: Faiss IndexFlatIP or blocked matmul) and
    scores members against the cluster sums in row blocks. O(N K d) time per iteration, O(N + K d) extra memory.
    Ties between equidistant medoids follow the backend (the torch backend takes the lowest index, like the cached
    strategy; Faiss does not promise an order).

    Args:
        x: [N, D] float, L2-normalised rows.
        init: [K] int64 distinct row indices.
        backend: top-1 search backend.
        max_iter, sq_norms, with_silhouette, block_size: as in :func:`fit_kmedoids_batch`.

    Returns:
        KMedoidsResult.
    """
    # the one-process case of the sharded iteration (kernels/sharded.py builds on this module: imported here)
    from ravl_engine.kernels.sharded import LocalComm, Shard, sharded_fit  # noqa: PLC0415

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
    return KMedoidsResult(
        medoids=fit.medoids.to(x.device),
        labels=fit.labels,
        n_iter=fit.n_iter,
        converged=fit.converged,
        objective=fit.objective,
        silhouette=fit.silhouette,
        stats=fit.stats,
    )


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
    ks = sorted(set(int(k) for k in ks))
    n = x.shape[0]
    if not ks or ks[0] < 2 or ks[-1] > n - 1:
        raise ValueError(f"every K must be in [2, {n - 1}] for {n} rows; got {ks}")
    per_k_bytes = 2 * n * ks[-1] * x.element_size()
    if strategy == "auto":
        strategy = "cached" if clip or per_k_bytes <= memory_budget else "search"
    if strategy == "search" and clip:
        raise ValueError("the clipped distance needs strategy 'cached'")
    t0 = time.perf_counter()
    centers, init_sims = kmedoids_pp_init(x, ks[-1], generator=generator, n_trials=n_trials, clip=clip)
    sq_norms = squared_norms(x)
    init_seconds = time.perf_counter() - t0

    batch = 1
    if strategy == "cached":
        # as many K per batch as the budget allows, up to about TABLE_BYTES of [K, N] rows, in balanced batches:
        # the whole 20..49 sweep in one batch at 4,000 regions (measured 5-10% faster than two batches on the
        # reference CPU), two fits per batch from about 60,000 regions up
        cap = max(1, min(memory_budget // max(1, per_k_bytes), max(2, TABLE_BYTES // max(1, per_k_bytes // 2))))
        n_batches = -(-len(ks) // cap)
        batch = -(-len(ks) // n_batches)
    if strategy == "search":
        del init_sims  # the search strategy keeps no [K, N] table
    best: tuple[float, int, KMedoidsResult] | None = None
    silhouettes: dict[int, float] = {}
    stats: list[dict[str, Any]] = []
    for start in range(0, len(ks), batch):
        group = ks[start : start + batch]
        t0 = time.perf_counter()
        if strategy == "cached":
            fits = fit_kmedoids_batch(
                x,
                [centers[:k] for k in group],
                max_iter=max_iter,
                clip=clip,
                init_sims=init_sims,
                sq_norms=sq_norms,
                with_silhouette=True,
                block_size=block_size,
            )
        else:
            fits = [
                fit_kmedoids_search(
                    x,
                    centers[:k],
                    backend=backend or TorchBackend(block_size=block_size),
                    max_iter=max_iter,
                    sq_norms=sq_norms,
                    with_silhouette=True,
                    block_size=block_size,
                )
                for k in group
            ]
        seconds = (time.perf_counter() - t0 + (init_seconds if start == 0 else 0.0)) / len(group)
        for k, fit in zip(group, fits, strict=True):
            score = fit.silhouette
            silhouettes[k] = score
            entry = {
                "k": k,
                "silhouette": score,
                "n_iter": fit.n_iter,
                "converged": fit.converged,
                "objective": fit.objective,
                "seconds": seconds,
            }
            stats.append(entry)
            if on_k is not None:
                on_k(entry)
            key = float("-inf") if math.isnan(score) else score
            if best is None or key > best[0]:  # strict: the smallest K wins ties
                best = (key, k, fit)
    assert best is not None  # ks is non-empty
    return SweepResult(k=best[1], fit=best[2], silhouettes=silhouettes, stats=stats, strategy=strategy)
