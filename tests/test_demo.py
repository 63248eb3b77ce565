"""evaluate metrics against hand counts, and the demo end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from ravl_engine import ConfigError
from ravl_engine.cli import main
from ravl_engine.demo import DemoConfig, run_demo
from ravl_engine.evaluate import evaluate_run
from ravl_engine.shards import RunData, ShardData


def _run(image_pred_correct, region_labels, per_image=2):
    """A hand-made RunData: 2 classes, text embeddings = unit axes, embeddings pointing at the predicted class."""
    n = len(image_pred_correct)
    labels = np.array([i % 2 for i in range(n)])
    image_emb = np.zeros((n, 2), np.float32)
    for i, ok in enumerate(image_pred_correct):
        image_emb[i, labels[i] if ok else 1 - labels[i]] = 1.0
    region_emb = np.zeros((n * per_image, 2), np.float32)
    for r, lab in enumerate(region_labels):
        region_emb[r, int(lab) if lab in ("0", "1") else 0] = 1.0
    data = ShardData(
        ids=[f"i{i}" for i in range(n)],
        labels=labels,
        image_emb=image_emb,
        offsets=np.arange(0, n * per_image + 1, per_image),
        boxes=np.tile([[0, 0, 1, 1]], (n * per_image, 1)).astype(np.float32),
        region_emb=region_emb,
        scores=np.ones(n * per_image, np.float32),
        region_labels=list(region_labels),
    )
    return RunData(manifest={}, data=data, classes=["0", "1"], text_emb=np.eye(2, dtype=np.float32))


def test_evaluate_counts_groups_and_gaps():
    # images 0..7, class = i % 2; the feature ("sq") is in images 0, 1, 2, 3
    correct = [True, False, True, False, False, True, False, True]
    regions = []
    for i in range(8):
        regions += [str(i % 2), "sq" if i < 4 else "none"]
    result = evaluate_run(_run(correct, regions))
    assert result.feature == "sq"
    groups = {(g["class"], g["feature_present"]): g for g in result.groups}
    assert groups[("0", True)]["image_accuracy"] == 1.0 and groups[("0", False)]["image_accuracy"] == 0.0
    assert groups[("1", True)]["image_accuracy"] == 0.0 and groups[("1", False)]["image_accuracy"] == 1.0
    assert result.spurious_class == "0" and result.gap_spurious == 1.0 and result.gap_other == 1.0 and result.valid
    assert result.image_overall == 0.5 and result.image_worst_group == 0.0
    assert result.region_overall == 1.0  # every class region points at its class
    with pytest.raises(ConfigError, match="not among the region labels"):
        evaluate_run(_run(correct, regions), feature="disk")


def test_reduced_demo_runs_end_to_end(tmp_path):
    summary = run_demo(DemoConfig(out=str(tmp_path), n_train=300, n_eval=100, epochs=1)).to_dict()
    assert set(summary) >= {"planted", "found", "found_planted_feature", "validity", "metrics", "paths", "seconds"}
    assert summary["planted"]["feature"] == "red square"
    doc = json.loads(open(summary["paths"]["discovery"]).read())
    assert doc["classes"] == [str(d) for d in range(10)]
    json.dumps(summary)


def test_demo_cli_runs_the_scene_layout(tmp_path):
    out = tmp_path / "scene"
    args = ["demo", "--out", str(out), "--layout", "scene", "--image-size", "96", "--model", "ravl-tiny-rn-112"]
    res = CliRunner().invoke(main, [*args, "--n-train", "60", "--n-eval", "40", "--epochs", "1"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["config"]["layout"] == "scene" and summary["config"]["image_size"] == 96
    from PIL import Image

    first = next((out / "data").rglob("*.png"))
    assert Image.open(first).size == (96, 96)  # synth drew scenes, not 56 px quadrant images


def test_demo_plants_the_feature_it_is_given(tmp_path):
    out = tmp_path / "disk"
    args = ["demo", "--out", str(out), "--shape", "disk", "--color", "blue", "--n-train", "60", "--n-eval", "40"]
    res = CliRunner().invoke(main, [*args, "--epochs", "1"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["planted"]["feature"] == "blue disk" and summary["config"]["shape"] == "disk"
    rows = list(csv.DictReader((out / "data" / "eval.csv").open()))
    labels = {label for r in rows for label in json.loads(r["region_labels"])}
    assert "blue disk" in labels and "red square" not in labels
    # a typo is refused before the existing demo is touched, even with --overwrite
    bad = CliRunner().invoke(main, ["demo", "--out", str(out), "--shape", "disc", "--overwrite"])
    assert bad.exit_code != 0 and "disc" in bad.output
    assert (out / "data" / "eval.csv").exists()


@pytest.mark.slow
def test_default_demo_finds_the_planted_feature(tmp_path):
    res = CliRunner().invoke(main, ["demo", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["validity"]["valid"], summary["validity"]
    assert summary["found"]["class"] == "3"
    assert summary["found"]["precision_at_10"] >= 0.8
    assert summary["found_planted_feature"]
