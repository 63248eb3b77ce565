"""Cosine K-medoids kernels against the dense float64 oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ravl_engine.kernels.backends import FaissBackend, TorchBackend
from ravl_engine.kernels.bank import MedoidBank, cluster_sums, group_rows, member_keys, move_members
from ravl_engine.kernels.kmedoids import fit_kmedoids, fit_kmedoids_batch, kmedoids_sweep
from ravl_engine.kernels.seeding import kmedoids_pp_init
from ravl_engine.kernels.sharded import fit_kmedoids_search
from tests.conftest import clustered_rows, unit_rows
from tests.oracles import dense_distance, dense_kmedoids, dense_kpp_init


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pp_init_matches_dense_oracle(clip, seed):
    x = unit_rows(300, 6, seed=seed)
    centers, sims = kmedoids_pp_init(x, 12, generator=torch.Generator().manual_seed(seed), n_trials=4, clip=clip)
    expected = dense_kpp_init(dense_distance(x.numpy(), clip=clip), 12, torch.Generator().manual_seed(seed), 4)
    assert centers.tolist() == expected
    assert len(set(expected)) == 12
    torch.testing.assert_close(sims, x[centers] @ x.T)


def test_pp_init_is_a_prefix_sequence():
    x = unit_rows(200, 5, seed=4)
    long, _ = kmedoids_pp_init(x, 15, generator=torch.Generator().manual_seed(9), n_trials=3)
    short, _ = kmedoids_pp_init(x, 6, generator=torch.Generator().manual_seed(9), n_trials=3)
    assert long[:6].tolist() == short.tolist()


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize(("n", "d", "k", "seed"), [(150, 4, 5, 0), (400, 8, 12, 1), (257, 3, 20, 2), (120, 16, 7, 3)])
def test_fit_matches_dense_kmedoids(clip, n, d, k, seed):
    x = unit_rows(n, d, seed=seed)
    init = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]
    fit = fit_kmedoids(x, init, clip=clip)
    medoids, labels, n_iter = dense_kmedoids(dense_distance(x.numpy(), clip=clip), init.tolist())
    assert fit.medoids.tolist() == medoids.tolist()
    assert fit.labels.tolist() == labels.tolist()
    assert fit.n_iter == n_iter
    assert fit.converged


def test_fit_on_clustered_data_recovers_clusters():
    x = clustered_rows(600, 16, 6, spread=0.3, seed=5)
    init, _ = kmedoids_pp_init(x, 6, generator=torch.Generator().manual_seed(0))
    fit = fit_kmedoids(x, init)
    medoids, labels, _ = dense_kmedoids(dense_distance(x.numpy(), clip=False), init.tolist())
    assert fit.labels.tolist() == labels.tolist()
    assert fit.medoids.tolist() == medoids.tolist()
    # objective is the sum of distances to the medoids
    d = dense_distance(x.numpy(), clip=False)
    assert math.isclose(fit.objective, float(d[medoids[labels], np.arange(600)].sum()), rel_tol=1e-9)


@pytest.mark.parametrize("clip", [False, True])
def test_max_iter_cap_matches_oracle(clip):
    x = unit_rows(300, 5, seed=7)
    init = torch.arange(10)
    fit = fit_kmedoids(x, init, max_iter=1, clip=clip, with_silhouette=True)
    medoids, labels, _ = dense_kmedoids(dense_distance(x.numpy(), clip=clip), init.tolist(), max_iter=1)
    assert fit.medoids.tolist() == medoids.tolist()
    assert fit.labels.tolist() == labels.tolist()
    assert not fit.converged and fit.n_iter == 1
    assert not math.isnan(fit.silhouette)


def _dyadic_rows(n: int, seed: int) -> torch.Tensor:
    """Unit vectors with entries +-0.5 in 4 dims: every inner product and sum is exact, so ties are exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n, 4), generator=g).to(torch.float64) - 0.5


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_exact_ties_break_like_the_oracle(clip, seed):
    x = _dyadic_rows(90, seed)  # 16 distinct points, many duplicates, many equidistant pairs
    init, _ = kmedoids_pp_init(x, 6, generator=torch.Generator().manual_seed(seed), clip=clip)
    expected = dense_kpp_init(dense_distance(x.numpy(), clip=clip), 6, torch.Generator().manual_seed(seed), 3)
    assert init.tolist() == expected
    fit = fit_kmedoids(x, init, clip=clip)
    medoids, labels, _ = dense_kmedoids(dense_distance(x.numpy(), clip=clip), init.tolist())
    assert fit.medoids.tolist() == medoids.tolist()
    assert fit.labels.tolist() == labels.tolist()


