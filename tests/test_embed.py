"""ravl-engine embed / cluster: run directories written, read back, resumed, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from ravl_engine import ConfigError, ShardError
from ravl_engine.cli import main
from ravl_engine.cluster import ClusterConfig, run_cluster
from ravl_engine.config import DiscoverConfig
from ravl_engine.embed import EmbedConfig, run_embed
from ravl_engine.shards import read_run
from tests.conftest import write_digit_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_digit_dataset(tmp_path_factory.mktemp("digits"), n_images=30)


def _cfg(data, out, **kw):
    return EmbedConfig(data=str(data), out=str(out), shard_size=8, batch_size=4, **kw)


def test_embed_writes_the_golden_schema(dataset, tmp_path):
    result = run_embed(_cfg(dataset, tmp_path / "run"))
    assert (result.n_images, result.n_regions, result.n_failed) == (30, 120, 0)
    assert result.shards_written == 4 and result.region_mode == "roi"
    run_dir = tmp_path / "run"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["complete"] is True
    assert manifest["model"]["name"] == "ravl-tiny-rn" and manifest["classes"] == ["0", "1", "2"]
    assert [s["file"] for s in manifest["shards"]] == [f"shard-{i:05d}.h5" for i in range(4)]
    assert not list(run_dir.glob("*.tmp"))
    with h5py.File(run_dir / "shard-00001.h5") as fh:
        assert dict(fh.attrs) == {"format_version": 1, "shard_index": 1, "first_image": 8}
        assert set(fh["images"]) == {"id", "label", "emb", "region_offset"}
        assert set(fh["regions"]) == {"box", "emb", "proposer_score", "label"}
        assert fh["images/emb"].shape == (8, 64) and fh["images/emb"].dtype == np.float32
        assert fh["images/label"].dtype == np.int64 and fh["images/region_offset"].shape == (9,)
        assert fh["regions/box"].shape == (32, 4) and fh["regions/box"].dtype == np.float32
        assert fh["regions/emb"].shape == (32, 64) and fh["regions/proposer_score"].shape == (32,)
        assert fh["images/id"][0].decode() == "img/0008.png"
        assert h5py.check_string_dtype(fh["regions/label"].dtype).encoding == "utf-8"
    run = read_run(run_dir)
    assert np.allclose(np.linalg.norm(run.data.region_emb, axis=1), 1.0, atol=1e-5)
    assert run.data.boxes[:4].tolist() == [[0, 0, 28, 28], [28, 0, 56, 28], [0, 28, 28, 56], [28, 28, 56, 56]]
    assert set(run.data.region_labels) <= {"0", "1", "2", "none", "square"} and "square" in run.data.region_labels
    assert run.text_emb.shape == (3, 64)


def test_interrupted_run_resumes_to_the_same_arrays(dataset, tmp_path):
    run_embed(_cfg(dataset, tmp_path / "a"))
    calls = []

    def stop_after_two(entry):
        calls.append(entry["file"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # what Ctrl-C does mid-run

    with pytest.raises(KeyboardInterrupt):
        run_embed(_cfg(dataset, tmp_path / "b"), on_shard=stop_after_two)
    partial = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert partial["complete"] is False and len(partial["shards"]) == 2
    with pytest.raises(ShardError, match="incomplete"):
        read_run(tmp_path / "b")
    (tmp_path / "b" / "shard-00002.h5.tmp").write_bytes(b"half-written junk")  # a crash mid-write
    resumed = run_embed(_cfg(dataset, tmp_path / "b"))
    assert resumed.shards_skipped == 2 and resumed.shards_written == 2
    a, b = read_run(tmp_path / "a").data, read_run(tmp_path / "b").data
    assert a.ids == b.ids
    for field in ("labels", "image_emb", "offsets", "boxes", "region_emb", "scores"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field


def test_bad_images_are_skipped_and_listed(dataset, tmp_path):
    folder = tmp_path / "data"
    manifest = write_digit_dataset(folder, n_images=6)
    (folder / "img" / "0002.png").write_bytes(b"not a png")
    (folder / "img" / "0004.png").unlink()
    result = run_embed(_cfg(manifest, tmp_path / "run"))
    assert result.n_failed == 2 and result.n_images == 4
    failures = [json.loads(line) for line in (tmp_path / "run" / "failures.jsonl").read_text().splitlines()]
    assert [f["image"] for f in failures] == ["img/0002.png", "img/0004.png"]
    assert read_run(tmp_path / "run").data.ids == ["img/0000.png", "img/0001.png", "img/0003.png", "img/0005.png"]


def test_boxes_outside_the_image_are_clipped_and_empty_ones_dropped(tmp_path):
    folder = tmp_path / "data"
    manifest = write_digit_dataset(folder, n_images=3)
    lines = manifest.read_text().splitlines()
    header, rows = lines[0], lines[1:]
    rows[0] = rows[0].replace("[[0, 0, 28, 28]", "[[-10, -10, 28, 28], [60, 60, 70, 70]")
    rows[0] = rows[0].replace('["', '["x", "', 1) if '"region_labels"' in header else rows[0]
    manifest.write_text("\n".join([header, *rows]) + "\n")
    # region labels no longer align with the boxes of row 1: drop that column for this test
    import csv

    with open(manifest, newline="") as fh:
        records = list(csv.DictReader(fh))
    for r in records:
        r.pop("region_labels")
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    result = run_embed(_cfg(manifest, tmp_path / "run", proposer="manifest"))
    assert result.clipped_boxes == 2 and result.dropped_boxes == 1
    run = read_run(tmp_path / "run")
    assert run.data.num_regions.tolist() == [4, 4, 4]
    assert run.data.boxes[0].tolist() == [0, 0, 28, 28]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda p: p.write_text("image,label\n"), "has no rows"),
        (lambda p: p.write_text("file,label\nimg/0000.png,0\n"), "missing column 'image'"),
        (lambda p: p.write_text("image,label\nimg/0000.png,7\n"), "label '7', which is not among the classes"),
        (lambda p: p.write_text('image,label,boxes\nimg/0000.png,0,"[[1,2,3]]"\n'), "needs 4 numbers"),
    ],
)
def test_bad_manifests_fail_before_any_work(dataset, tmp_path, mutate, match):
    bad = dataset.parent / f"bad-{abs(hash(match))}.csv"
    mutate(bad)
    with pytest.raises(ConfigError, match=match):
        run_embed(EmbedConfig(data=str(bad), out=str(tmp_path / "run"), classes=("0", "1", "2")))
    assert not (tmp_path / "run").exists()


def test_run_directory_from_another_model_or_format_is_refused(dataset, tmp_path):
    run_embed(_cfg(dataset, tmp_path / "run"))
    with pytest.raises(ShardError, match="was written with model"):
        run_embed(_cfg(dataset, tmp_path / "run", model="ravl-tiny-vit"))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="format 99, this engine reads format 1"):
        read_run(tmp_path / "run")


def test_cli_embed_then_cluster_writes_discovery_json(dataset, tmp_path):
    runner = CliRunner()
    run_dir, out = tmp_path / "run", tmp_path / "out"
    res = runner.invoke(
        main,
        [
            "embed",
            "--data",
            str(dataset),
            "--out",
            str(run_dir),
            "--shard-size",
            "16",
            "--no-progress",
            "--model",
            "ravl-tiny-vit",
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["n_images"] == 30 and summary["region_mode"] == "roi"
    res = runner.invoke(main, ["cluster", str(run_dir), "--out", str(out), "--no-progress", "--k", "6"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "discovery.json").read_text())
    assert doc["k"] == 6 and doc["classes"] == ["0", "1", "2"]
    # the random-init tower need not tie anything to a class: with no filter, the same writer lists all 6 clusters
    every = DiscoverConfig(k=6, influence_threshold=-math.inf, two_sign_rule=False)
    doc = run_cluster(ClusterConfig(run_dir=str(run_dir), out=str(tmp_path / "all"), discover=every)).document.to_dict()
    assert len(doc["clusters"]) == 6
    for rank, cluster in enumerate(doc["clusters"], start=1):
        assert cluster["rank"] == rank and cluster["class"] in doc["classes"]
        assert len(cluster["medoid"]) == 64
        sims = [r["similarity"] for r in cluster["regions"]]
        assert sims == sorted(sims, reverse=True)
        assert all(set(r) == {"image", "box", "similarity"} for r in cluster["regions"])
        assert set(cluster["table"][0]) == {"class", "acc_present", "n_present", "acc_absent", "n_absent"}
    res = runner.invoke(main, ["cluster", str(tmp_path / "nothing"), "--out", str(out), "--no-progress"])
    assert res.exit_code != 0 and "no manifest.json" in res.output


def test_cluster_refuses_unlabelled_runs(tmp_path):
    folder = tmp_path / "data"
    manifest = write_digit_dataset(folder, n_images=4)
    text = manifest.read_text().replace(",0,the digit", ",,the digit")
    manifest.write_text(text)
    run_embed(_cfg(manifest, tmp_path / "run", classes=("0", "1", "2")))
    with pytest.raises(ConfigError, match="have no label"):
        run_cluster(ClusterConfig(run_dir=str(tmp_path / "run"), out=str(tmp_path / "o"), discover=DiscoverConfig(k=2)))


def test_jsonl_manifest_and_crop_mode(tmp_path):
    manifest = write_digit_dataset(tmp_path / "data", n_images=5, fmt="jsonl")
    result = run_embed(
        _cfg(manifest, tmp_path / "run", region_mode="crop", proposer="grid", proposer_options={"rows": 1, "cols": 2})
    )
    assert result.region_mode == "crop" and result.n_regions == 10
    run = read_run(tmp_path / "run")
    assert Path(run.manifest["data"]["path"]).name == "manifest.jsonl"


def _embed_and_die_after_two_shards(data: str, out: str) -> None:
    """Child process: embed, and SIGKILL itself right after the second shard is committed."""
    import os
    import signal

    calls = []

    def die(entry):
        calls.append(entry)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    run_embed(_cfg(data, out), on_shard=die)


@pytest.mark.slow  # a subprocess killed mid-run; in-process resume is tested above
def test_a_killed_process_leaves_complete_shards_and_a_rerun_resumes(dataset, tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_embed_and_die_after_two_shards, args=(str(dataset), str(tmp_path / "killed")))
    child.start()
    child.join(120)
    assert child.exitcode == -9  # killed, not finished
    # the dead holder's lock file stays, with its pid inside, but the kernel released the lock: the rerun proceeds
    assert (tmp_path / "killed" / ".lock").read_text().strip() == str(child.pid)
    partial = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert partial["complete"] is False and [s["file"] for s in partial["shards"]] == [
        "shard-00000.h5",
        "shard-00001.h5",
    ]
    resumed = run_embed(_cfg(dataset, tmp_path / "killed"))
    assert (resumed.shards_skipped, resumed.shards_written) == (2, 2)
    run_embed(_cfg(dataset, tmp_path / "straight"))
    a, b = read_run(tmp_path / "straight").data, read_run(tmp_path / "killed").data
    assert a.ids == b.ids
    for field in ("labels", "image_emb", "offsets", "boxes", "region_emb", "scores"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field


def test_parquet_manifest(tmp_path):
    import pyarrow as pa  # a declared dependency: imported, never skipped
    import pyarrow.parquet as pq

    csv_manifest = write_digit_dataset(tmp_path, n_images=4)
    import csv

    with open(csv_manifest, newline="") as fh:
        records = list(csv.DictReader(fh))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "manifest.parquet")
    result = run_embed(_cfg(tmp_path / "manifest.parquet", tmp_path / "run"))
    assert result.n_images == 4 and result.n_regions == 16


def test_cli_embed_bad_input_is_one_line_and_nonzero(dataset, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("image,label\nimg/0000.png,7\n")
    res = CliRunner().invoke(
        main, ["embed", "--data", str(bad), "--out", str(tmp_path / "run"), "--classes", "0,1", "--no-progress"]
    )
    assert res.exit_code != 0
    assert "label '7', which is not among the classes (0, 1)" in res.output
    assert len([line for line in res.output.splitlines() if line.strip()]) == 1
    res = CliRunner().invoke(
        main, ["embed", "--data", str(dataset), "--out", str(tmp_path / "r2"), "--no-progress", "--proposer", "nope"]
    )
    assert res.exit_code != 0 and "unknown proposer 'nope'; choose one of" in res.output


def test_the_per_shard_worker_takes_injected_parts(dataset, tmp_path):
    """embed_shard is the reader / proposer / embedder / writer of one shard: an injected embedder's arrays land in
    the shard as given, with the proposer's boxes scaled to the input (56 px images fitted to the 64 px input)."""
    import torch

    from ravl_engine.embed import ShardJob, embed_shard
    from ravl_engine.manifest import read_manifest
    from ravl_engine.proposers import build_proposer
    from ravl_engine.shards import plan_shards, read_shard

    seen: list[tuple[torch.Tensor, list[torch.Tensor]]] = []

    def embedder(pixels, boxes):  # image i -> e_(i mod 4); region j of image i -> e_(4 + j)
        seen.append((pixels, list(boxes)))
        eye = torch.eye(8)
        img = eye[torch.arange(pixels.shape[0]) % 4]
        reg = torch.cat([eye[4 + torch.arange(b.shape[0])] for b in boxes])
        return img, reg

    rows = read_manifest(dataset)
    job = ShardJob(
        rows=rows,
        proposer=build_proposer("quadrants"),
        proposer_name="quadrants",
        embedder=embedder,
        dim=8,
        size=64,
        resize="squash",
        batch_size=3,
        num_workers=0,
        label_index={"0": 0, "1": 1, "2": 2},
    )
    spec = plan_shards(len(rows), 8)[1]  # images 8..15
    seconds: dict[str, float] = {}
    entry = embed_shard(job, spec, tmp_path / spec.name, seconds=seconds)
    assert entry["n_images"] == 8 and entry["n_regions"] == 32 and entry["failures"] == []
    assert set(seconds) == {"read", "propose", "embed", "write"}
    assert [p.shape[0] for p, _ in seen] == [3, 3, 2]  # the reader's batches
    assert all(p.dtype == torch.uint8 and p.shape[1:] == (3, 64, 64) for p, _ in seen)
    assert torch.allclose(seen[0][1][0][1], torch.tensor([32.0, 0.0, 64.0, 32.0]))  # 56 px quadrant -> 64 px input
    data = read_shard(tmp_path / spec.name)
    assert data.ids == [r.image for r in rows[8:16]]
    assert data.labels.tolist() == [int(r.label) for r in rows[8:16]]
    assert data.boxes[:4].tolist() == [[0, 0, 28, 28], [28, 0, 56, 28], [0, 28, 28, 56], [28, 28, 56, 56]]
    assert np.array_equal(data.image_emb.argmax(1), np.array([0, 1, 2, 0, 1, 2, 0, 1]))  # i mod 4 per batch of 3
    assert np.array_equal(data.region_emb.argmax(1), np.tile([4, 5, 6, 7], 8))
