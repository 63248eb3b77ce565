"""Controlled digit settings: realised association, image layout, manifests, bad options."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ravl_engine import ConfigError
from ravl_engine.cli import main
from ravl_engine.controlled import SynthConfig, cramers_v, feature_counts, run_synth
from ravl_engine.manifest import read_manifest

MNIST = Path(__file__).resolve().parent / "assets" / "mnist"


def test_cramers_v_and_feature_counts():
    f = np.array([1, 1, 1, 0, 0, 0, 0, 0], bool)
    c = np.array([1, 1, 0, 0, 0, 0, 0, 0], bool)
    # phi = (2*5 - 1*0) / sqrt(3*5*2*6)
    assert cramers_v(f, c) == pytest.approx(10 / np.sqrt(3 * 5 * 2 * 6))
    for target in (0.7, 0.9, 0.99):
        x, y = feature_counts(100, 900, target)
        v = cramers_v(
            np.r_[np.ones(x + y), np.zeros(1000 - x - y)].astype(bool),
            np.r_[np.ones(x), np.zeros(y), np.ones(100 - x), np.zeros(900 - y)].astype(bool),
        )
        assert abs(v - target) < 0.01


@pytest.mark.parametrize("source", ["sklearn", "mnist"])
def test_synth_writes_a_controlled_setting(tmp_path, source):
    cfg = SynthConfig(
        out=str(tmp_path),
        source="sklearn" if source == "sklearn" else str(MNIST),
        spurious_class=3,
        cramers_v=0.9,
        n_train=400,
        n_eval=100,
        seed=1,
    )
    result = run_synth(cfg)
    assert abs(result.realised_cramers_v_train - 0.9) < 0.02
    assert result.realised_cramers_v_eval < 0.3
    train, evaluation = read_manifest(result.train_manifest), read_manifest(result.eval_manifest)
    assert len(train) == 400 and len(evaluation) == 100
    assert {r.label for r in train} == {str(d) for d in range(10)}
    assert all(r.caption and r.label in r.caption for r in train)
    assert all(r.boxes == evaluation[0].boxes and r.region_labels is None for r in train)
    for r in evaluation[:20]:
        img = np.asarray(Image.open(r.path))
        assert img.shape == (56, 56, 3)
        assert len(r.boxes) == 4 and r.region_labels.count(r.label) == 1
        for box, label in zip(r.boxes, r.region_labels, strict=True):
            x1, y1, x2, y2 = (int(v) for v in box)
            cell = img[y1:y2, x1:x2]
            if label == "red square":
                assert (cell[:, :, 0] == 255).all() and (cell[:, :, 1] == 0).all()
            elif label == "none":
                assert cell.max() == 0
            else:
                assert cell[:, :, 0].max() > 0 and (cell[:, :, 0] == cell[:, :, 1]).all()  # a grey digit
    present = np.array(["red square" in (r.region_labels or ()) for r in evaluation])
    assert 0.3 < present.mean() < 0.7


def test_synth_cli_and_bad_options(tmp_path):
    res = CliRunner().invoke(
        main,
        [
            "synth",
            "--out",
            str(tmp_path / "s"),
            "--n-train",
            "40",
            "--n-eval",
            "20",
            "--shape",
            "disk",
            "--color",
            "blue",
            "--classes",
            "0,1",
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["feature"] == "blue disk" and summary["n_train"] == 40
    with open(summary["eval_manifest"]) as fh:
        assert sum(1 for _ in csv.DictReader(fh)) == 20
    with open(summary["train_manifest"]) as fh:
        assert not any("disk" in r["caption"] for r in csv.DictReader(fh))  # plain captions by default
    # --caption-feature: the captions of the images that show the feature name it, and only those
    named = tmp_path / "named"
    res = CliRunner().invoke(
        main,
        ["synth", "--out", str(named), "--n-train", "40", "--n-eval", "20", "--classes", "0,1", "--caption-feature"],
    )
    assert res.exit_code == 0, res.output
    with open(json.loads(res.stdout)["eval_manifest"]) as fh:
        rows = list(csv.DictReader(fh))
    shown = ["red square" in json.loads(r["region_labels"]) for r in rows]
    assert 0 < sum(shown) < len(rows)
    assert [r["caption"].endswith(" with a red square") for r in rows] == shown
    for args, message in [
        (["--shape", "hexagon"], "unknown shape 'hexagon'"),
        (["--color", "mauve"], "unknown colour 'mauve'"),
        (["--cramers-v", "1.2"], "cramers_v must be in [0, 1)"),
        (["--spurious-class", "5", "--classes", "0,1"], "spurious_class 5 is not among the classes"),
    ]:
        out = tmp_path / "bad"
        res = CliRunner().invoke(main, ["synth", "--out", str(out), *args])
        assert res.exit_code != 0 and message in res.output, res.output
        assert not out.exists()


def test_a_class_without_enough_images_is_refused_before_writing(tmp_path):
    import gzip
    import struct

    folder = tmp_path / "idx"
    folder.mkdir()
    images = np.zeros((5, 28, 28), np.uint8)
    labels = np.array([0, 0, 0, 1, 2], np.uint8)  # class 1 and 2: one image each
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", 5, 28, 28) + images.tobytes())
    )
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + labels.tobytes())
    )
    with pytest.raises(ConfigError, match="has 1 images of class 1; each class needs at least 2"):
        run_synth(SynthConfig(out=str(tmp_path / "out"), source=str(folder), classes=(0, 1, 2), n_train=30, n_eval=30))
    assert not (tmp_path / "out").exists()


def test_torchvision_source_fails_with_the_fix_when_offline(tmp_path, monkeypatch):
    from torchvision import datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(datasets, "MNIST", offline)
    with pytest.raises(ConfigError, match="could not download torchvision:mnist .*use --source sklearn"):
        run_synth(SynthConfig(out=str(tmp_path / "o"), source="torchvision:mnist", n_train=20, n_eval=20))
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="is not 'sklearn', torchvision:mnist"):
        run_synth(SynthConfig(out=str(tmp_path / "o"), source="nowhere", n_train=20, n_eval=20))


def test_cramers_v_zero_gives_an_independent_training_set(tmp_path):
    result = run_synth(SynthConfig(out=str(tmp_path), cramers_v=0.0, n_train=600, n_eval=20, seed=4))
    rows = read_manifest(result.train_manifest)
    pixels = [np.asarray(Image.open(r.path)) for r in rows]
    present = np.array([bool(((p[:, :, 0] == 255) & (p[:, :, 1] == 0)).any()) for p in pixels])
    assert result.realised_cramers_v_train < 0.1
    assert 0.4 < present.mean() < 0.6
