"""Vectorised RaVL scoring against the plain loop port of the released code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ravl_engine.kernels.scoring import best_regions, rank_members, score_clusters, select_clusters
from ravl_engine.kernels.segment import segment_argmax, segment_argmin
from tests.conftest import random_scores, unit_rows
from tests.oracles import loop_rank_members, loop_scores, loop_select


def _case(seed: int, n_images: int = 80, k: int = 7, c: int = 4, max_regions: int = 5):
    rng = np.random.default_rng(seed)
    num_regions = rng.integers(0, max_regions + 1, n_images)
    num_regions[0] = 1  # always some one-region images
    r = int(num_regions.sum())
    labels = rng.integers(0, k, r)
    image_labels = rng.integers(0, c, n_images)
    image_scores = random_scores(n_images, c, seed=seed)
    region_scores = random_scores(r, c, seed=seed + 1)
    return num_regions, labels, image_labels, image_scores, region_scores, k, c


def _fast(num_regions, labels, image_labels, image_scores, region_scores, k, c, skip_single=True):
    counts = torch.as_tensor(num_regions)
    region_image = torch.repeat_interleave(torch.arange(len(num_regions)), counts)
    pred = torch.as_tensor(image_scores).argmax(1)
    best = best_regions(torch.as_tensor(region_scores), region_image, pred, len(num_regions))
    return score_clusters(
        torch.as_tensor(labels),
        k,
        region_image=region_image,
        num_regions=counts,
        image_labels=torch.as_tensor(image_labels),
        image_pred=pred,
        best_region=best,
        num_classes=c,
        skip_single_region=skip_single,
    )


def _assert_scores_equal(fast, loops, k):
    by_id = {lc.cluster: lc for lc in loops}
    for cid in range(k):
        lc = by_id.get(cid)
        if lc is None:  # empty cluster
            assert int(fast.n_regions[cid]) == 0
            continue
        assert math.isclose(float(fast.gap_total[cid]), lc.total_gap, abs_tol=1e-12)
        if math.isinf(lc.influence):
            assert math.isinf(float(fast.influence[cid])) and float(fast.influence[cid]) < 0
        else:
            assert math.isclose(float(fast.influence[cid]), lc.influence, abs_tol=1e-12)
        assert int(fast.class_index[cid]) == lc.class_index
        scored = fast.scored[cid].nonzero().squeeze(1).tolist()
        assert scored == [row[0] for row in lc.rows]
        for y, acc_p, n_p, acc_a, n_a in lc.rows:
            assert int(fast.n_present[cid, y]) == n_p and int(fast.n_absent[cid, y]) == n_a
            assert math.isclose(float(fast.acc_present[cid, y]), acc_p, abs_tol=1e-12)
            assert math.isclose(float(fast.acc_absent[cid, y]), acc_a, abs_tol=1e-12)
            assert math.isclose(float(fast.gap[cid, y]), lc.gaps[y], abs_tol=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("skip_single", [True, False])
def test_scores_equal_loop_port(seed, skip_single):
    num_regions, labels, image_labels, image_scores, region_scores, k, c = _case(seed)
    fast = _fast(num_regions, labels, image_labels, image_scores, region_scores, k, c, skip_single)
    loops = loop_scores(labels, num_regions, image_labels, image_scores, region_scores, skip_single_region=skip_single)
    _assert_scores_equal(fast, loops, k)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("threshold", "two_sign"), [(0.25, True), (0.0, False), (0.6, True), (-math.inf, False)])
def test_selection_equals_loop_port(seed, threshold, two_sign):
    num_regions, labels, image_labels, image_scores, region_scores, k, c = _case(seed, n_images=150)
    fast = _fast(num_regions, labels, image_labels, image_scores, region_scores, k, c)
    loops = loop_scores(labels, num_regions, image_labels, image_scores, region_scores)
    got = select_clusters(fast, influence_threshold=threshold, two_sign_rule=two_sign).tolist()
    assert got == loop_select(loops, threshold=threshold, two_sign_rule=two_sign)


def test_perfect_classifier_has_no_gap_and_nothing_is_selected():
    num_regions, labels, image_labels, _, region_scores, k, c = _case(1)
    image_scores = np.eye(c)[image_labels]
    fast = _fast(num_regions, labels, image_labels, image_scores, region_scores, k, c)
    assert float(fast.gap_total.abs().sum()) == 0.0
    assert torch.isinf(fast.influence).all()
    assert select_clusters(fast).numel() == 0


def test_best_regions_ties_take_lowest_and_empty_images_get_minus_one():
    scores = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [0.2, 0.8]], dtype=torch.float64)
    region_image = torch.tensor([0, 0, 2, 2, 2])
    pred = torch.tensor([1, 0, 1])
    assert best_regions(scores, region_image, pred, 3).tolist() == [0, -1, 3]


def test_segment_argmax_and_argmin():
    values = torch.tensor([1.0, 3.0, 3.0, -1.0, 2.0, float("nan")])
    seg = torch.tensor([0, 0, 0, 2, 2, 3])
    assert segment_argmax(values, seg, 5).tolist() == [1, -1, 4, -1, -1]
    assert segment_argmin(values, seg, 5).tolist() == [0, -1, 3, -1, -1]


def test_rank_members_equals_loop_with_ties():
    x = unit_rows(60, 4, seed=2)
    x = torch.cat([x, x[:10]])  # duplicates make exact similarity ties
    labels = torch.randint(3, (70,), generator=torch.Generator().manual_seed(2))
    for c in range(3):
        members = (labels == c).nonzero().squeeze(1)
        medoid = int(members[0])
        got, sims = rank_members(x, labels, c, medoid)
        assert got.tolist() == loop_rank_members(x.numpy(), labels.numpy(), c, medoid)
        assert torch.all(sims[:-1] >= sims[1:])


@settings(deadline=None)
@given(
    seed=st.integers(0, 100_000),
    n_images=st.integers(1, 40),
    k=st.integers(1, 6),
    c=st.integers(2, 5),
    max_regions=st.integers(1, 4),
)
def test_property_scores_equal_loop_port(seed, n_images, k, c, max_regions):
    num_regions, labels, image_labels, image_scores, region_scores, k, c = _case(
        seed, n_images=n_images, k=k, c=c, max_regions=max_regions
    )
    assert labels.size > 0  # _case gives image 0 one region
    fast = _fast(num_regions, labels, image_labels, image_scores, region_scores, k, c)
    loops = loop_scores(labels, num_regions, image_labels, image_scores, region_scores)
    _assert_scores_equal(fast, loops, k)
    assert select_clusters(fast).tolist() == loop_select(loops)
