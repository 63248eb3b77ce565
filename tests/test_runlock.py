"""One writer per run directory (a kernel-released file lock), text.h5 verified like a shard, resume by checkpoint
content rather than path spelling."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ravl_engine import ShardError
from ravl_engine.cli import main
from ravl_engine.cluster import ClusterConfig, run_cluster
from ravl_engine.config import DiscoverConfig
from ravl_engine.embed import EmbedConfig, run_embed
from ravl_engine.models import load_clip
from ravl_engine.runlock import LOCK_NAME, check_not_being_written, directory_lock
from ravl_engine.shards import read_run
from tests.conftest import write_digit_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_digit_dataset(tmp_path_factory.mktemp("digits"), n_images=20)


def _cfg(data, out, **kw):
    return EmbedConfig(data=str(data), out=str(out), shard_size=8, batch_size=4, **kw)


def _assert_same_run(a_dir: Path, b_dir: Path) -> None:
    a, b = read_run(a_dir), read_run(b_dir)
    assert a.data.ids == b.data.ids and a.classes == b.classes
    assert np.array_equal(a.text_emb, b.text_emb)
    for name in ("labels", "image_emb", "offsets", "boxes", "region_emb", "scores"):
        assert np.array_equal(getattr(a.data, name), getattr(b.data, name)), name


def _embed_pausing_after_first_shard(data: str, out: str, holding, go) -> None:
    """Child process: embed, and wait after the first committed shard until the parent says go."""

    def pause(_entry):
        if not holding.is_set():
            holding.set()
            go.wait(120)

    run_embed(_cfg(data, out), on_shard=pause)


@pytest.mark.slow  # two embed processes; the lock itself is tested below
def test_a_second_embed_on_the_same_directory_is_refused_and_the_first_finishes_intact(dataset, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    holding, go = ctx.Event(), ctx.Event()
    run_dir = tmp_path / "run"
    child = ctx.Process(target=_embed_pausing_after_first_shard, args=(str(dataset), str(run_dir), holding, go))
    child.start()
    try:
        assert holding.wait(120), "the first embed never committed a shard"
        res = CliRunner().invoke(
            main, ["embed", "--data", str(dataset), "--out", str(run_dir), "--shard-size", "8", "--no-progress"]
        )
        assert res.exit_code != 0
        message = res.output.strip()
        assert len(message.splitlines()) == 1, message
        assert str(run_dir) in message and f"pid {child.pid}" in message, message
        with pytest.raises(ShardError, match=f"still being written by embed \\(pid {child.pid}\\)"):
            run_cluster(ClusterConfig(run_dir=str(run_dir), out=str(tmp_path / "audit"), discover=DiscoverConfig(k=6)))
        assert not (tmp_path / "audit").exists()
    finally:
        go.set()
        child.join(120)
    assert child.exitcode == 0
    run_embed(_cfg(dataset, tmp_path / "solo"))
    _assert_same_run(tmp_path / "solo", run_dir)
    check_not_being_written(run_dir)  # released: cluster may read it now


def test_the_lock_is_released_on_exit_and_rejects_a_second_holder(tmp_path):
    with directory_lock(tmp_path / "d", command="embed"):
        assert (tmp_path / "d" / LOCK_NAME).read_text().strip() == str(os.getpid())
        # flock conflicts between two open descriptions even inside one process: a second writer is refused
        with pytest.raises(ShardError, match=f"d is being written by another process \\(pid {os.getpid()}\\)"):
            with directory_lock(tmp_path / "d", command="embed"):
                pass
        with pytest.raises(ShardError, match="still being written"):
            check_not_being_written(tmp_path / "d")
    with directory_lock(tmp_path / "d", command="embed"):  # the file stays, the lock does not
        pass
    check_not_being_written(tmp_path / "d")
    check_not_being_written(tmp_path / "never-locked")


def _flip_float(path: Path, dataset: str, value: float) -> None:
    with h5py.File(path, "r+") as fh:
        emb = fh[dataset][()]
        emb.flat[3] = value
        fh[dataset][...] = emb


def test_text_h5_is_verified_by_sha256_classes_and_dimension(dataset, tmp_path):
    run_dir = tmp_path / "run"
    run_embed(_cfg(dataset, run_dir))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["text"]["file"] == "text.h5" and len(manifest["text"]["sha256"]) == 64
    text = run_dir / "text.h5"
    pristine = text.read_bytes()

    _flip_float(text, "classes/emb", 7e37)  # the bit flip: a plausible float32, only the hash sees it
    with pytest.raises(ShardError, match=r"text\.h5: contents do not match manifest\.json \(sha256\)"):
        read_run(run_dir)
    res = CliRunner().invoke(main, ["cluster", str(run_dir), "--out", str(tmp_path / "o"), "--no-progress"])
    assert res.exit_code != 0 and "text.h5: contents do not match" in res.output
    assert not (tmp_path / "o" / "discovery.json").exists()
    resumed = run_embed(_cfg(dataset, run_dir))  # the advertised fix: rerun embed rebuilds it
    assert resumed.shards_written == 0
    assert np.isfinite(read_run(run_dir).text_emb).all()

    # a text.h5 whose hash is recorded but whose classes or shape disagree with the manifest (a hand-made file)
    import hashlib

    text.write_bytes(pristine)
    with h5py.File(text, "r+") as fh:
        del fh["classes/name"]
        fh["classes"].create_dataset("name", data=np.array(["1", "0", "2"], dtype=object), dtype=h5py.string_dtype())
    manifest["text"]["sha256"] = hashlib.sha256(text.read_bytes()).hexdigest()
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"classes \['1', '0', '2'\] but manifest\.json lists \['0', '1', '2'\]"):
        read_run(run_dir)
    text.write_bytes(pristine)
    with h5py.File(text, "r+") as fh:
        del fh["classes/emb"]
        fh["classes"].create_dataset("emb", data=np.zeros((3, 8), np.float32))
    manifest["text"]["sha256"] = hashlib.sha256(text.read_bytes()).hexdigest()
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"shape \[3, 8\], the run says \[3, 64\]"):
        read_run(run_dir)

    del manifest["text"]  # a run directory from before text.h5 was hashed
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="records no sha256 of text.h5"):
        read_run(run_dir)


def test_resume_recognises_the_checkpoint_by_content_under_any_path(dataset, tmp_path, monkeypatch):
    model_dir = tmp_path / "aud"
    model_dir.mkdir()
    loaded = load_clip("ravl-tiny-rn", init_seed=5)
    torch.save({"arch": "ravl-tiny-rn", "state_dict": loaded.model.state_dict()}, model_dir / "model.pt")
    monkeypatch.chdir(tmp_path)
    first = run_embed(_cfg(dataset, tmp_path / "run", pretrained="./aud/model.pt"))
    assert first.shards_written == 3
    again = run_embed(_cfg(dataset, tmp_path / "run", pretrained=str(model_dir / "model.pt")))
    assert (again.shards_written, again.shards_skipped) == (0, 3)
    monkeypatch.chdir(model_dir)
    again = run_embed(_cfg(dataset, tmp_path / "run", pretrained="model.pt"))
    assert (again.shards_written, again.shards_skipped) == (0, 3)

    other = load_clip("ravl-tiny-rn", init_seed=6)  # same path, other contents: still refused
    torch.save({"arch": "ravl-tiny-rn", "state_dict": other.model.state_dict()}, model_dir / "model.pt")
    with pytest.raises(ShardError, match="was written with model"):
        run_embed(_cfg(dataset, tmp_path / "run", pretrained="model.pt"))


def test_evaluate_work_resumes_with_the_checkpoint_under_another_path(dataset, tmp_path, monkeypatch):
    loaded = load_clip("ravl-tiny-rn", init_seed=5)
    torch.save({"arch": "ravl-tiny-rn", "state_dict": loaded.model.state_dict()}, tmp_path / "model.pt")
    work = tmp_path / "work"
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    args = ["evaluate", "--data", str(dataset), "--work", str(work)]
    res = runner.invoke(main, [*args, "--pretrained", "model.pt"])
    assert res.exit_code == 0, res.output
    stamps = {p.name: p.stat().st_mtime_ns for p in work.glob("shard-*.h5")}
    assert len(stamps) == 1  # the evaluate run dir uses the default shard size
    res = runner.invoke(main, [*args, "--pretrained", str(tmp_path / "model.pt")])
    assert res.exit_code == 0, res.output
    assert {p.name: p.stat().st_mtime_ns for p in work.glob("shard-*.h5")} == stamps  # resumed, not re-embedded
