"""``synth --layout scene``: golden boxes and labels, non-overlapping objects inside the image, the feature exactly
where flagged, the realised association, determinism, the CLI, and proposers on scene images."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ravl_engine import ConfigError
from ravl_engine.cli import main
from ravl_engine.controlled import (
    COLORS,
    DISTRACTOR_PREFIX,
    SHAPES,
    SynthConfig,
    boxes_apart,
    cramers_v,
    feature_patch,
    place_boxes,
    run_synth,
)
from ravl_engine.manifest import read_manifest

GOLDEN = Path(__file__).resolve().parent / "assets" / "scene_golden"
GOLDEN_CFG = {"classes": (0, 1, 2), "spurious_class": 1, "cramers_v": 0.9, "n_train": 6, "n_eval": 6, "seed": 0}


def _scene(tmp_path: Path, **kw) -> SynthConfig:
    cfg = SynthConfig(out=str(tmp_path / "scene"), layout="scene", **{**GOLDEN_CFG, **kw})
    run_synth(cfg)
    return cfg


def test_tiny_scene_set_matches_the_golden(tmp_path):
    cfg = _scene(tmp_path)
    for name in ("train.csv", "eval.csv"):
        written = (Path(cfg.out) / name).read_text(encoding="utf-8")
        assert written == (GOLDEN / name).read_text(encoding="utf-8"), f"{name} differs from {GOLDEN / name}"


def _object_pixels_ok(img: np.ndarray, box, label: str, feature: str) -> None:
    x1, y1, x2, y2 = (int(v) for v in box)
    crop = img[y1:y2, x1:x2]
    if label == feature:
        assert np.array_equal(crop, feature_patch("square", "red", crop.shape[0]))
    elif label.startswith(DISTRACTOR_PREFIX):
        color, shape = label[len(DISTRACTOR_PREFIX) :].split("-")
        assert (color, shape) != ("red", "square") and color in COLORS and shape in SHAPES
        assert np.array_equal(crop, feature_patch(shape, color, crop.shape[0]))
    else:  # a grey digit
        assert crop.max() > 0 and (crop[:, :, 0] == crop[:, :, 1]).all() and (crop[:, :, 1] == crop[:, :, 2]).all()


def test_scene_structure(tmp_path):
    cfg = _scene(tmp_path, classes=tuple(range(10)), spurious_class=3, n_train=200, n_eval=60, seed=2)
    feature = "red square"
    for part in ("train", "eval"):
        rows = read_manifest(Path(cfg.out) / f"{part}.csv")
        for r in rows:
            img = np.asarray(Image.open(r.path))
            assert img.shape == (112, 112, 3)
            boxes = [[int(v) for v in b] for b in r.boxes]
            mask = np.zeros(img.shape[:2], bool)
            for b in boxes:
                assert 0 <= b[0] < b[2] <= 112 and 0 <= b[1] < b[3] <= 112 and b[2] - b[0] == b[3] - b[1]
                mask[b[1] : b[3], b[0] : b[2]] = True
            assert all(boxes_apart(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
            assert img[~mask].max() == 0  # nothing outside the objects
            if part == "eval":
                labels = r.region_labels
                assert labels[0] == r.label and 28 <= boxes[0][2] - boxes[0][0] <= 48
                kinds = [lab for lab in labels if lab.startswith(DISTRACTOR_PREFIX)]
                assert 1 <= len(kinds) <= 3 and len(labels) == 1 + len(kinds) + (feature in labels)
                for box, label in zip(boxes, labels, strict=True):
                    _object_pixels_ok(img, box, label, feature)
                # the feature is in exactly the rows that list it: red-square pixels nowhere else
                red = (img[:, :, 0] == 255) & (img[:, :, 1] == 0) & (img[:, :, 2] == 0)
                if feature not in labels:
                    assert not any(red[b[1] : b[3], b[0] : b[2]].all() for b in boxes)


def test_scene_realised_association_and_determinism(tmp_path):
    cfg = SynthConfig(
        out=str(tmp_path / "a"), layout="scene", spurious_class=3, cramers_v=0.85, n_train=600, n_eval=200, seed=5
    )
    result = run_synth(cfg)
    assert abs(result.realised_cramers_v_train - 0.85) < 0.02 and result.realised_cramers_v_eval < 0.3
    rows = read_manifest(result.train_manifest)
    pixels = [np.asarray(Image.open(r.path)) for r in rows]

    def has_feature(img: np.ndarray, r) -> bool:  # a box that is all red
        crops = [img[int(b[1]) : int(b[3]), int(b[0]) : int(b[2])] for b in r.boxes[1:]]
        return any(np.array_equal(c, feature_patch("square", "red", c.shape[0])) for c in crops)

    present = np.array([has_feature(p, r) for p, r in zip(pixels, rows, strict=True)])
    is_class = np.array([r.label == "3" for r in rows])
    assert present[~is_class].any()  # V < 1: the feature occurs in other classes too
    assert cramers_v(present, is_class) == pytest.approx(result.realised_cramers_v_train)
    run_synth(dataclasses.replace(cfg, out=str(tmp_path / "b")))
    for name in ("train.csv", "eval.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    a = np.asarray(Image.open(tmp_path / "a" / "eval" / "000007.png"))
    assert np.array_equal(a, np.asarray(Image.open(tmp_path / "b" / "eval" / "000007.png")))


def test_place_boxes_and_bad_scene_options():
    rng = np.random.default_rng(0)
    boxes = place_boxes([40, 20, 20, 20], 100, rng, taken=[[0, 0, 30, 30]])
    assert all(boxes_apart(a, b) for i, a in enumerate([[0, 0, 30, 30], *boxes]) for b in boxes[i:])
    with pytest.raises(ConfigError, match="cannot place objects of sizes .* use a larger image_size"):
        place_boxes([60, 60], 100, rng)
    with pytest.raises(ConfigError, match="unknown layout 'mosaic'"):
        SynthConfig(out="x", layout="mosaic")
    with pytest.raises(ConfigError, match="image_size must be in \\[64, 1024\\]"):
        SynthConfig(out="x", layout="scene", image_size=32)


def test_synth_scene_cli_and_proposers(tmp_path):
    out = tmp_path / "s"
    args = ["synth", "--out", str(out), "--layout", "scene", "--image-size", "96", "--n-train", "20", "--n-eval", "20"]
    res = CliRunner().invoke(main, [*args, "--classes", "0,1", "--spurious-class", "1"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    rows = read_manifest(summary["eval_manifest"])
    assert len(rows) == 20 and np.asarray(Image.open(rows[0].path)).shape == (96, 96, 3)
    from ravl_engine.proposers import build_proposer

    image = Image.open(rows[0].path).convert("RGB")
    for name, kw in (("grid", {"rows": 3, "cols": 3}), ("manifest", {})):
        proposer = build_proposer(name, **kw)
        assert proposer is not None
    res = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "bad"), "--layout", "mosaic"])
    assert res.exit_code != 0 and "mosaic" in res.output
    assert image.size == (96, 96)
