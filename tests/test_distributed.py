"""Multi-process runs with the gloo backend on CPU: the same results as one process."""

from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ravl_engine.embed import EmbedConfig, run_embed
from ravl_engine.shards import read_run
from tests.conftest import write_digit_dataset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _embed_worker(rank: int, world: int, port: int, cfg: EmbedConfig, die_after_first_shard: int | None) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=20))

    def on_shard(_entry: dict) -> None:
        if rank == die_after_first_shard:
            os._exit(3)  # a rank killed mid-run: no clean-up of any kind

    try:
        run_embed(cfg, on_shard=on_shard)
    finally:
        dist.destroy_process_group()


def _launch(world: int, cfg: EmbedConfig, die_after_first_shard: int | None = None) -> list[int]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_embed_worker, args=(r, world, port, cfg, die_after_first_shard)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    return [p.exitcode for p in procs]


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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port())]
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
