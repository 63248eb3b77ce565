"""Cluster names: phrase scores against a float64 oracle, known answers, vocabulary files, a moved checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ravl_engine import ConfigError
from ravl_engine.cli import main
from ravl_engine.cluster import ClusterConfig, run_cluster
from ravl_engine.config import DiscoverConfig
from ravl_engine.embed import EmbedConfig, run_embed
from ravl_engine.errors import RavlEngineWarning
from ravl_engine.naming import cluster_means, phrase_scores, read_vocabulary, top_names
from ravl_engine.vocabulary import builtin_vocabulary
from tests.conftest import write_digit_dataset

ALL_CLUSTERS = DiscoverConfig(k=6, influence_threshold=float("-inf"), two_sign_rule=False)


def _planted(seed: int = 0):
    """Regions of 3 clusters around axes 1, 2, 3, every region also leaning on a shared axis 0; the phrase
    'generic' is that shared axis (the most similar phrase to every region), 'alpha/beta/gamma' the cluster axes."""
    rng = np.random.default_rng(seed)
    d, per = 8, 40
    labels = np.repeat(np.arange(3), per)
    x = rng.normal(0, 0.05, (3 * per, d))
    x[:, 0] += 1.0
    x[np.arange(3 * per), labels + 1] += 0.6
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    phrases = np.zeros((5, d))
    phrases[0, 0] = 1.0  # generic
    phrases[1, 1] = phrases[2, 2] = phrases[3, 3] = 1.0
    phrases[4] = rng.normal(size=d)
    phrases /= np.linalg.norm(phrases, axis=1, keepdims=True)
    return x, labels, phrases, ["generic", "alpha", "beta", "gamma", "noise"]


def test_phrase_scores_match_a_float64_loop_oracle():
    x, labels, phrases, _ = _planted()
    sums, counts = cluster_means(torch.from_numpy(x).float(), torch.from_numpy(labels), 3)
    got = phrase_scores(sums, counts, torch.from_numpy(phrases)).numpy()
    overall = np.mean([[xi @ p for p in phrases] for xi in x], axis=0)
    for c in range(3):
        members = [xi for xi, lab in zip(x, labels, strict=True) if lab == c]
        expected = np.mean([[xi @ p for p in phrases] for xi in members], axis=0) - overall
        assert np.allclose(got[c], expected, atol=1e-6)


def test_the_planted_phrase_names_its_cluster_and_the_generic_one_names_none():
    x, labels, phrases, words = _planted()
    raw = x @ phrases.T
    assert (raw.argmax(1) == 0).all(), "'generic' is the closest phrase to every region in raw cosine"
    sums, counts = cluster_means(torch.from_numpy(x), torch.from_numpy(labels), 3)
    names = top_names(phrase_scores(sums, counts, torch.from_numpy(phrases)), words, top=3)
    assert [n[0]["phrase"] for n in names] == ["alpha", "beta", "gamma"]
    for entry in names:
        scores = [n["score"] for n in entry]
        assert scores == sorted(scores, reverse=True) and entry[0]["score"] > 0.1
    empty = phrase_scores(torch.zeros(2, 8, dtype=torch.float64), torch.tensor([0, 0]), torch.from_numpy(phrases))
    assert (empty == 0).all()


def test_vocabulary_files(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("")
    with pytest.raises(ConfigError, match="has no phrase"):
        read_vocabulary(path)
    path.write_text("# comment only\n\n   \n")
    with pytest.raises(ConfigError, match="has no phrase"):
        read_vocabulary(path)
    with pytest.raises(ConfigError, match="cannot read it"):
        read_vocabulary(tmp_path / "missing.txt")
    path.write_text("red square\n ruler \nRed Square\nruler\n# a comment\nwatermark\n")
    with pytest.warns(RavlEngineWarning, match=r"2 duplicate phrase\(s\) dropped \(first: 'Red Square'\)"):
        assert read_vocabulary(path) == ["red square", "ruler", "watermark"]
    builtin = builtin_vocabulary()
    assert len(builtin) == len({p.casefold() for p in builtin}) > 300
    assert {"person", "red square", "ruler", "watermark", "text", "border", "stripes"} <= set(builtin)


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory):
    """A run embedded from a checkpoint file (random-init tiny weights saved like finetune does)."""
    from ravl_engine.models import load_clip

    root = tmp_path_factory.mktemp("named")
    data = write_digit_dataset(root / "data", n_images=12)
    checkpoint = root / "model.pt"
    torch.save({"arch": "ravl-tiny-rn", "state_dict": load_clip("ravl-tiny-rn").model.state_dict()}, checkpoint)
    run_embed(
        EmbedConfig(data=str(data), out=str(root / "run"), pretrained=str(checkpoint), shard_size=16, batch_size=8)
    )
    return root


def _valid(doc):
    assert doc["format"] == "ravl-engine-discovery/1" and doc["clusters"]
    assert sum(doc["cluster_sizes"]) == 48 and len(doc["cluster_sizes"]) == doc["k"]
    for c in doc["clusters"]:
        assert c["n_regions"] == len(c["regions"]) and c["n_images"] == len({r["image"] for r in c["regions"]})


def test_cluster_names_every_ranked_cluster_from_a_vocabulary_file(audited_run, tmp_path):
    vocab = tmp_path / "v.txt"
    vocab.write_text("red square\nruler\nwatermark\ndigit\nblack background\nstripes\ntext\n")
    result = run_cluster(
        ClusterConfig(
            run_dir=str(audited_run / "run"), out=str(tmp_path / "out"), vocabulary=str(vocab), discover=ALL_CLUSTERS
        )
    )
    doc = json.loads(Path(result.path).read_text())
    _valid(doc)
    assert doc["naming"]["status"] == "named" and doc["naming"]["n_phrases"] == 7
    assert doc["naming"]["vocabulary"] == str(vocab.resolve())
    phrases = set(vocab.read_text().split("\n")) - {""}
    for c in doc["clusters"]:
        assert len(c["names"]) == 5 and {n["phrase"] for n in c["names"]} <= phrases
        scores = [n["score"] for n in c["names"]]
        assert scores == sorted(scores, reverse=True)
    report = Path(result.report).read_text()
    for c in doc["clusters"]:
        assert f"#{c['rank']} “{c['names'][0]['phrase']}”" in report


def _quick_cluster(run_dir, out, checkpoint):
    return run_cluster(
        ClusterConfig(
            run_dir=str(run_dir), out=str(out), checkpoint=str(checkpoint), report=False, discover=ALL_CLUSTERS
        )
    )


def test_a_moved_or_changed_checkpoint_skips_names_with_a_warning(audited_run, tmp_path):
    run_dir, checkpoint = audited_run / "run", audited_run / "model.pt"
    moved = tmp_path / "moved.pt"
    shutil.move(checkpoint, moved)
    try:
        with pytest.warns(RavlEngineWarning, match="audited checkpoint .* is gone; pass its new path"):
            result = run_cluster(ClusterConfig(run_dir=str(run_dir), out=str(tmp_path / "a"), discover=ALL_CLUSTERS))
        doc = json.loads(Path(result.path).read_text())
        _valid(doc)
        assert doc["naming"]["status"] == "skipped" and "is gone" in doc["naming"]["reason"]
        assert all(c["names"] == [] for c in doc["clusters"])
        assert "Clusters are not named" in Path(result.report).read_text()
        # the new path, verified by its sha256, names them again
        named = _quick_cluster(run_dir, tmp_path / "b", moved)
        assert named.document.naming.status == "named"
        assert all(len(c.names) == 5 for c in named.document.clusters)
        changed = tmp_path / "changed.pt"
        changed.write_bytes(moved.read_bytes() + b"\0")
        with pytest.warns(RavlEngineWarning, match="changed since embed"):
            other = _quick_cluster(run_dir, tmp_path / "c", changed)
        assert other.document.naming.status == "skipped"
        # the ranking never depends on the names
        assert [c.cluster_id for c in other.document.clusters] == [c.cluster_id for c in named.document.clusters]
    finally:
        shutil.move(moved, checkpoint)


def test_cli_cluster_vocabulary_errors_are_one_line(audited_run, tmp_path):
    runner = CliRunner()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    args = ["cluster", str(audited_run / "run"), "--out", str(tmp_path / "out"), "--no-progress", "--k", "6"]
    res = runner.invoke(main, [*args, "--vocabulary", str(empty)])
    assert res.exit_code != 0 and f"vocabulary {empty} has no phrase; write one phrase per line" in res.output
    assert len([line for line in res.output.splitlines() if line.strip()]) == 1
    assert not (tmp_path / "out" / "discovery.json").exists()
    res = runner.invoke(main, [*args, "--no-names"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["naming"] == {} and all(c["names"] == [] for c in summary["clusters"])
