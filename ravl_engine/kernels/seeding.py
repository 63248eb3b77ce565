"""Greedy k-medoids++ seeding under cosine distance (one process; kernels/sharded.py has the sharded twin)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ravl_engine.kernels.cosine import distance

TRANSPOSE_BYTES = 256 << 20  # largest x for which the k-medoids++ seeding keeps a contiguous copy of x.T


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
    closest = distance(sims[0], clip).square_()
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
        new_closest = torch.minimum(closest, distance(cand_sims, clip).square_())
        best = int(new_closest.sum(1).argmin())
        centers.append(int(cand[best]))
        sims[j] = cand_sims[best]
        closest = new_closest[best]
    return torch.tensor(centers, dtype=torch.int64), sims