def test_duplicate_rows_and_empty_clusters_match_oracle():
    base = _dyadic_rows(30, 8)
    x = torch.cat([base, base, base[:5]])  # many exact duplicates
    init = torch.tensor([0, 30, 60, 1, 2, 3])  # 0, 30 and 60 are the same point: two clusters start empty
    fit = fit_kmedoids(x, init)
    medoids, labels, _ = dense_kmedoids(dense_distance(x.numpy(), clip=False), init.tolist())
    assert fit.medoids.tolist() == medoids.tolist()
    assert fit.labels.tolist() == labels.tolist()


@pytest.mark.parametrize("clip", [False, True])
def test_batch_equals_individual_fits(clip):
    x = unit_rows(350, 6, seed=9)
    centers, sims = kmedoids_pp_init(x, 14, generator=torch.Generator().manual_seed(1), clip=clip)
    ks = [4, 9, 14, 7]
    batch = fit_kmedoids_batch(
        x, [centers[:k] for k in ks], clip=clip, init_sims=sims, with_silhouette=True, block_size=50
    )
    for k, got in zip(ks, batch, strict=True):
        alone = fit_kmedoids(x, centers[:k], clip=clip, with_silhouette=True)
        assert got.medoids.tolist() == alone.medoids.tolist()
        assert got.labels.tolist() == alone.labels.tolist()
        assert got.n_iter == alone.n_iter
        assert math.isclose(got.silhouette, alone.silhouette, rel_tol=1e-12, abs_tol=1e-12)
        assert math.isclose(got.objective, alone.objective, rel_tol=1e-12)


def _lowest_argmax(table: torch.Tensor) -> torch.Tensor:
    """Index along dim 1 of the maximum, the lowest index among exact ties. ``table``: [F, K, N]."""
    slot = torch.arange(table.shape[1])[None, :, None].expand_as(table)
    at_max = table == table.amax(dim=1, keepdim=True)
    return torch.where(at_max, slot, table.shape[1]).amin(dim=1)


@pytest.mark.parametrize("clip", [False, True])
def test_medoid_bank_rows_and_assignment_through_many_moves(clip):
    """Random medoid moves (new points, shared points, points that left the bank) force compactions; after each
    move the bank's similarities and assignment equal a plain [slots, N] table built from scratch (float64)."""
    x = unit_rows(80, 6, seed=3)
    n_fits, k_max = 3, 5
    ks = [3, 5, 4]
    gen = torch.Generator().manual_seed(0)
    medoids = torch.full((n_fits * k_max,), -1, dtype=torch.int64)
    for f, k in enumerate(ks):
        medoids[f * k_max : f * k_max + k] = torch.randperm(80, generator=gen)[:k]
    bank = MedoidBank(x, medoids, clip=clip, block_size=7)
    compactions = 0
    for _ in range(40):
        used = (medoids >= 0).nonzero().squeeze(1)
        moved = used[torch.randperm(used.numel(), generator=gen)[:4]]
        pool = 80 if torch.rand(1, generator=gen) < 0.5 else 10  # sometimes revisit the same few points
        points = torch.randint(pool, (moved.numel(),), generator=gen)
        size_before = bank.size
        medoids[moved] = points
        bank.move(moved, points)
        compactions += int(bank.size < size_before)
        # one row per distinct point, gathered into the slots: a point held by two slots gets bit-equal values there
        # (one GEMM may round two identical rows differently on some CPUs), and the tie goes to the lowest slot, the
        # bank's documented rule, chosen explicitly rather than by whichever index max() returns
        points_used, slot_row = medoids.clamp_min(0).unique(return_inverse=True)
        table = (x[points_used] @ x.T)[slot_row].view(n_fits, k_max, -1)
        if clip:
            table = table.clamp(0.0, 1.0)
        table[(medoids < 0).view(n_fits, k_max)] = float("-inf")
        assert bank.assign(torch.arange(n_fits), k_max).tolist() == _lowest_argmax(table).tolist()
        assert bank.assign(torch.tensor([2, 0]), k_max).tolist() == _lowest_argmax(table[[2, 0]]).tolist()
        slots = torch.randint(k_max, (n_fits, 80), generator=gen).clamp_max(torch.tensor(ks)[:, None] - 1)
        expected = table.gather(1, slots[:, None, :]).squeeze(1)
        got = bank.similarity(slots + torch.arange(n_fits)[:, None] * k_max)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)  # products of other row sets: last-bit noise
    assert compactions > 0


