"""Multi-process runs with the gloo backend on CPU: the same results as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ravl_engine.embed import EmbedConfig, run_embed
from ravl_engine.shards import read_run
from tests.conftest import write_digit_dataset
from tests.gloo import free_port, run_ranks


def _embed_worker(rank: int, world: int, cfg: EmbedConfig, die_after_first_shard: int | None) -> None:
    def on_shard(_entry: dict) -> None:
        if rank == die_after_first_shard:
            os._exit(3)  # a rank killed mid-run: no clean-up of any kind

    run_embed(cfg, on_shard=on_shard)


def _launch(world: int, cfg: EmbedConfig, die_after_first_shard: int | None = None) -> list[int]:
    # a short group timeout: the survivor of a killed rank gives up quickly
    return run_ranks(_embed_worker, cfg, die_after_first_shard, world=world, timeout=120, group_timeout=20)


def _arrays(run_dir: Path) -> dict:
    run = read_run(run_dir)
    d = run.data
    return {
        "ids": d.ids,
        "labels": d.labels,
        "image": d.image_emb,
        "offsets": d.offsets,
        "boxes": d.boxes,
        "regions": d.region_emb,
    }


def _same(a: dict, b: dict) -> None:
    assert a["ids"] == b["ids"]
    for key in ("labels", "offsets", "boxes"):
        assert np.array_equal(a[key], b[key]), key
    for key in ("image", "regions"):
        np.testing.assert_allclose(a[key], b[key], atol=1e-5)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_digit_dataset(tmp_path_factory.mktemp("digits"), n_images=36)


@pytest.mark.slow  # two gloo processes
def test_two_ranks_embed_the_same_arrays_as_one_process(dataset, tmp_path):
    single = tmp_path / "single"
    run_embed(EmbedConfig(data=str(dataset), out=str(single), shard_size=8, batch_size=4))
    multi = tmp_path / "multi"
    cfg = EmbedConfig(data=str(dataset), out=str(multi), shard_size=8, batch_size=4)
    assert _launch(2, cfg) == [0, 0]
    manifest = json.loads((multi / "manifest.json").read_text())
    assert manifest["complete"] and [s["file"] for s in manifest["shards"]] == [f"shard-{i:05d}.h5" for i in range(5)]
    assert manifest["counts"]["images"] == 36 and manifest["counts"]["regions"] == 144
    _same(_arrays(single), _arrays(multi))


@pytest.mark.slow  # two gloo processes, run twice
def test_a_rank_that_dies_leaves_complete_shards_and_a_rerun_resumes(dataset, tmp_path):
    reference = tmp_path / "ref"
    run_embed(EmbedConfig(data=str(dataset), out=str(reference), shard_size=8, batch_size=4))
    run_dir = tmp_path / "run"
    cfg = EmbedConfig(data=str(dataset), out=str(run_dir), shard_size=8, batch_size=4)
    codes = _launch(2, cfg, die_after_first_shard=1)
    assert codes[1] == 3 and codes[0] != 0  # the survivor cannot finish: its peer is gone
    manifest_path = run_dir / "manifest.json"
    assert not manifest_path.exists() or not json.loads(manifest_path.read_text())["complete"]
    done = sorted(p.name for p in run_dir.glob("shard-*.json"))
    assert "shard-00001.json" in done and not list(run_dir.glob("*.tmp"))
    result = run_embed(cfg)  # rerun, one process
    assert result.shards_skipped == len(done) and result.shards_written == 5 - len(done)
    _same(_arrays(reference), _arrays(run_dir))


@pytest.mark.slow
def test_torchrun_runs_the_embed_command(dataset, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    cmd += [
        "-m",
        "ravl_engine.cli",
        "embed",
        "--data",
        str(dataset),
        "--out",
        str(out),
        "--shard-size",
        "8",
        "--no-progress",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    assert summary["world_size"] == 2 and summary["n_images"] == 36 and summary["n_regions"] == 144


def _cluster_worker(rank: int, world: int, run_dir: str, out: str) -> None:
    from ravl_engine.cluster import ClusterConfig, run_cluster

    result = run_cluster(ClusterConfig(run_dir=run_dir, out=out, report=False))
    Path(out, f"rank{rank}.json").write_text(json.dumps(result.document.to_dict()))


def _ranked(doc: dict) -> list:
    return [
        (c["rank"], c["cluster_id"], c["class"], [(r["image"], r["box"]) for r in c["regions"]])
        for c in doc["clusters"]
    ]


@pytest.mark.slow
def test_two_ranks_discover_what_one_process_does(dataset, tmp_path):
    from ravl_engine.cluster import ClusterConfig, run_cluster
    from ravl_engine.config import DiscoverConfig

    run_dir = tmp_path / "run"
    run_embed(EmbedConfig(data=str(dataset), out=str(run_dir), shard_size=8, batch_size=4))
    single = run_cluster(ClusterConfig(run_dir=str(run_dir), out=str(tmp_path / "one"), report=False))
    single = single.document.to_dict()
    sharded = run_cluster(
        ClusterConfig(
            run_dir=str(run_dir),
            out=str(tmp_path / "one-sharded"),
            report=False,
            discover=DiscoverConfig(strategy="sharded"),
        )
    ).document.to_dict()
    out = tmp_path / "two"
    assert run_ranks(_cluster_worker, str(run_dir), str(out)) == [0, 0]
    docs = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    written = json.loads((out / "discovery.json").read_text())
    for doc in (sharded, *docs, written):
        assert doc["k"] == single["k"] and _ranked(doc) == _ranked(single)
        np.testing.assert_allclose(doc["medoids"], single["medoids"], atol=1e-6)
        for a, b in zip(doc["clusters"], single["clusters"], strict=True):
            assert a["gap"] == pytest.approx(b["gap"]) and a["influence"] == pytest.approx(b["influence"])


def _discover_worker(rank: int, world: int, split: list[int], path: str) -> None:
    import torch

    from ravl_engine.config import DiscoverConfig
    from ravl_engine.discover import run_discover
    from ravl_engine.distributed import TorchComm
    from ravl_engine.planted import planted_embeddings

    ps = planted_embeddings(1200, dim=32, num_classes=4, seed=3)
    start = sum(split[:rank])
    result = run_discover(
        DiscoverConfig(),
        ps.region_embeddings[start : start + split[rank]],
        ps.num_regions,
        ps.image_labels,
        ps.image_scores,
        ps.region_scores,
        seed=1,
        comm=TorchComm(),
    )
    torch.save(result, f"{path}.{rank}")


@pytest.mark.slow  # two gloo processes; tests/test_sharded.py keeps a fast two-rank case
@pytest.mark.parametrize("split", [[600, 600], [1001, 199]])
def test_two_ranks_rank_the_same_clusters_as_one_process(tmp_path, split):
    import torch

    from ravl_engine.config import DiscoverConfig
    from ravl_engine.discover import run_discover
    from ravl_engine.planted import planted_embeddings

    ps = planted_embeddings(1200, dim=32, num_classes=4, seed=3)
    args = (ps.region_embeddings, ps.num_regions, ps.image_labels, ps.image_scores, ps.region_scores)
    want = run_discover(DiscoverConfig(), *args, seed=1)
    one = run_discover(DiscoverConfig(strategy="sharded"), *args, seed=1)
    assert want.clusters, "the planted set should give at least one cluster"
    path = str(tmp_path / "result")
    assert run_ranks(_discover_worker, split, path) == [0, 0]
    for got in (one, *(torch.load(f"{path}.{r}", weights_only=False) for r in range(2))):
        assert got.k == want.k and np.array_equal(got.medoids, want.medoids)
        assert np.array_equal(got.assignments, want.assignments)
        assert [c.cluster_id for c in got.clusters] == [c.cluster_id for c in want.clusters]
        for a, b in zip(got.clusters, want.clusters, strict=True):
            assert np.array_equal(a.region_indices, b.region_indices) and a.class_index == b.class_index
            assert a.gap == pytest.approx(b.gap) and a.influence == pytest.approx(b.influence)
        np.testing.assert_allclose(got.medoid_embeddings, want.medoid_embeddings, atol=1e-6)


def _bad_rows_worker(rank: int, world: int, path: str) -> None:
    from ravl_engine.config import DiscoverConfig
    from ravl_engine.discover import run_discover
    from ravl_engine.distributed import TorchComm
    from ravl_engine.errors import ConfigError
    from ravl_engine.planted import planted_embeddings

    ps = planted_embeddings(400, dim=16, num_classes=2, seed=0)
    x = ps.region_embeddings.copy()
    x[250] = np.nan  # on rank 1 (rows 200..399)
    mine = x[rank * 200 : (rank + 1) * 200]
    try:
        run_discover(
            DiscoverConfig(),
            mine,
            ps.num_regions,
            ps.image_labels,
            ps.image_scores,
            ps.region_scores,
            comm=TorchComm(),
        )
    except ConfigError as err:
        Path(f"{path}.{rank}").write_text(str(err))


@pytest.mark.slow  # two gloo processes
def test_bad_rows_on_one_rank_stop_every_rank(tmp_path):
    path = str(tmp_path / "error")
    assert run_ranks(_bad_rows_worker, path) == [0, 0]
    assert "row 250 contains NaN" in Path(f"{path}.1").read_text()
    assert "another rank found bad rows" in Path(f"{path}.0").read_text()


def _fixed_batch(loaded, n: int = 8):
    import torch

    from ravl_engine.mitigate import StepBatch

    g = torch.Generator().manual_seed(0)
    size = loaded.image_size
    half = size / 2
    quads = torch.tensor([[0, 0, half, half], [half, 0, size, half], [0, half, half, size], [half, half, size, size]])
    labels = torch.tensor([0, 1, 2, 0, 1, 2, -1, 1])[:n]
    spurious = torch.zeros(n, 4, dtype=torch.bool)
    spurious[::3, 2] = True
    return StepBatch(
        images=torch.randn(n, 3, size, size, generator=g),
        tokens=loaded.tokenizer([f"the digit {max(int(y), 0)}" for y in labels]),
        labels=labels,
        groups=torch.where(labels >= 0, 2 * labels, 6) + spurious.any(1).long(),
        boxes=[quads[: 2 + i % 3].clone() for i in range(n)],  # 2 to 4 regions per image
        spurious=torch.cat([spurious[i, : 2 + i % 3] for i in range(n)]),
    )


def _slice(batch, start: int, stop: int):
    from ravl_engine.mitigate import StepBatch

    assert batch.boxes is not None and batch.spurious is not None
    counts = [b.shape[0] for b in batch.boxes]
    a, b = sum(counts[:start]), sum(counts[:stop])
    return StepBatch(
        images=batch.images[start:stop],
        tokens=batch.tokens[start:stop],
        labels=batch.labels[start:stop],
        groups=batch.groups[start:stop],
        boxes=batch.boxes[start:stop],
        spurious=batch.spurious[a:b],
    )


def _one_step(method: str, rank: int, world: int):
    import torch

    from ravl_engine.distributed import wrap_ddp
    from ravl_engine.finetune import make_optimizer
    from ravl_engine.mitigate import MitigateConfig, _class_embeddings, _GroupDRO, mitigation_loss
    from ravl_engine.models import load_clip
    from ravl_engine.training import ClipWithRegions

    loaded = load_clip("ravl-tiny-vit", init_seed=0)
    model = loaded.model
    batch = _fixed_batch(loaded)
    templates = ["the digit {}", "{}"]
    with torch.no_grad():
        class_emb = _class_embeddings(model, loaded.tokenizer([t.format(c) for c in range(3) for t in templates]), 3)
    make_optimizer(model, lr=1e-3, weight_decay=0.1, freeze_text=True)  # freezes the text tower
    # the paper's terms: the image term's pairs are built per rank (documented), so only these equal one process
    cfg = MitigateConfig(train="-", discovery="-", out="-", method=method, image_term="none")
    towers = wrap_ddp(ClipWithRegions(model), "cpu")
    part = _slice(batch, rank * 8 // world, (rank + 1) * 8 // world)
    model.train()
    loss, _, _ = mitigation_loss(model, part, class_emb, cfg, gdro=_GroupDRO(8, 0.5), towers=towers)
    loss.backward()  # under DDP the gradients arrive averaged over the ranks
    return float(loss.detach()), model.visual.proj.grad.clone(), model.visual.conv1.weight.grad.clone()


def _step_worker(rank: int, world: int, method: str, path: str) -> None:
    import torch

    torch.save(_one_step(method, rank, world), f"{path}.{rank}")


@pytest.mark.slow  # two gloo processes per method
@pytest.mark.parametrize(
    "method",
    ["ravl", "vl-gdro", "standard"],
)
def test_a_ddp_step_equals_one_process_on_the_global_batch(tmp_path, method):
    import torch

    want = _one_step(method, 0, 1)
    path = str(tmp_path / "step")
    assert run_ranks(_step_worker, method, path) == [0, 0]
    for r in range(2):
        loss, proj, conv = torch.load(f"{path}.{r}")
        assert loss == pytest.approx(want[0], rel=1e-5) and want[1].abs().sum() > 0
        torch.testing.assert_close(proj, want[1], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(conv, want[2], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_torchrun_runs_cluster_and_mitigate(tmp_path):
    from tests.test_mitigate import _discovery

    audit = write_digit_dataset(tmp_path / "audit", n_images=24, seed=0)
    train = write_digit_dataset(tmp_path / "train", n_images=40, seed=1)
    run_embed(EmbedConfig(data=str(audit), out=str(tmp_path / "run"), proposer="manifest"))
    discovery = _discovery(tmp_path / "run", tmp_path / "discovery.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cluster = [*launch, "--master-port", str(free_port()), "-m", "ravl_engine.cli", "cluster", str(tmp_path / "run")]
    res = subprocess.run(
        [*cluster, "--out", str(tmp_path / "audit-out"), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["k"] >= 6 and (tmp_path / "audit-out" / "discovery.json").exists()
    mitigate = [*launch, "--master-port", str(free_port()), "-m", "ravl_engine.cli", "mitigate", "--train", str(train)]
    mitigate += ["--discovery", str(discovery), "--out", str(tmp_path / "m.pt"), "--epochs", "1", "--batch-size", "16"]
    res = subprocess.run([*mitigate, "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    assert summary["world_size"] == 2 and summary["method"] == "ravl" and (tmp_path / "m.pt").exists()
    assert summary["image_term"] == "counterfactual"  # ravl's default, each rank on its own pairs
    finetune = [*launch, "--master-port", str(free_port()), "-m", "ravl_engine.cli", "finetune", "--train", str(train)]
    finetune += ["--out", str(tmp_path / "f.pt"), "--epochs", "1", "--batch-size", "16", "--no-progress"]
    res = subprocess.run(finetune, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["world_size"] == 2 and (tmp_path / "f.pt").exists()
