"""The cached strategy's shared rows: the medoid bank (similarities stored once per distinct medoid point) and the
member-set keys and sums that let fits share one product per distinct cluster (see kernels/kmedoids.py)."""

from __future__ import annotations

import torch
from torch import Tensor

EXPAND_BYTES = 4 << 20  # size of the column blocks in which shared rows are expanded to one row per cluster slot


def member_keys(n: int, *, device: torch.device) -> Tensor:
    """[n, 2] int64 random keys, one per row (fixed seed). A cluster's key is the sum of its members' keys (wrapping
    int64 arithmetic, exact), so equal member sets have equal keys whatever order their sums were built in, and two
    different member sets share a key with probability about 2^-128."""
    generator = torch.Generator().manual_seed(0x5EED)
    info = torch.iinfo(torch.int64)
    return torch.randint(info.min, info.max, (n, 2), generator=generator, dtype=torch.int64).to(device)


def cluster_sums(x: Tensor, point_keys: Tensor, slots: Tensor, *, k_max: int) -> tuple[Tensor, Tensor]:
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


def move_members(
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

    Moving the pairs costs about two row additions per pair; rebuilding every fit with :func:`cluster_sums` costs
    N plus the rows where consecutive fits' labellings differ. After the first iteration of a K sweep a third of
    the rows switch in most fits while consecutive fits still differ in a few percent of rows (measured: 5,300
    differing rows over 29 pairs of fits at 4,000 regions, against 31,000 switched pairs), so the cheaper of the two
    is taken.
    """
    n_switched = int(switched.sum())
    n_rebuild = x.shape[0] + int(_differs_from_previous_fit(new, k_max).sum())
    if n_rebuild < 2 * n_switched:
        return cluster_sums(x, point_keys, new, k_max=k_max)
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


def expand_block(n_slots: int, element_size: int) -> int:
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
        block = min(self.block_size, expand_block(slot_row.numel(), self.rows.element_size()))
        for start in range(0, n, block):
            sims = rows[:, start : start + block].index_select(0, slot_row).view(fits.numel(), k_max, -1)
            out[:, start : start + block] = sims.max(dim=1).indices
        return out

    def similarity(self, slots: Tensor) -> Tensor:
        """[F, N] similarity of every row to the medoid of its slot (``slots``: [F, N] global slot indices)."""
        return self.rows.gather(0, self.slot_row[slots])