def test_member_sums_and_keys_equal_a_direct_sum():
    """The cumulative-delta sums and both update paths (pair moves, rebuild) equal summing each cluster's members
    directly (sums in float64 to 1e-12, keys exactly)."""
    x = unit_rows(300, 5, seed=2)
    gen = torch.Generator().manual_seed(1)
    n_fits, k_max = 4, 6
    offsets = torch.arange(n_fits)[:, None] * k_max
    local = torch.randint(4, (1, 300), generator=gen).repeat(n_fits, 1)
    local[1, :10] = 4  # fit 1: ten rows moved to a new cluster
    local[2] = torch.randint(6, (300,), generator=gen)  # fit 2: a different labelling
    local[3, 50:60] = 5
    point_keys = member_keys(300, device=x.device)

    def direct(labels):
        sums = torch.zeros(n_fits * k_max, 5, dtype=x.dtype)
        keys = torch.zeros(n_fits * k_max, 2, dtype=torch.int64)
        for f in range(n_fits):
            for c in range(k_max):
                members = (labels[f] == c).nonzero().squeeze(1)
                sums[f * k_max + c] = x[members].sum(0)
                for m in members.tolist():
                    keys[f * k_max + c] += point_keys[m]
        return sums, keys

    sums, keys = cluster_sums(x, point_keys, local + offsets, k_max=k_max)
    want_sums, want_keys = direct(local)
    torch.testing.assert_close(sums, want_sums, rtol=0, atol=1e-12)
    assert torch.equal(keys, want_keys)
    few = local.clone()
    few[0, :5] = 5  # a few rows switch: moved pair by pair
    many = local.clone()
    many[:, :200] = 5  # many rows switch in every fit, but the fits stay alike: rebuilt
    for moved in (few, many):
        switched = moved != local
        got_sums, got_keys = move_members(
            sums.clone(), keys.clone(), x, point_keys, local + offsets, moved + offsets, switched, k_max=k_max
        )
        want_sums, want_keys = direct(moved)
        torch.testing.assert_close(got_sums, want_sums, rtol=0, atol=1e-12)
        assert torch.equal(got_keys, want_keys)


