"""discover(): the public contract, end to end against the dense oracle, and bad input."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from ravl_engine import ConfigError, DiscoverConfig, RavlEngineWarning, discover
from ravl_engine.discover import _as_float_matrix
from ravl_engine.planted import KIND_FEATURE, planted_embeddings, precision_at_k
from tests.conftest import random_scores, unit_rows
from tests.oracles import dense_discover


def _args(ps):
    return ps.region_embeddings, ps.num_regions, ps.image_labels, ps.image_scores, ps.region_scores


def test_planted_feature_is_the_top_cluster(planted_small):
    result = discover(*_args(planted_small), seed=0)
    assert result.clusters, "the planted feature must pass the filter"
    top = result.clusters[0]
    assert top.rank == 1
    assert top.class_index == planted_small.spurious_class
    assert precision_at_k(top.region_indices, planted_small.region_kind, 10) == 1.0
    # most of the cluster is the feature, and the feature mostly lands in top clusters
    assert (planted_small.region_kind[top.region_indices] == KIND_FEATURE).mean() > 0.9
    assert top.influence >= 0.25 and top.gap > 0
    # the sweep ran [2C, 5C) for C = 4 and kept the K of the best silhouette
    assert list(result.silhouettes) == list(range(8, 20))
    assert result.silhouettes[result.k] == max(result.silhouettes.values())
    table = {row.class_index: row for row in top.table}
    spurious = table[planted_small.spurious_class]
    assert spurious.acc_present > spurious.acc_absent
    assert any(row.acc_present < row.acc_absent for row in top.table)
    # ranking order: similarity to the medoid, descending
    assert np.all(np.diff(top.similarities) <= 0)
    assert top.region_indices[0] == top.medoid


@pytest.mark.parametrize("clip", [False, True])
def test_end_to_end_equals_dense_oracle(clip):
    ps = planted_embeddings(800, dim=24, num_classes=3, seed=5, noise=1.2, dtype=np.float64)
    result = discover(*_args(ps), seed=4, config=DiscoverConfig(clip_distance=clip))
    dense = dense_discover(*_args(ps), seed=4, clip=clip)
    assert result.k == dense.k
    for k, v in dense.silhouettes.items():
        assert math.isclose(result.silhouettes[k], v, rel_tol=1e-9, abs_tol=1e-12)
    assert result.medoids.tolist() == dense.medoids.tolist()
    assert result.assignments.tolist() == dense.labels.tolist()
    assert [c.cluster_id for c in result.clusters] == dense.ranked
    by_id = {s.cluster: s for s in dense.scores}
    for c, regions in zip(result.clusters, dense.ranked_regions, strict=True):
        assert c.region_indices.tolist() == regions
        assert math.isclose(c.gap, by_id[c.cluster_id].total_gap, abs_tol=1e-12)
        assert math.isclose(c.influence, by_id[c.cluster_id].influence, abs_tol=1e-12)
        assert c.class_index == by_id[c.cluster_id].class_index
    assert result.clusters, "this setting plants a feature the filter keeps"


def test_numpy_and_torch_inputs_agree_and_seed_is_deterministic(planted_small):
    a = discover(*_args(planted_small), seed=1)
    b = discover(*(torch.as_tensor(v) for v in _args(planted_small)), seed=1)
    assert a.k == b.k and a.assignments.tolist() == b.assignments.tolist()
    assert [c.region_indices.tolist() for c in a.clusters] == [c.region_indices.tolist() for c in b.clusters]


def test_search_strategy_and_cached_agree(planted_small):
    a = discover(*_args(planted_small), config=DiscoverConfig(strategy="cached"))
    b = discover(*_args(planted_small), config=DiscoverConfig(strategy="search", backend="torch"))
    assert a.k == b.k and a.medoids.tolist() == b.medoids.tolist()
    assert [c.cluster_id for c in a.clusters] == [c.cluster_id for c in b.clusters]


def test_fixed_k_and_inclusive_sweep(planted_small):
    fixed = discover(*_args(planted_small), config=DiscoverConfig(k=9))
    assert fixed.k == 9 and list(fixed.silhouettes) == [9]
    inclusive = discover(*_args(planted_small), config=DiscoverConfig(k_max_inclusive=True))
    assert list(inclusive.silhouettes) == list(range(8, 21))
    default = discover(*_args(planted_small))
    assert list(default.silhouettes) == list(range(8, 20))


def test_no_spurious_structure_gives_an_empty_result_not_an_error():
    x = unit_rows(400, 8, seed=1, dtype=torch.float32).numpy()
    num_regions = np.full(100, 4)
    labels = np.arange(100) % 4
    perfect = np.eye(4)[labels]
    result = discover(x, num_regions, labels, perfect, random_scores(400, 4))
    assert result.clusters == []
    assert sorted(result.silhouettes) == list(range(8, 20))  # the sweep [2C, 5C) ran in full
    assert result.silhouettes[result.k] == max(result.silhouettes.values())  # and K is its best
    assert result.gap_total.shape == (result.k,) and result.assignments.shape == (400,)
    json.dumps(result.to_dict())


def test_to_dict_is_json(planted_small):
    result = discover(*_args(planted_small))
    payload = json.loads(json.dumps(result.to_dict(max_regions=5)))
    assert payload["k"] == result.k
    assert len(payload["clusters"][0]["region_indices"]) == 5
    assert payload["clusters"][0]["n_regions"] == len(result.clusters[0].region_indices)


def test_progress_callback_sees_every_k(planted_small):
    seen = []
    discover(*_args(planted_small), on_k=seen.append)
    assert [entry["k"] for entry in seen] == list(range(8, 20))
    assert all("silhouette" in entry and "seconds" in entry for entry in seen)


# ---------------------------------------------------------------- bad input


def _valid(n_images=60, per=4, c=3, d=8):
    x = unit_rows(n_images * per, d, seed=2, dtype=torch.float32).numpy()
    labels = np.arange(n_images) % c
    return [x, np.full(n_images, per), labels, random_scores(n_images, c), random_scores(n_images * per, c)]


@pytest.mark.parametrize(
    ("index", "value", "match"),
    [
        (0, np.zeros((240,), dtype=np.float32), "region_embeddings must be 2-D"),
        (0, np.ones((239, 8), dtype=np.float32), "region_embeddings has 239 rows but sum\\(num_regions\\) says 240"),
        (0, np.ones((240, 8), dtype=np.int64), "region_embeddings must be a float array"),
        (1, np.full(60, 4.0), "num_regions must hold integers"),
        (1, np.full((60, 1), 4), "num_regions must be 1-D"),
        (1, np.array([], dtype=np.int64), "num_regions is empty"),
        (2, np.arange(59) % 3, "image_labels has 59 entries but there are 60 images"),
        (2, np.full(60, 3), "image_labels\\[0\\] = 3 is not a class index in \\[0, 3\\)"),
        (3, np.ones((60, 3)), "image_scores must hold softmax probabilities .* row 0"),
        (3, np.ones((59, 3)) / 3, "image_scores has 59 rows but len\\(num_regions\\) says 60"),
        (3, np.ones((60, 1)), "discovery needs at least 2 classes"),
        (4, np.ones((240, 4)) / 4, "region_scores has 4 columns but image_scores has 3 classes"),
        (4, -np.ones((240, 3)), "region_scores must hold softmax probabilities"),
        (0, "not an array", "region_embeddings must be"),
    ],
)
def test_bad_input_names_the_argument(index, value, match):
    args = _valid()
    args[index] = value
    with pytest.raises(ConfigError, match=match):
        discover(*args)


def test_nan_and_zero_rows_are_refused_with_the_row():
    args = _valid()
    args[0][17, 3] = np.nan
    with pytest.raises(ConfigError, match="region_embeddings row 17 contains NaN or inf"):
        discover(*args)
    args = _valid()
    args[0][5] = 0.0
    with pytest.raises(ConfigError, match="region_embeddings row 5 is all zeros"):
        discover(*args)
    args = _valid()
    args[4][9, 0] = np.inf
    with pytest.raises(ConfigError, match="region_scores row 9 contains NaN or inf"):
        discover(*args)
    args = _valid()
    args[0][30, :2] = [np.inf, -np.inf]  # the row's sum is NaN
    with pytest.raises(ConfigError, match="region_embeddings row 30 contains NaN or inf"):
        discover(*args)
    # finite entries whose row sum overflows are not NaN or inf: the check looks at the entries then
    big = np.full((3, 4), 3e38, dtype=np.float32)
    assert _as_float_matrix("region_embeddings", big, rows=3, rows_from="test") is not None


def test_non_normalised_rows_warn_and_are_normalised_or_refused():
    args = _valid()
    normalised = discover(*args)
    args[0] = args[0] * 3.0
    with pytest.warns(RavlEngineWarning, match="240 of 240 rows are not unit-norm .*re-normalised"):
        scaled = discover(*args)
    assert scaled.assignments.tolist() == normalised.assignments.tolist()
    with pytest.raises(ConfigError, match="not unit-norm .*L2-normalise them"):
        discover(*args, config=DiscoverConfig(normalize="error"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        discover(*_valid())  # unit rows: no warning


def test_fewer_regions_than_k_is_a_clear_error():
    x = unit_rows(12, 4, seed=0, dtype=torch.float32).numpy()
    with pytest.raises(ConfigError, match="region_embeddings has 12 rows, too few for K = 14"):
        discover(x, np.full(3, 4), np.array([0, 1, 2]), random_scores(3, 3), random_scores(12, 3))
    # a fixed small K works on the same data
    result = discover(
        x, np.full(3, 4), np.array([0, 1, 2]), random_scores(3, 3), random_scores(12, 3), config=DiscoverConfig(k=3)
    )
    assert result.k == 3


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_precision_is_upcast(planted_small, half):
    """Half-precision rows run as the float32 rows they round to: the same K, assignments, medoids, ranking and
    scores (a run in half precision would round the similarities and differ)."""
    args = list(_args(planted_small))
    args[0] = torch.as_tensor(args[0]).to(half)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RavlEngineWarning)  # half rounding moves norms a little
        got = discover(*args)
        ref = discover(args[0].float(), *args[1:])
    assert ref.clusters, "the planted feature gives clusters to compare"
    assert got.k == ref.k and got.silhouettes == ref.silhouettes
    assert np.array_equal(got.assignments, ref.assignments) and np.array_equal(got.medoids, ref.medoids)
    assert [c.cluster_id for c in got.clusters] == [c.cluster_id for c in ref.clusters]
    for a, b in zip(got.clusters, ref.clusters, strict=True):
        assert a.similarities.dtype == b.similarities.dtype and np.array_equal(a.similarities, b.similarities)
        assert a.gap == b.gap and a.influence == b.influence


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_equals_cpu(planted_small):
    cpu = discover(*_args(planted_small))
    for backend in ("torch", "faiss"):
        gpu = discover(*_args(planted_small), config=DiscoverConfig(device="cuda", backend=backend))
        assert gpu.k == cpu.k
        assert [c.cluster_id for c in gpu.clusters] == [c.cluster_id for c in cpu.clusters]
        assert gpu.clusters[0].region_indices[:10].tolist() == cpu.clusters[0].region_indices[:10].tolist()
