"""ravl-engine mitigate: preparation, the five methods, the fused step, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from ravl_engine import ConfigError
from ravl_engine.cli import main
from ravl_engine.cluster import DISCOVERY_FORMAT
from ravl_engine.documents import Audit, RunRecord
from ravl_engine.embed import EmbedConfig, run_embed
from ravl_engine.kernels.roi import region_embed, region_embed_train
from ravl_engine.manifest import read_manifest
from ravl_engine.mitigate import (
    METHODS,
    MitigateConfig,
    _GroupDRO,
    caption_classes,
    run_mitigate,
)
from ravl_engine.mitigate_prep import read_target
from ravl_engine.models import load_clip
from ravl_engine.shards import read_run
from tests.conftest import write_digit_dataset


def _discovery(run_dir: Path, path: Path, *, spurious_medoid=None, dim=None, model=None) -> Path:
    """A discovery.json whose clusters are the square, digit and empty regions of an embedded set (medoid = their
    normalised mean), cluster 0 (the squares) ranked first."""
    run = read_run(run_dir)
    labels = np.array(run.data.region_labels)
    emb = torch.from_numpy(run.data.region_emb)
    groups = [labels == "square", np.isin(labels, run.classes), labels == "none"]
    medoids = torch.stack([F.normalize(emb[torch.from_numpy(g)].mean(0), dim=0) for g in groups])
    if spurious_medoid is not None:
        medoids[0] = spurious_medoid
    if dim is not None:
        medoids = F.normalize(torch.randn(3, dim), dim=1)
    audit = Audit.of_run(RunRecord.from_dict(run.manifest)).to_dict()
    if model is not None:
        audit["model"] = model
    doc = {
        "format": DISCOVERY_FORMAT,
        "k": 3,
        "classes": run.classes,
        "embedding_dim": int(medoids.shape[1]),
        "audit": audit,
        "clusters": [
            {
                "rank": 1,
                "cluster_id": 0,
                "class": run.classes[0],
                "gap": 1.0,
                "influence": 1.0,
                "table": [],
                "medoid": medoids[0].tolist(),
                "regions": [],
            }
        ],
        "medoids": medoids.tolist(),
    }
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("mitigate")
    audit_set = write_digit_dataset(root / "audit", n_images=40, seed=0)
    train_set = write_digit_dataset(root / "train", n_images=60, seed=1)
    run_embed(EmbedConfig(data=str(audit_set), out=str(root / "run"), proposer="manifest"))
    discovery = _discovery(root / "run", root / "discovery.json")
    return root, train_set, discovery


def _cfg(setting, tmp_path, **kw):
    root, train_set, discovery = setting
    base = {
        "train": str(train_set),
        "discovery": str(discovery),
        "out": str(tmp_path / "model.pt"),
        "work_dir": str(root / "train-regions"),
        "epochs": 1,
        "batch_size": 16,
        "val_fraction": 0.2,
    }
    base.update(kw)
    return MitigateConfig(**base)


def test_caption_classes_match_whole_words_plurals_and_the_longest_name():
    classes = ["cat", "sea", "sea lion", "3", "bus"]
    captions = [
        "Two CATS on a mat",  # plural, case
        "a sea lion on the rocks",  # the longer name wins, no ambiguity with "sea"
        "the digit 3",
        "digit 13 and 3d",  # no whole-word 3
        "a cat near the sea",  # two classes
        "buses in town",  # plural -es
        "",
    ]
    labels, counts = caption_classes(captions, classes)
    assert labels.tolist() == [0, 2, 3, -1, -1, 4, -1]
    assert counts == {"matched": 4, "none": 2, "ambiguous": 1}


def test_every_method_trains_and_writes_a_loadable_checkpoint(setting, tmp_path):
    root, train_set, _ = setting
    rows = read_manifest(train_set)
    with_square = sum("square" in r.region_labels for r in rows)
    for method in METHODS:
        out = tmp_path / f"{method}.pt"
        result = run_mitigate(_cfg(setting, tmp_path, method=method, out=str(out)))
        assert out.exists() and not Path(str(out) + ".tmp").exists()
        blob = torch.load(out, weights_only=True)
        assert blob["method"] == method and blob["arch"] == "ravl-tiny-rn" and blob["epoch"] == result.best_epoch
        load_clip("ravl-tiny-rn", str(out))
        assert result.n_train + result.n_val == 60 and result.n_regions == 240
        # square cells, and only they, land on the square medoid (a random-init tower still separates red from grey)
        assert result.n_spurious_regions == with_square and result.images_with_feature == with_square
        assert result.captions == {"matched": 60, "none": 0, "ambiguous": 0}
        (entry,) = result.history
        assert all(np.isfinite(v) for v in entry.values())
        if method in ("standard", "upsampled"):
            assert entry["aux"] == 0 and entry["loss"] == pytest.approx(entry["clip"])
        else:
            assert entry["aux"] > 0
            assert entry["loss"] == pytest.approx(0.8 * entry["clip"] + 0.2 * entry["aux"], rel=1e-5)
        assert sum(g["n_images"] for g in result.groups) == result.n_train
    # the regions were embedded once and reused by every method (resume skipped the complete shards)
    assert json.loads((root / "train-regions" / "manifest.json").read_text())["complete"] is True


def test_cli_mitigate_prints_a_summary_and_fails_cleanly(setting, tmp_path):
    root, train_set, discovery = setting
    args = ["mitigate", "--train", str(train_set), "--discovery", str(discovery), "--epochs", "1", "--batch-size", "16"]
    out = tmp_path / "cli.pt"
    res = CliRunner().invoke(
        main, [*args, "--out", str(out), "--work-dir", str(root / "train-regions"), "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["method"] == "ravl" and summary["checkpoint"] == str(out) and out.exists()
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "x.pt"), "--method", "magic"])
    assert res.exit_code != 0 and "magic" in res.output
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "x.pt"), "--cluster", "2"])
    assert res.exit_code != 0 and "has 1 spurious cluster(s)" in res.output and not (tmp_path / "x.pt").exists()


def test_discovery_from_another_model_is_refused(setting, tmp_path):
    root, *_ = setting
    wrong_dim = _discovery(root / "run", tmp_path / "d32.json", dim=32)
    with pytest.raises(ConfigError, match="32-dim medoids but ravl-tiny-rn embeds in 64 dims"):
        run_mitigate(_cfg(setting, tmp_path, discovery=str(wrong_dim)))
    ckpt = tmp_path / "audited.pt"
    ckpt.write_bytes(b"not the audited weights")
    model = {"name": "ravl-tiny-rn", "pretrained": str(ckpt), "checkpoint_sha256": "0" * 64}
    other = _discovery(root / "run", tmp_path / "dsha.json", model=model)
    with pytest.raises(ConfigError, match="is not the model .* was computed with"):
        run_mitigate(_cfg(setting, tmp_path, discovery=str(other)))
    moved = _discovery(root / "run", tmp_path / "dmoved.json", model={**model, "pretrained": str(tmp_path / "gone.pt")})
    with pytest.raises(ConfigError, match="which is not there; pass --region-model"):
        run_mitigate(_cfg(setting, tmp_path, discovery=str(moved)))
    assert not (tmp_path / "model.pt").exists()


def test_empty_spurious_cluster_and_captions_without_classes(setting, tmp_path):
    root, train_set, _ = setting
    run = read_run(root / "run")
    away = -F.normalize(torch.from_numpy(run.data.region_emb).mean(0), dim=0)  # nearest to no region
    empty = _discovery(root / "run", tmp_path / "empty.json", spurious_medoid=away)
    with pytest.raises(ConfigError, match="falls in spurious cluster"):
        run_mitigate(_cfg(setting, tmp_path, discovery=str(empty)))
    text = re.sub(r"the digit \d", "a picture", Path(train_set).read_text())
    no_class = Path(train_set).with_name("no-class.csv")
    no_class.write_text(text)
    with pytest.raises(ConfigError, match="no caption .* names a class"):
        run_mitigate(_cfg(setting, tmp_path, train=str(no_class), work_dir=str(tmp_path / "w")))
    kw = {"train": str(no_class), "work_dir": str(tmp_path / "w"), "method": "standard"}
    result = run_mitigate(_cfg(setting, tmp_path, select="accuracy", **kw))
    assert result.captions["none"] == 60 and result.val_metric == "neg_clip_loss"
    # the default rule scores the audit set's pseudo-groups, which need no class in the fine-tuning captions
    assert run_mitigate(_cfg(setting, tmp_path, overwrite=True, **kw)).val_metric == "pseudo_group_worst_accuracy"


def test_outdated_or_empty_discovery_files(setting, tmp_path):
    good = json.loads(setting[2].read_text())

    def doc(name: str, **change):
        path = tmp_path / name
        path.write_text(json.dumps({**good, **change}))
        return path

    assert read_target(setting[2], [1]).spurious_ids == [0]
    old = tmp_path / "old.json"
    old.write_text(json.dumps({k: v for k, v in good.items() if k != "medoids"}))
    with pytest.raises(ConfigError, match="older ravl-engine"):
        read_target(old, [1])
    with pytest.raises(ConfigError, match="found no spurious cluster"):
        read_target(doc("none.json", clusters=[]), [1])
    with pytest.raises(ConfigError, match="--cluster 2 does not exist"):
        read_target(setting[2], [2])
    doubled = [[2 * v for v in m] for m in good["medoids"]]
    with pytest.raises(ConfigError, match="not unit vectors"):
        read_target(doc("bad.json", medoids=doubled), [1])
    with pytest.raises(ConfigError, match="not a readable"):
        read_target(tmp_path / "missing.json", [1])
    other = tmp_path / "manifest.json"
    other.write_text(json.dumps({"format_version": 1, "shards": []}))
    with pytest.raises(ConfigError, match="not a ravl-engine discovery.json"):
        read_target(other, [1])


def test_fused_step_keeps_the_image_path_and_batch_statistics():
    torch.manual_seed(0)
    visual = load_clip("ravl-tiny-rn").model.visual
    images = torch.randn(6, 3, 64, 64)
    boxes = [torch.tensor([[0.0, 0, 32, 32], [32, 32, 64, 64]])] * 6
    plain = load_clip("ravl-tiny-rn").model.visual
    plain.train()
    visual.train()
    want = plain(images)
    image_emb, region_emb = region_embed_train(visual, images, boxes)
    assert torch.allclose(image_emb, want, atol=1e-5)
    for a, b in zip(plain.modules(), visual.modules(), strict=True):
        if isinstance(a, torch.nn.BatchNorm2d):
            assert torch.allclose(a.running_mean, b.running_mean) and torch.allclose(a.running_var, b.running_var)
            assert b.training  # restored after the region pass
    # regions pass layer4 on running statistics: the same as the region path of a tower whose layer4 is in eval mode
    visual.layer4.eval()
    _, ref = region_embed(visual, images, boxes)
    assert torch.allclose(region_emb, ref, atol=1e-5)
    visual.train()
    weights = torch.randn(region_emb.shape[1])
    ((region_emb @ weights).square().sum() + (image_emb @ weights).square().sum()).backward()
    # (CLIP zero-initialises every bottleneck's last BatchNorm scale, so the residual branches get no gradient yet)
    assert visual.layer4[0].downsample[1].weight.grad.abs().sum() > 0 and visual.conv1.weight.grad.abs().sum() > 0


def test_group_dro_weights_move_to_the_worst_group():
    dro = _GroupDRO(3, step=0.5)
    losses = torch.tensor([0.1, 0.1, 2.0, 2.0])
    groups = torch.tensor([0, 0, 2, 2])
    for _ in range(5):
        out = dro(losses, groups)
    assert dro.q[2] > dro.q[0] > dro.q[1] > 0  # group 1 unseen: its weight is only renormalised
    assert dro.q.sum().item() == pytest.approx(1.0)
    assert out.item() == pytest.approx((dro.q[0] * 0.1 + dro.q[2] * 2.0).item(), rel=1e-6)


def test_config_rejects_bad_options(setting, tmp_path):
    for kw, match in (
        ({"method": "x"}, "--method"),
        ({"clip_weight": 1.5}, "--clip-weight"),
        ({"clusters": (0,)}, "--cluster"),
        ({"reduction": "max"}, "--reduction"),
        ({"select": "best"}, "--select"),
    ):
        with pytest.raises(ConfigError, match=match):
            _cfg(setting, tmp_path, **kw)


def test_a_work_dir_from_another_manifest_is_refused(setting, tmp_path):
    root, *_ = setting
    with pytest.raises(ConfigError, match="another manifest .* pass another --work-dir"):
        run_mitigate(_cfg(setting, tmp_path, work_dir=str(root / "run")))
    assert not (tmp_path / "model.pt").exists()
