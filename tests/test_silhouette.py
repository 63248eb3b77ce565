"""Exact cosine silhouette against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import silhouette_score

from ravl_engine.kernels.silhouette import cosine_silhouette, pairwise_distance_sums, silhouette_from_gram
from tests.conftest import clustered_rows, unit_rows
from tests.oracles import dense_distance


@pytest.mark.parametrize(("n", "d", "k", "seed"), [(200, 5, 4, 0), (500, 16, 11, 1), (64, 3, 2, 2)])
def test_equals_sklearn_cosine(n, d, k, seed):
    x = unit_rows(n, d, seed=seed)
    labels = torch.randint(k, (n,), generator=torch.Generator().manual_seed(seed))
    ours = cosine_silhouette(x, labels, k)
    ref = silhouette_score(x.numpy(), labels.numpy(), metric="cosine")
    assert math.isclose(ours, ref, rel_tol=1e-10, abs_tol=1e-12)


def test_equals_sklearn_with_singletons_and_empty_ids():
    x = clustered_rows(120, 8, 4, seed=3)
    labels = torch.randint(4, (120,), generator=torch.Generator().manual_seed(3)) * 2  # ids 0,2,4,6; 1,3,5,7 empty
    labels[5] = 9  # a singleton
    ours = cosine_silhouette(x, labels, 10)
    ref = silhouette_score(x.numpy(), labels.numpy(), metric="cosine")
    assert math.isclose(ours, ref, rel_tol=1e-10)


def test_clipped_equals_sklearn_on_clipped_matrix():
    x = unit_rows(300, 4, seed=4)
    labels = torch.randint(6, (300,), generator=torch.Generator().manual_seed(4))
    ours = cosine_silhouette(x, labels, 6, clip=True, block_size=3)
    ref = silhouette_score(dense_distance(x.numpy(), clip=True), labels.numpy(), metric="precomputed")
    assert math.isclose(ours, ref, rel_tol=1e-10)


def test_blocks_match_unblocked():
    x = unit_rows(257, 6, seed=5)
    labels = torch.randint(5, (257,), generator=torch.Generator().manual_seed(5))
    a = cosine_silhouette(x, labels, 5, block_size=16)
    b = cosine_silhouette(x, labels, 5, block_size=100000)
    assert math.isclose(a, b, rel_tol=1e-12)
    full = pairwise_distance_sums(x, labels, 5, clip=False, block_size=100000)
    part = pairwise_distance_sums(x, labels, 5, clip=False, block_size=1)
    torch.testing.assert_close(full, part)
    # the pairwise sums agree with the dense matrix
    d = dense_distance(x.numpy(), clip=False)
    expected = np.stack([d[:, labels.numpy() == c].sum(1) for c in range(5)], axis=1)
    np.testing.assert_allclose(full.numpy(), expected, rtol=1e-10, atol=1e-10)


def test_batched_labellings_equal_single():
    x = unit_rows(180, 5, seed=6)
    g = torch.Generator().manual_seed(6)
    labels = torch.stack([torch.randint(k, (180,), generator=g) for k in (3, 4, 5)])  # [F, N], k_max 5
    sums = torch.zeros(3, 5, 5, dtype=x.dtype)
    for f in range(3):
        sums[f].index_add_(0, labels[f], x)
    gram = sums @ x.T  # [F, K, N]
    counts = torch.stack([torch.bincount(labels[f], minlength=5) for f in range(3)])
    sq = x.square().sum(1)
    batched = silhouette_from_gram(gram, labels, counts, sq, block_size=7)
    for f in range(3):
        assert math.isclose(float(batched[f]), cosine_silhouette(x, labels[f], 5), rel_tol=1e-12)


def test_undefined_is_nan():
    x = unit_rows(20, 3)
    assert math.isnan(cosine_silhouette(x, torch.zeros(20, dtype=torch.int64), 3))
    assert math.isnan(cosine_silhouette(x, torch.arange(20), 20))


@settings(deadline=None)
@given(n=st.integers(4, 50), d=st.integers(2, 6), k=st.integers(2, 8), seed=st.integers(0, 10_000))
def test_property_equals_sklearn(n, d, k, seed):
    x = unit_rows(n, d, seed=seed)
    labels = torch.randint(k, (n,), generator=torch.Generator().manual_seed(seed))
    n_labels = len(set(labels.tolist()))
    ours = cosine_silhouette(x, labels, k)
    if not 2 <= n_labels <= n - 1:
        assert math.isnan(ours)
        return
    assert math.isclose(ours, silhouette_score(x.numpy(), labels.numpy(), metric="cosine"), abs_tol=1e-10)


def test_silhouette_sum_over_no_points_is_zero():
    """A rank of the sharded K-medoids may hold no rows: its share of the silhouette sum is 0."""
    counts = torch.tensor([[3, 2, 0], [1, 4, 0]])
    empty = torch.zeros(2, 3, 0, dtype=torch.float64)
    labels = torch.zeros(2, 0, dtype=torch.int64)
    total = silhouette_from_gram(empty, labels, counts, torch.zeros(0, dtype=torch.float64), reduce="sum")
    assert total.tolist() == [0.0, 0.0]
