"""Early stopping, patience and --select of finetune and mitigate, on tiny-model runs of a few seconds.

A learning rate of 1e-10 leaves the weights where they start (AdamW's steps are about lr in size, far below the
float32 spacing of the weights), so no epoch can beat the starting weights: the run must stop after exactly
``patience`` epochs and keep the starting weights. The tiny ViT has no batch-norm statistics that training would
move.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from ravl_engine.cli import main
from ravl_engine.embed import EmbedConfig, run_embed
from ravl_engine.finetune import FinetuneConfig, run_finetune
from ravl_engine.mitigate import MitigateConfig, run_mitigate
from ravl_engine.models import load_clip
from tests.conftest import write_digit_dataset
from tests.test_mitigate import _discovery

MODEL = "ravl-tiny-vit"
FROZEN = 1e-10  # see the module docstring


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("stopping")
    audit_set = write_digit_dataset(root / "audit", n_images=24, seed=0)
    train_set = write_digit_dataset(root / "train", n_images=40, seed=1)
    run_embed(EmbedConfig(data=str(audit_set), out=str(root / "run"), proposer="manifest", model=MODEL))
    return root, train_set, _discovery(root / "run", root / "discovery.json")


def _same_weights(path, seed: int) -> bool:
    start = load_clip(MODEL, init_seed=seed).model.state_dict()
    kept = torch.load(path, weights_only=True)["state_dict"]
    return start.keys() == kept.keys() and all(torch.equal(start[k], kept[k]) for k in start)


@pytest.mark.parametrize("patience", [1, 2])
def test_finetune_stops_after_patience_epochs_without_gain(setting, tmp_path, patience):
    _, train_set, _ = setting
    out = tmp_path / "m.pt"
    cfg = FinetuneConfig(
        train=str(train_set), out=str(out), model=MODEL, epochs=5, batch_size=16, lr=FROZEN, patience=patience
    )
    result = run_finetune(cfg)
    assert [h["epoch"] for h in result.history] == list(range(1, patience + 1))
    assert result.best_epoch == 0 and torch.load(out, weights_only=True)["epoch"] == 0
    assert _same_weights(out, cfg.seed)  # the starting weights are what was kept
    assert any("no epoch beat the starting weights" in w for w in result.warnings)


def test_finetune_with_patience_as_long_as_the_run_trains_every_epoch(setting, tmp_path):
    _, train_set, _ = setting
    res = CliRunner().invoke(
        main,
        [
            "finetune",
            "--train",
            str(train_set),
            "--out",
            str(tmp_path / "m.pt"),
            "--model",
            MODEL,
            "--epochs",
            "3",
            "--patience",
            "3",
            "--lr",
            str(FROZEN),
            "--batch-size",
            "16",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3] and summary["best_epoch"] == 0


def _mitigate(setting, tmp_path, **kw):
    root, train_set, discovery = setting
    cfg = MitigateConfig(
        train=str(train_set),
        discovery=str(discovery),
        out=str(tmp_path / "m.pt"),
        work_dir=str(root / "train-regions"),
        model=MODEL,
        batch_size=16,
        val_fraction=0.25,
        lr=FROZEN,
        **kw,
    )
    return cfg, run_mitigate(cfg)


@pytest.mark.parametrize(("select", "metric"), [("accuracy", "zero_shot_accuracy"), ("worst-group", "worst_group")])
def test_mitigate_select_best_stops_after_patience(setting, tmp_path, select, metric):
    cfg, result = _mitigate(setting, tmp_path, method="standard", epochs=4, patience=2, select=select)
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert result.best_epoch == 0 and _same_weights(cfg.out, cfg.seed)
    assert metric in result.val_metric


def test_mitigate_select_last_keeps_the_final_epoch_and_never_stops_early(setting, tmp_path):
    cfg, result = _mitigate(setting, tmp_path, method="standard", epochs=3, patience=1, select="last")
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.best_epoch == 3 and torch.load(cfg.out, weights_only=True)["epoch"] == 3


def test_mitigate_cli_select_and_patience(setting, tmp_path):
    root, train_set, discovery = setting
    base = ["mitigate", "--train", str(train_set), "--discovery", str(discovery), "--model", MODEL]
    base += ["--work-dir", str(root / "train-regions"), "--batch-size", "16", "--lr", str(FROZEN), "--no-progress"]
    res = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "a.pt"), "--epochs", "3", "--patience", "1"])
    assert res.exit_code == 0, res.output
    assert [h["epoch"] for h in json.loads(res.stdout)["history"]] == [1]
    res = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "b.pt"), "--epochs", "2", "--select", "last"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["best_epoch"] == 2
    res = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "c.pt"), "--select", "best"])
    assert res.exit_code == 2 and "'best' is not one of" in res.output
