"""ravl-engine finetune: early stopping, checkpoint written atomically and loadable by embed."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from ravl_engine import ConfigError
from ravl_engine.cli import main
from ravl_engine.controlled import SynthConfig, run_synth
from ravl_engine.finetune import FinetuneConfig, make_optimizer, run_finetune
from ravl_engine.models import load_clip


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return run_synth(SynthConfig(out=str(out), classes=(0, 1, 2), n_train=240, n_eval=60, cramers_v=0.9, seed=0))


def test_finetune_writes_a_loadable_checkpoint(setting, tmp_path):
    ckpt = tmp_path / "model.pt"
    cfg = FinetuneConfig(train=setting.train_manifest, out=str(ckpt), epochs=3, batch_size=64)
    result = run_finetune(cfg)
    assert ckpt.exists() and not (tmp_path / "model.pt.tmp").exists()
    assert result.val_metric == "zero_shot_accuracy"
    # one entry per epoch run: all 3, or fewer when `patience` epochs in a row did not beat the best one
    n = len(result.history)
    assert [h["epoch"] for h in result.history] == list(range(1, n + 1))
    assert n == cfg.epochs or n - result.best_epoch == cfg.patience
    assert 0 <= result.best_epoch <= n and n - result.best_epoch <= cfg.patience
    assert result.best_val == max([h["zero_shot_accuracy"] for h in result.history] + [result.best_val])
    blob = torch.load(ckpt, weights_only=True)
    assert blob["arch"] == "ravl-tiny-rn" and blob["epoch"] == result.best_epoch
    loaded = load_clip("ravl-tiny-rn", str(ckpt))
    state = loaded.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in blob["state_dict"].items())
    with pytest.raises(ConfigError, match="was trained as 'ravl-tiny-rn', not 'ravl-tiny-vit'"):
        load_clip("ravl-tiny-vit", str(ckpt))


def test_freeze_text_trains_only_the_image_tower():
    model = load_clip("ravl-tiny-rn").model
    make_optimizer(model, lr=1e-3, weight_decay=0.0, freeze_text=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("visual.") for n in trainable)


def test_finetune_cli_and_bad_input(setting, tmp_path):
    res = CliRunner().invoke(
        main,
        [
            "finetune",
            "--train",
            setting.train_manifest,
            "--out",
            str(tmp_path / "m.pt"),
            "--epochs",
            "1",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["checkpoint"].endswith("m.pt")
    no_captions = tmp_path / "nocap.csv"
    no_captions.write_text("image,label\n" + setting.train_manifest.replace("train.csv", "train/000000.png") + ",0\n")
    res = CliRunner().invoke(
        main, ["finetune", "--train", str(no_captions), "--out", str(tmp_path / "x.pt"), "--no-progress"]
    )
    assert res.exit_code != 0 and "has no caption" in res.output
    with pytest.raises(ConfigError, match="val_fraction must be in"):
        FinetuneConfig(train="t.csv", out="o.pt", val_fraction=1.5)
