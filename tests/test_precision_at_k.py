"""Precision@k of a discovery against an embedded evaluation set: regions matched by (image, box), known answers."""

from __future__ import annotations

import json

import pytest

from ravl_engine.cluster import DISCOVERY_FORMAT
from ravl_engine.documents import Audit, RunRecord
from ravl_engine.embed import EmbedConfig, run_embed
from ravl_engine.evaluate import evaluate_dir
from ravl_engine.shards import read_run
from tests.conftest import write_digit_dataset


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    data = write_digit_dataset(root / "d", n_images=24)
    run_embed(EmbedConfig(data=str(data), out=str(root / "run"), proposer="manifest"))
    return root


def _regions(run_dir):
    """Every region of the run as (discovery.json entry, ground-truth label)."""
    data = read_run(run_dir).data
    out = []
    for i, image in enumerate(data.ids):
        for r in range(int(data.offsets[i]), int(data.offsets[i + 1])):
            out.append(({"image": image, "box": data.boxes[r].tolist(), "similarity": 0.0}, data.region_labels[r]))
    return out


def _write(path, clusters, run_dir):
    """A discovery.json of these clusters, audited on ``run_dir`` (placeholder medoids: Precision@k reads only the
    regions)."""
    doc = {
        "format": DISCOVERY_FORMAT,
        "k": max(1, len(clusters)),
        "classes": ["0", "1", "2"],
        "embedding_dim": 2,
        "audit": Audit.of_run(RunRecord.from_dict(json.loads((run_dir / "manifest.json").read_text()))).to_dict(),
        "clusters": clusters,
        "medoids": [[1.0, 0.0]] * max(1, len(clusters)),
    }
    path.write_text(json.dumps(doc))
    return path


def _cluster(rank, regions, cls="0"):
    return {
        "rank": rank,
        "cluster_id": rank - 1,
        "class": cls,
        "gap": 0.5,
        "influence": 0.5,
        "table": [],
        "medoid": [1.0, 0.0],
        "regions": regions,
    }


def test_precision_counts_the_feature_among_the_top_clusters_first_k_regions(eval_run, tmp_path):
    regions = _regions(eval_run / "run")
    square = [r for r, label in regions if label == "square"]
    other = [r for r, label in regions if label != "square"]
    assert len(square) >= 8 and len(other) >= 30
    # hits at positions 1, 2, 4, 7 of the first 10; positions 11..30 are all misses
    top = [square[0], square[1], other[0], square[2], other[1], other[2], square[3], other[3], other[4], other[5]]
    top += other[6:26]
    # a second-ranked cluster of squares only must not count: Precision@k is about the top cluster
    path = _write(tmp_path / "discovery.json", [_cluster(1, top, "2"), _cluster(2, square[4:8])], eval_run / "run")
    result = evaluate_dir(eval_run / "run", discovery_path=path, feature="square", spurious_class="0")
    assert result.precision_at_k == pytest.approx({"p@10": 4 / 10, "p@25": 4 / 25})
    assert result.top_cluster_class == "2"


def test_boxes_match_to_two_decimals_and_other_images_never_match(eval_run, tmp_path):
    regions = _regions(eval_run / "run")
    square = [r for r, label in regions if label == "square"]
    images = sorted({r["image"] for r, _ in regions})
    nudged = {**square[0], "box": [v + 0.001 for v in square[0]["box"]]}  # float noise of a JSON round trip
    moved = {**square[1], "box": [v + 0.5 for v in square[1]["box"]]}  # another box
    elsewhere = {**square[2], "image": next(i for i in images if i != square[2]["image"])}
    unknown = {**square[3], "image": "img/not-in-the-run.png"}
    path = _write(tmp_path / "d.json", [_cluster(1, [nudged, moved, elsewhere, unknown])], eval_run / "run")
    result = evaluate_dir(eval_run / "run", discovery_path=path, feature="square", spurious_class="0")
    # only the nudged box is the same region; the box in another image holds a square only if that image has one
    # there, so it is checked against the run's own labels
    truth = {(r["image"], tuple(r["box"])): label for r, label in regions}
    expected_elsewhere = truth.get((elsewhere["image"], tuple(elsewhere["box"]))) == "square"
    assert result.precision_at_k["p@10"] == pytest.approx((1 + expected_elsewhere) / 4)


def test_no_cluster_gives_zero_precision_and_no_class(eval_run, tmp_path):
    path = _write(tmp_path / "empty.json", [], eval_run / "run")
    result = evaluate_dir(eval_run / "run", discovery_path=path, feature="square", spurious_class="0")
    assert result.precision_at_k == {"p@10": 0.0, "p@25": 0.0} and result.top_cluster_class is None
    no_discovery = evaluate_dir(eval_run / "run", feature="square", spurious_class="0")
    assert no_discovery.precision_at_k is None