def test_group_rows_equals_torch_unique():
    """The same groups as torch.unique(dim=0), numbered in order of first appearance, for float rows (with -0.0
    equal to 0.0) and int64 keys; rows that share their first column but differ fall back to torch.unique."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(6, 4, generator=gen)
    base[2] = 0.0
    floats = base[torch.randint(6, (40,), generator=gen)]
    floats[7] = -0.0
    big = torch.iinfo(torch.int64)
    ints = torch.randint(big.min, big.max, (5, 2), generator=gen, dtype=torch.int64)[
        torch.randint(5, (30,), generator=gen)
    ]
    # the same first column, different rows
    near = torch.tensor([[2**62, 0], [2**62, 1], [2**62, 0], [5, 1]], dtype=torch.int64)
    for t in (floats, ints, near):
        first, group = group_rows(t)
        assert torch.equal(t[first][group], t)
        expected = torch.unique(t, dim=0)
        assert first.numel() == expected.shape[0]
        assert first.tolist() == sorted(first.tolist())  # order of first appearance
        assert all(int((group == g).nonzero()[0, 0]) == int(first[g]) for g in range(first.numel()))
    first, group = group_rows(floats[:0])
    assert first.numel() == 0 and group.numel() == 0


def test_search_strategy_equals_cached_torch_backend():
    x = unit_rows(500, 8, seed=10)
    init = torch.arange(0, 500, 37)
    cached = fit_kmedoids(x, init, with_silhouette=True)
    search = fit_kmedoids_search(x, init, backend=TorchBackend(block_size=64), with_silhouette=True, block_size=64)
    assert search.medoids.tolist() == cached.medoids.tolist()
    assert search.labels.tolist() == cached.labels.tolist()
    assert math.isclose(search.silhouette, cached.silhouette, rel_tol=1e-10)
    assert search.n_iter == cached.n_iter


def test_search_strategy_with_faiss_equals_cached():  # faiss is a declared dependency: never skipped
    x = clustered_rows(800, 16, 8, spread=0.5, seed=11, dtype=torch.float32)
    init, _ = kmedoids_pp_init(x, 8, generator=torch.Generator().manual_seed(2))
    cached = fit_kmedoids(x, init)
    search = fit_kmedoids_search(x, init, backend=FaissBackend(block_size=100))
    assert search.medoids.tolist() == cached.medoids.tolist()
    assert search.labels.tolist() == cached.labels.tolist()


def test_faiss_and_torch_backends_agree():
    x = unit_rows(1000, 12, seed=12, dtype=torch.float32)
    centers = x[:17]
    fl, fv = FaissBackend(block_size=300).assign(x, centers)
    tl, tv = TorchBackend(block_size=300).assign(x, centers)
    assert (fl == tl).float().mean() > 0.999
    torch.testing.assert_close(fv, tv, atol=1e-5, rtol=1e-5)
    fi, _ = FaissBackend().topk(x, centers, 3)
    ti, _ = TorchBackend().topk(x, centers, 3)
    assert (fi == ti).float().mean() > 0.99


def test_torch_backend_blocks_match_unblocked():
    x = unit_rows(333, 7, seed=13)
    centers = unit_rows(9, 7, seed=14)
    a = TorchBackend(block_size=10).assign(x, centers)
    b = TorchBackend(block_size=100000).assign(x, centers)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    assert torch.equal(a[0], (x @ centers.T).argmax(1))


def test_sweep_picks_best_silhouette_and_batches_do_not_matter():
    x = clustered_rows(500, 12, 5, spread=0.5, seed=15)
    one = kmedoids_sweep(x, range(3, 9), generator=torch.Generator().manual_seed(0), memory_budget=1)
    many = kmedoids_sweep(x, range(3, 9), generator=torch.Generator().manual_seed(0))
    search = kmedoids_sweep(x, range(3, 9), generator=torch.Generator().manual_seed(0), strategy="search")
    assert one.silhouettes.keys() == many.silhouettes.keys() == set(range(3, 9))
    for k in range(3, 9):
        assert math.isclose(one.silhouettes[k], many.silhouettes[k], rel_tol=1e-12)
        assert math.isclose(search.silhouettes[k], many.silhouettes[k], rel_tol=1e-9)
    assert many.k == max(many.silhouettes, key=lambda k: (many.silhouettes[k], -k))
    assert one.k == many.k == search.k == 5
    assert one.fit.labels.tolist() == many.fit.labels.tolist() == search.fit.labels.tolist()
    assert search.strategy == "search" and many.strategy == "cached"


def test_sweep_rejects_impossible_k():
    x = unit_rows(10, 3)
    with pytest.raises(ValueError, match="every K must be in"):
        kmedoids_sweep(x, [5, 10], generator=torch.Generator())
    with pytest.raises(ValueError, match="clipped distance"):
        kmedoids_sweep(x, [3], generator=torch.Generator(), clip=True, strategy="search")


@settings(deadline=None)
@given(
    n=st.integers(6, 60),
    d=st.integers(2, 6),
    k=st.integers(2, 6),
    seed=st.integers(0, 10_000),
    clip=st.booleans(),
)
def test_property_fit_equals_dense_oracle(n, d, k, seed, clip):
    k = min(k, n - 1)
    x = unit_rows(n, d, seed=seed)
    init, _ = kmedoids_pp_init(x, k, generator=torch.Generator().manual_seed(seed), clip=clip)
    fit = fit_kmedoids(x, init, clip=clip)
    medoids, labels, _ = dense_kmedoids(dense_distance(x.numpy(), clip=clip), init.tolist())
    assert fit.medoids.tolist() == medoids.tolist()
    assert fit.labels.tolist() == labels.tolist()
    # invariants: every row sits with its nearest medoid, every non-empty cluster contains its medoid
    d_mat = dense_distance(x.numpy(), clip=clip)
    assert np.allclose(d_mat[medoids[fit.labels.numpy()], np.arange(n)], d_mat[medoids].min(0))
    for c, m in enumerate(fit.medoids.tolist()):
        if (fit.labels == c).any():
            assert fit.labels[m] == c or d_mat[m, medoids[fit.labels[m]]] == 0
