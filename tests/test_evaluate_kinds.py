"""Region metrics per kind and the paired counterfactual: hand-made runs with known answers, the pasted pixels,
and ``evaluate`` through the CLI on a scene set."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ravl_engine import ConfigError
from ravl_engine.cli import main
from ravl_engine.controlled import SynthConfig, boxes_apart, run_synth
from ravl_engine.evaluate import counterfactual_flips, evaluate_run, write_counterfactuals
from ravl_engine.manifest import read_manifest
from ravl_engine.shards import RunData, ShardData


def _run(image_class, region_labels, region_pred, per_image):
    """2 classes; text embeddings = unit axes; region embeddings point at the given predicted class."""
    n = len(image_class)
    r = len(region_labels)
    image_emb = np.zeros((n, 2), np.float32)
    image_emb[np.arange(n), image_class] = 1.0
    region_emb = np.zeros((r, 2), np.float32)
    region_emb[np.arange(r), region_pred] = 1.0
    data = ShardData(
        ids=[f"i{i}" for i in range(n)],
        labels=np.array(image_class),
        image_emb=image_emb,
        offsets=np.arange(0, r + 1, per_image),
        boxes=np.tile([[0, 0, 1, 1]], (r, 1)).astype(np.float32),
        region_emb=region_emb,
        scores=np.ones(r, np.float32),
        region_labels=list(region_labels),
    )
    return RunData(manifest={}, data=data, classes=["0", "1"], text_emb=np.eye(2, dtype=np.float32))


def test_region_metrics_per_kind_known_answer():
    # 4 images (classes 0, 0, 1, 1), 3 regions each: digit, feature-or-blank, distractor
    image_class = [0, 0, 1, 1]
    labels = ["0", "sq", "distractor:green-disk", "0", "none", "distractor:blue-ring"]
    labels += ["1", "sq", "distractor:green-disk", "1", "none", "distractor:blue-ring"]
    pred = [0, 1, 0, 1, 0, 1] + [1, 1, 0, 1, 1, 1]
    result = evaluate_run(_run(image_class, labels, pred, 3), spurious_class="1")
    assert result.feature == "sq"  # distractor labels are not taken for the feature
    kinds = result.region_kinds
    assert set(kinds) == {"digit", "feature", "distractor", "blank"}
    # digit regions: 0->0 ok, 0->1 wrong, 1->1 ok, 1->1 ok
    assert kinds["digit"]["accuracy"] == 0.75 and kinds["digit"]["n_regions"] == 4
    assert kinds["digit"]["worst_class_accuracy"] == 0.5
    # feature regions: in image 0 (class 0) predicted 1, image 2 (class 1) predicted 1
    assert kinds["feature"]["accuracy"] == 0.5 and kinds["feature"]["spurious_rate"] == 1.0
    assert kinds["feature"]["worst_class_accuracy"] == 0.0
    # blank: image 1 (class 0) -> 0 ok; image 3 (class 1) -> 1 ok
    assert kinds["blank"]["accuracy"] == 1.0 and kinds["blank"]["spurious_rate"] == 0.5
    # distractors: class 0 images predicted 0, 1 -> 0.5; class 1 images predicted 0, 1 -> 0.5
    assert kinds["distractor"]["accuracy"] == 0.5 and kinds["distractor"]["spurious_rate"] == 0.5
    per_class = {g["class"]: g for g in kinds["distractor"]["per_class"]}
    assert per_class["0"]["n_regions"] == 2 and per_class["1"]["accuracy"] == 0.5
    assert result.region_overall == 0.75  # unchanged: digit regions only


def test_counterfactual_flips_known_answer():
    labels = np.array([0, 0, 0, 2, 2, 1, 1])  # spurious class 1
    before = np.array([0, 1, 0, 2, 0, 1, 0])  # image 1 is already predicted 1: not eligible; 5, 6 are class 1
    after = np.array([1, 1, 0, 1, 1, 1, 1])
    out = counterfactual_flips(before, after, labels, 1)
    assert out["n_images"] == 7 and out["n_eligible"] == 4 and out["n_flipped"] == 3
    assert out["flip_rate"] == 0.75
    assert out["accuracy_before"] == pytest.approx(4 / 7) and out["accuracy_after"] == pytest.approx(3 / 7)
    assert counterfactual_flips(np.array([1]), np.array([1]), np.array([0]), 1)["flip_rate"] is None


@pytest.mark.parametrize("layout", ["quadrants", "scene"])
def test_write_counterfactuals_pastes_the_feature_patch(tmp_path, layout):
    synth = run_synth(
        SynthConfig(out=str(tmp_path / "s"), layout=layout, classes=(0, 1), spurious_class=1, n_train=8, n_eval=16)
    )
    rows = read_manifest(synth.eval_manifest)
    path, ids = write_counterfactuals(synth.eval_manifest, "red square", tmp_path / "cf")
    free = [r for r in rows if "red square" not in r.region_labels]
    assert ids == [r.image for r in free] and len(free) > 0
    src = next(r for r in rows if "red square" in r.region_labels)
    b = [int(v) for v in src.boxes[src.region_labels.index("red square")]]
    patch = np.asarray(Image.open(src.path))[b[1] : b[3], b[0] : b[2]]
    for before, after in zip(free, read_manifest(path), strict=True):
        assert after.label == before.label
        k = after.region_labels.index("red square")
        box = [int(v) for v in after.boxes[k]]
        img, orig = np.asarray(Image.open(after.path)), np.asarray(Image.open(before.path))
        inside = np.zeros(img.shape[:2], bool)
        if layout == "quadrants":
            assert before.region_labels[k] == "none" and len(after.boxes) == len(before.boxes)
            assert (img[box[1] : box[3], box[0] : box[2]] == patch).all()
            inside[box[1] : box[3], box[0] : box[2]] = True
        else:
            assert len(after.boxes) == len(before.boxes) + 1 and all(boxes_apart(box, o) for o in before.boxes)
            assert (img[box[1] : box[3], box[0] : box[2]] == patch).all()
            inside[box[1] : box[3], box[0] : box[2]] = True
        assert (img[~inside] == orig[~inside]).all()  # nothing else changed


def test_write_counterfactuals_needs_an_image_with_the_feature(tmp_path):
    synth = run_synth(SynthConfig(out=str(tmp_path / "s"), classes=(0, 1), n_train=8, n_eval=8))
    with pytest.raises(ConfigError, match="no image shows the feature 'blue disk'"):
        write_counterfactuals(synth.eval_manifest, "blue disk", tmp_path / "cf")


def test_evaluate_cli_reports_kinds_and_the_counterfactual(tmp_path):
    synth = run_synth(
        SynthConfig(out=str(tmp_path / "s"), layout="scene", classes=(0, 1, 2), spurious_class=1, n_train=12, n_eval=24)
    )
    res = CliRunner().invoke(
        main,
        ["evaluate", "--data", synth.eval_manifest, "--model", "ravl-tiny-rn-112", "--spurious-class", "1"],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    rows = read_manifest(synth.eval_manifest)
    n_free = sum("red square" not in r.region_labels for r in rows)
    cf = doc["counterfactual"]
    assert cf["n_images"] == n_free and cf["n_flipped"] <= cf["n_eligible"] <= n_free
    if cf["n_eligible"]:
        assert cf["flip_rate"] == cf["n_flipped"] / cf["n_eligible"]
    assert doc["region_kinds"]["digit"]["n_regions"] == 24
    assert doc["region_kinds"]["distractor"]["n_regions"] == sum(len(r.boxes) for r in rows) - 24 - (24 - n_free)
    res = CliRunner().invoke(main, ["evaluate", "--data", synth.eval_manifest, "--no-counterfactual"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["counterfactual"] is None
