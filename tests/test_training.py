"""The one training loop: finetune == mitigate --method standard, the audit's region mode in the training step, and
the pseudo-group selection rule that reads no ground-truth feature labels."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ravl_engine import ConfigError
from ravl_engine.embed import EmbedConfig, run_embed
from ravl_engine.finetune import FinetuneConfig, run_finetune
from ravl_engine.kernels.roi import region_embed
from ravl_engine.manifest import read_manifest
from ravl_engine.mitigate import MitigateConfig, run_mitigate
from ravl_engine.mitigate_prep import read_target
from ravl_engine.selection import (
    group_accuracy,
    in_selection_half,
    pseudo_group_set,
    split_halves,
    worst_group_accuracy,
)
from ravl_engine.shards import read_run
from ravl_engine.training import LoopConfig, balanced_sampler, shuffle_sampler, train_loop
from tests.conftest import write_digit_dataset
from tests.test_mitigate import _discovery


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    audit_set = write_digit_dataset(root / "audit", n_images=40, seed=0)
    train_set = write_digit_dataset(root / "train", n_images=60, seed=1)
    return root, audit_set, train_set


def _audited(root: Path, audit_set: Path, name: str, **embed) -> Path:
    """Embed the audit set and write a discovery.json whose top cluster (the squares) lists the audit images that
    have a square region (what cluster writes: the cluster's regions with their image ids)."""
    run_dir = root / f"run-{name}"
    if not run_dir.exists():
        run_embed(EmbedConfig(data=str(audit_set), out=str(run_dir), proposer="manifest", **embed))
    path = _discovery(run_dir, root / f"discovery-{name}.json")
    run = read_run(run_dir)
    labels = np.array(run.data.region_labels)
    owner = np.repeat(np.arange(len(run.data.ids)), run.data.num_regions)
    with_square = sorted({run.data.ids[i] for i in owner[labels == "square"]})
    doc = json.loads(path.read_text())
    doc["clusters"][0]["regions"] = [{"image": i, "box": [0, 0, 28, 28], "similarity": 1.0} for i in with_square]
    path.write_text(json.dumps(doc))
    return path


def test_mitigate_standard_trains_what_finetune_trains(sets, tmp_path):
    root, audit_set, train_set = sets
    discovery = _audited(root, audit_set, "rn")
    common = {"epochs": 3, "batch_size": 16, "patience": 3, "seed": 3, "val_fraction": 0.2}
    ft = run_finetune(FinetuneConfig(train=str(train_set), out=str(tmp_path / "ft.pt"), **common))
    mt = run_mitigate(
        MitigateConfig(
            train=str(train_set),
            discovery=str(discovery),
            out=str(tmp_path / "mt.pt"),
            work_dir=str(tmp_path / "regions"),
            method="standard",
            select="accuracy",
            **common,
        )
    )
    assert ft.val_metric == mt.val_metric == "zero_shot_accuracy"
    assert (ft.n_train, ft.n_val) == (mt.n_train, mt.n_val)
    assert mt.best_epoch == ft.best_epoch
    assert len(mt.history) == len(ft.history) == 3
    for a, b in zip(ft.history, mt.history, strict=True):
        assert a.keys() == b.keys()
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    ft_state = torch.load(tmp_path / "ft.pt", weights_only=True)["state_dict"]
    mt_state = torch.load(tmp_path / "mt.pt", weights_only=True)["state_dict"]
    assert ft_state.keys() == mt_state.keys()
    for key, value in ft_state.items():
        assert torch.allclose(value.float(), mt_state[key].float(), rtol=1e-4, atol=1e-5), key


def test_the_loop_draws_every_epoch_from_one_generator():
    # two epochs of the loop see the orders of one generator seeded once, not of one reseeded per epoch
    model = torch.nn.Linear(2, 2)
    model.logit_scale = torch.nn.Parameter(torch.zeros(()))
    seen: list[list[int]] = []

    def loss_fn(idx):
        seen.append(idx.tolist())
        loss = model.weight.sum() * 0
        return loss, loss, loss

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    train_loop(model, optimizer, torch.arange(10, 20), loss_fn, LoopConfig(epochs=2, batch_size=10, patience=2, seed=5))
    g = torch.Generator().manual_seed(5)
    expected = [(10 + torch.randperm(10, generator=g)).tolist() for _ in range(2)]
    assert seen == expected and seen[0] != seen[1]
    # the balanced sampler draws each group about equally often from a 9:1 set
    groups = torch.tensor([0] * 90 + [1] * 10)
    draws = balanced_sampler(groups)(torch.arange(100), torch.Generator().manual_seed(0))
    assert draws.numel() == 100 and 30 < int((groups[draws] == 1).sum()) < 70
    assert sorted(shuffle_sampler(torch.arange(7), torch.Generator()).tolist()) == list(range(7))


def _first_step_regions(monkeypatch, cfg: MitigateConfig):
    """Run one ravl epoch; return (training-set indices, region embeddings) of the first training step."""
    import ravl_engine.mitigate_methods as methods
    from ravl_engine.training import ClipWithRegions

    calls: list = []
    boxes_of = methods.batch_boxes
    forward = ClipWithRegions.forward

    def record_boxes(ts, idx):
        calls.append(["idx", idx.clone()])
        return boxes_of(ts, idx)

    def record_forward(self, images, tokens, boxes):
        out = forward(self, images, tokens, boxes)
        if boxes is not None:
            calls.append(["regions", out[1].detach().clone(), self.model.visual.training])
        return out

    monkeypatch.setattr(methods, "batch_boxes", record_boxes)
    monkeypatch.setattr(ClipWithRegions, "forward", record_forward)
    result = run_mitigate(cfg)
    assert calls[0][0] == "idx" and calls[1][0] == "regions" and calls[1][2] is True  # a training-mode step
    return result, calls[0][1], calls[1][1]


@pytest.mark.parametrize(("model", "mode"), [("ravl-tiny-rn", "crop"), ("ravl-tiny-vit", "roi-mean")])
def test_the_training_step_embeds_regions_in_the_audits_mode(sets, tmp_path, monkeypatch, model, mode):
    root, audit_set, train_set = sets
    discovery = _audited(root, audit_set, mode, model=model, region_mode=mode)
    work = tmp_path / "regions"
    cfg = MitigateConfig(
        train=str(train_set),
        discovery=str(discovery),
        out=str(tmp_path / "m.pt"),
        work_dir=str(work),
        method="ravl",
        select="last",
        epochs=1,
        batch_size=16,
    )
    result, idx, trained = _first_step_regions(monkeypatch, cfg)
    assert result.region_mode == mode
    # preparation's embeddings of the same boxes (the audited model = the starting weights: same init, no checkpoint)
    data = read_run(work).data
    assert read_run(work).manifest["region_mode"] == mode
    rows = torch.cat([torch.arange(data.offsets[i], data.offsets[i + 1]) for i in idx.tolist()])
    prepared = torch.from_numpy(data.region_emb)[rows]
    assert trained.shape == prepared.shape
    assert torch.allclose(F.normalize(trained.float(), dim=-1), prepared, atol=1e-4)
    # and the test can tell the modes apart: the roi mode of the same boxes gives other embeddings
    from ravl_engine.finetune import load_images
    from ravl_engine.images import boxes_to_input
    from ravl_engine.models import load_clip

    loaded = load_clip(model)
    rows_by_id = {r.image: r for r in read_manifest(train_set)}
    ids = [data.ids[i] for i in idx.tolist()]
    images, placements = load_images([rows_by_id[i].path for i in ids], size=loaded.image_size, **_norm(loaded))
    boxes = [
        boxes_to_input(
            torch.from_numpy(data.boxes[data.offsets[i] : data.offsets[i + 1]]),
            placements[n : n + 1].expand(int(data.num_regions[i]), 4),
        ).float()
        for n, i in enumerate(idx.tolist())
    ]
    with torch.no_grad():
        other = "roi" if mode == "crop" else "crop"
        _, roi = region_embed(loaded.model.visual.eval(), images, boxes, mode=other)
    same = (F.normalize(trained.float(), dim=-1) - prepared).abs().max()
    different = (F.normalize(roi.float(), dim=-1) - prepared).abs().max()
    assert different > 1e-3 and different > 20 * same, (float(same), float(different))


def _norm(loaded):
    return {"mean": loaded.mean, "std": loaded.std}


def _rewrite(src: Path, dst: Path, change) -> Path:
    with src.open(newline="") as f:
        rows = list(csv.DictReader(f))
    rows = change(rows)
    with dst.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return dst


def test_pseudo_group_selection_reads_no_feature_labels(sets, tmp_path):
    root, audit_set, train_set = sets
    discovery = _audited(root, audit_set, "rn")
    disc = read_target(discovery, (1,))
    assert disc.spurious_images  # the cluster lists audit images
    audit_set = Path(audit_set)
    rng = random.Random(0)

    def shuffled(rows):
        labels = [r["region_labels"] for r in rows]
        rng.shuffle(labels)
        return [{**r, "region_labels": lab} for r, lab in zip(rows, labels, strict=True)]

    variants = {
        "as-is": audit_set,
        "shuffled": _rewrite(audit_set, audit_set.with_name("shuffled.csv"), shuffled),
        "removed": _rewrite(
            audit_set, audit_set.with_name("removed.csv"), lambda rows: [r | {"region_labels": ""} for r in rows]
        ),
    }
    variants["dropped"] = _rewrite(
        audit_set,
        audit_set.with_name("dropped.csv"),
        lambda rows: [{k: v for k, v in r.items() if k != "region_labels"} for r in rows],
    )
    results, states = {}, {}
    for name, path in variants.items():
        out = tmp_path / f"{name}.pt"
        results[name] = run_mitigate(
            MitigateConfig(
                train=str(train_set),
                discovery=str(discovery),
                out=str(out),
                work_dir=str(root / "leak-regions"),
                method="upsampled",
                audit_data=str(path),
                epochs=3,
                batch_size=16,
            )
        )
        states[name] = torch.load(out, weights_only=True)["state_dict"]
    base = results["as-is"]
    assert base.val_metric == "pseudo_group_worst_accuracy" and base.select == "pseudo-group"
    rows = read_manifest(audit_set)
    select, test = split_halves(rows)
    assert base.n_select == len(select) > 0 and len(test) > 0 and len(select) + len(test) == len(rows)
    for name, res in results.items():
        assert res.best_epoch == base.best_epoch, name
        assert [h["pseudo_group_worst_accuracy"] for h in res.history] == [
            h["pseudo_group_worst_accuracy"] for h in base.history
        ], name
        assert all(torch.equal(states[name][k], states["as-is"][k]) for k in states[name]), name
    # the pseudo-groups come from the discovery's cluster: both flags occur, and they follow its image list
    loaded_kw = {"size": 56, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    pg = pseudo_group_set(audit_set, disc.classes, disc.spurious_images, **loaded_kw)
    flags = [r.image in disc.spurious_images for r in select]
    assert (pg.groups % 2).tolist() == [int(f) for f in flags] and 0 < sum(flags) < len(flags)


def test_the_split_is_a_seeded_hash_of_the_image_id(sets):
    _, audit_set, _ = sets
    rows = read_manifest(audit_set)
    select, test = split_halves(rows, seed=0)
    assert {r.image for r in select} == {r.image for r in rows if in_selection_half(r.image, 0)}
    assert {r.image for r in select}.isdisjoint(r.image for r in test)
    # another seed, another split; the same seed, the same split whatever the row order
    assert {r.image for r in split_halves(rows, seed=1)[0]} != {r.image for r in select}
    assert {r.image for r in split_halves(rows[::-1], seed=0)[0]} == {r.image for r in select}


def test_pseudo_group_selection_needs_the_audit_images(sets, tmp_path):
    root, audit_set, train_set = sets
    discovery = _audited(root, audit_set, "rn")
    doc = json.loads(discovery.read_text())
    doc["audit"]["run_dir_data"] = str(tmp_path / "moved.csv")
    moved = tmp_path / "discovery.json"
    moved.write_text(json.dumps(doc))
    cfg = MitigateConfig(train=str(train_set), discovery=str(moved), out=str(tmp_path / "m.pt"), epochs=1)
    with pytest.raises(ConfigError, match="--audit-data"):
        run_mitigate(cfg)


def test_any_method_can_take_either_sampler():
    from ravl_engine.mitigate_methods import method_sampler, resolved_sampler

    groups = torch.tensor([0] * 90 + [1] * 10)
    assert [resolved_sampler(m) for m in ("ravl", "standard", "upsampled", "vl-erm", "vl-gdro")] == [
        "shuffle",
        "shuffle",
        "balanced",
        "balanced",
        "balanced",
    ]
    assert resolved_sampler("ravl", "balanced") == "balanced" and resolved_sampler("upsampled", "shuffle") == "shuffle"
    idx = torch.arange(100)
    ravl_balanced = method_sampler("ravl", groups, "balanced")(idx, torch.Generator().manual_seed(0))
    assert 30 < int((groups[ravl_balanced] == 1).sum()) < 70  # the rare group drawn about half the time
    ravl_own = method_sampler("ravl", groups)(idx, torch.Generator().manual_seed(0))
    assert sorted(ravl_own.tolist()) == list(range(100))  # a permutation: the rare group 10 times
    with pytest.raises(ConfigError, match="--sampler"):
        MitigateConfig(train="t.csv", discovery="d.json", out="o.pt", sampler="upsampled")


@pytest.mark.parametrize("keep_start", [True, False])
def test_the_start_competes_only_when_asked(keep_start):
    # the validation value falls with training: the start is best; without keep_start a trained epoch is kept
    model = torch.nn.Linear(2, 2)
    model.logit_scale = torch.nn.Parameter(torch.zeros(()))
    values = iter([0.9, 0.5, 0.7, 0.6])

    def loss_fn(idx):
        loss = model.weight.sum() * 0
        return loss, loss, loss

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    cfg = LoopConfig(epochs=3, batch_size=4, patience=3, keep_start=keep_start)
    result = train_loop(model, optimizer, torch.arange(8), loss_fn, cfg, validate=lambda: next(values))
    assert result.extra["start_val"] == 0.9
    assert (result.best_epoch, result.best_val) == ((0, 0.9) if keep_start else (2, 0.7))


@pytest.mark.parametrize("keep_start", [True, False])
def test_equal_worst_groups_are_decided_by_the_mean(keep_start):
    # from scratch every epoch can have a group at 0: the earliest must not win by default
    model = torch.nn.Linear(2, 2)
    model.logit_scale = torch.nn.Parameter(torch.zeros(()))
    values = iter([(0.0, 0.1), (0.0, 0.2), (0.0, 0.6), (0.0, 0.4), (0.5, 0.5)][: 4 if keep_start else 5])

    def loss_fn(idx):
        loss = model.weight.sum() * 0
        return loss, loss, loss

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    epochs = 3 if keep_start else 4
    cfg = LoopConfig(epochs=epochs, batch_size=4, patience=5, keep_start=keep_start, metric="w", tiebreak="m")
    result = train_loop(model, optimizer, torch.arange(8), loss_fn, cfg, validate=lambda: next(values))
    assert result.best_epoch == (2 if keep_start else 4)
    assert [(h["w"], h["m"]) for h in result.history][:3] == [(0.0, 0.2), (0.0, 0.6), (0.0, 0.4)]
    assert result.extra["start_val"] == 0.0


def test_group_accuracy_is_the_worst_and_the_mean_of_the_groups_present():
    correct = torch.tensor([1, 0, 1, 1, 0, 0, 1])
    groups = torch.tensor([0, 0, 1, 1, 3, 3, 3])  # group 2 empty: not counted
    worst, mean = group_accuracy(correct, groups, 4)
    assert worst == pytest.approx(1 / 3) and mean == pytest.approx((1 / 2 + 1 + 1 / 3) / 3)
    assert worst_group_accuracy(correct, groups, 4) == worst


@pytest.mark.parametrize("freeze_bn", [False, True])
def test_frozen_batchnorm_keeps_its_statistics_and_weights(freeze_bn):
    # a conv + BatchNorm net trained on shifted inputs: BatchNorm moves unless frozen, the conv trains either way
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten())
    model.logit_scale = torch.nn.Parameter(torch.zeros(()))
    data = torch.randn(16, 3, 6, 6) * 3 + 2
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def loss_fn(idx):
        loss = model(data[idx]).pow(2).mean()
        return loss, loss, loss * 0

    optimizer = torch.optim.SGD([p for p in model.parameters()], lr=0.1)
    cfg = LoopConfig(epochs=2, batch_size=8, patience=2, freeze_bn=freeze_bn)
    train_loop(model, optimizer, torch.arange(16), loss_fn, cfg)
    after = model.state_dict()
    assert not torch.equal(after["0.weight"], before["0.weight"])
    norm_keys = ("1.weight", "1.bias", "1.running_mean", "1.running_var")
    assert all(torch.equal(after[k], before[k]) for k in norm_keys) == freeze_bn
