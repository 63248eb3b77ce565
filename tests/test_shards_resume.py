"""The shard plan of a run directory, and a resume that finds a shard whose sha256 no longer matches."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ravl_engine.embed import EmbedConfig, run_embed
from ravl_engine.shards import plan_shards, read_run
from tests.conftest import write_digit_dataset


@given(n=st.integers(0, 300), size=st.integers(1, 64))
def test_plan_shards_covers_every_image_once_in_order(n, size):
    plan = plan_shards(n, size)
    chunks = [list(range(n))[i : i + size] for i in range(0, n, size)]  # the plain slicing it must equal
    assert [list(range(s.start, s.stop)) for s in plan] == chunks
    assert [s.index for s in plan] == list(range(len(plan)))
    assert [s.name for s in plan] == [f"shard-{i:05d}.h5" for i in range(len(plan))]
    assert all(s.stop - s.start == size for s in plan[:-1])


def test_plan_shards_edges():
    assert plan_shards(0, 5) == []
    (only,) = plan_shards(3, 100)
    assert (only.start, only.stop) == (0, 3)
    with pytest.raises(ValueError, match="shard_size must be >= 1"):
        plan_shards(10, 0)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("damage", ["bytes", "deleted"])
def test_a_shard_whose_sha256_does_not_match_is_rebuilt(tmp_path, damage):
    data = write_digit_dataset(tmp_path / "d", n_images=12)
    run_dir = tmp_path / "run"
    cfg = EmbedConfig(data=str(data), out=str(run_dir), shard_size=4, batch_size=4, proposer="manifest")
    first = run_embed(cfg)
    assert (first.shards_written, first.shards_skipped) == (3, 0)
    before = read_run(run_dir).data
    recorded = {s["file"]: s["sha256"] for s in json.loads((run_dir / "manifest.json").read_text())["shards"]}
    intact = {name: _sha(run_dir / name) for name in recorded}
    assert intact == recorded

    damaged = run_dir / "shard-00001.h5"
    if damage == "bytes":
        blob = bytearray(damaged.read_bytes())
        blob[len(blob) // 2] ^= 0xFF  # one flipped byte: the file may still open, its sha256 differs
        damaged.write_bytes(bytes(blob))
        assert _sha(damaged) != recorded[damaged.name]
    else:
        damaged.unlink()
    again = run_embed(cfg)
    assert (again.shards_written, again.shards_skipped) == (1, 2)  # only the damaged shard is embedded again
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["complete"] is True
    now = {s["file"]: s["sha256"] for s in manifest["shards"]}
    assert now == {name: _sha(run_dir / name) for name in now}  # the manifest records the files on disk
    assert {k: v for k, v in now.items() if k != damaged.name} == {
        k: v for k, v in recorded.items() if k != damaged.name
    }  # the intact shards were not rewritten
    after = read_run(run_dir).data
    assert after.ids == before.ids and np.array_equal(after.offsets, before.offsets)
    assert np.array_equal(after.boxes, before.boxes) and after.region_labels == before.region_labels
    np.testing.assert_allclose(after.region_emb, before.region_emb, atol=1e-6)
    np.testing.assert_allclose(after.image_emb, before.image_emb, atol=1e-6)
