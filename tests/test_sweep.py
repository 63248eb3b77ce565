"""The one K-sweep driver (kernels/sweep.py): every K's stats recorded, the best silhouette kept, the smallest K on
ties, NaN only when every K is NaN; and the cached, search and sharded sweeps all report through it."""

from __future__ import annotations

import math

import pytest
import torch

from ravl_engine.kernels.comm import LocalComm
from ravl_engine.kernels.kmedoids import kmedoids_sweep
from ravl_engine.kernels.sharded import sharded_sweep
from ravl_engine.kernels.sweep import KMedoidsResult, check_ks, run_sweep, silhouette_rank
from tests.conftest import clustered_rows


def _fit(k: int, silhouette: float) -> KMedoidsResult:
    return KMedoidsResult(
        medoids=torch.arange(k),
        labels=torch.zeros(5, dtype=torch.int64),
        n_iter=k,
        converged=True,
        objective=float(k),
        silhouette=silhouette,
    )


@pytest.mark.parametrize(
    ("scores", "want"),
    [
        ({2: 0.1, 3: 0.5, 4: 0.2}, 3),
        ({2: 0.4, 3: 0.4, 4: 0.1}, 2),  # tie: the smallest K
        ({2: math.nan, 3: 0.1, 4: math.nan}, 3),  # NaN never beats a number
        ({2: math.nan, 3: math.nan}, 2),  # all NaN: the smallest K
    ],
)
def test_the_best_silhouette_wins_the_smallest_k_on_ties(scores, want):
    seen = []
    groups = [[2, 3], [4]] if 4 in scores else [[2], [3]]
    result = run_sweep(
        groups,
        lambda group: [_fit(k, scores[k]) for k in group],
        init_seconds=1.0,
        strategy="test",
        on_k=seen.append,
    )
    assert result.k == want and result.fit.n_iter == want and result.strategy == "test"
    assert [e["k"] for e in seen] == sorted(scores) and result.stats == seen
    assert list(result.silhouettes) == sorted(scores)
    assert all(
        a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(result.silhouettes.values(), scores.values())
    )
    assert seen[0]["seconds"] >= 1.0 / len(groups[0])  # the first group carries the seeding time


def test_silhouette_rank_puts_nan_last():
    assert silhouette_rank(math.nan) < silhouette_rank(-1.0) < silhouette_rank(0.5)


def test_check_ks_sorts_and_refuses_out_of_range():
    assert check_ks([5, 3, 3, 4], 10) == [3, 4, 5]
    for bad in ([1, 3], [3, 10], []):
        with pytest.raises(ValueError, match=r"every K must be in \[2, 9\] for 10 rows"):
            check_ks(bad, 10)


def test_every_strategy_reports_through_the_driver():
    x = clustered_rows(300, 8, 5, seed=0).float()
    ks = [3, 4, 5, 6]
    results = {
        strategy: kmedoids_sweep(x, ks, generator=torch.Generator().manual_seed(0), strategy=strategy)
        for strategy in ("cached", "search")
    }
    results["sharded"] = sharded_sweep(x, ks, LocalComm(), generator=torch.Generator().manual_seed(0))
    for strategy, result in results.items():
        assert result.strategy == strategy and [e["k"] for e in result.stats] == ks
        best = max(ks, key=lambda k: (silhouette_rank(result.silhouettes[k]), -k))
        assert result.k == best and result.fit.medoids.numel() == best
    assert results["sharded"].shard is not None and results["cached"].shard is None
    assert torch.equal(results["search"].fit.labels, results["sharded"].fit.labels)
