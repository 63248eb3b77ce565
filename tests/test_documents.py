"""The typed on-disk documents: the run record and discovery.json round-trip what embed and cluster write, and every
discovery.json reader refuses another format, an older layout or `discover --out`'s document in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ravl_engine.cli import main
from ravl_engine.cluster import ClusterConfig, run_cluster
from ravl_engine.config import DiscoverConfig
from ravl_engine.documents import (
    DISCOVER_ARRAYS_FORMAT,
    DISCOVERY_FORMAT,
    Audit,
    Discovery,
    RunRecord,
    read_discovery,
)
from ravl_engine.embed import EmbedConfig, run_embed
from ravl_engine.errors import ConfigError, ShardError
from ravl_engine.evaluate import load_discovery
from ravl_engine.shards import load_run_manifest
from tests.conftest import write_digit_dataset
from tests.test_cli import _write_arrays

ALL_CLUSTERS = DiscoverConfig(k=6, influence_threshold=float("-inf"), two_sign_rule=False)
FIX = "rerun `ravl-engine cluster RUN --out DIR`"


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    """A real embed + cluster: (data manifest, run dir, discovery.json path, ClusterResult)."""
    root = tmp_path_factory.mktemp("documents")
    data = write_digit_dataset(root / "data", n_images=12)
    run_embed(EmbedConfig(data=str(data), out=str(root / "run"), shard_size=16, batch_size=8))
    result = run_cluster(ClusterConfig(run_dir=str(root / "run"), out=str(root / "audit"), discover=ALL_CLUSTERS))
    return data, root / "run", Path(result.path), result


def _write(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def _one_line(err: pytest.ExceptionInfo, *fragments: str) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    return text


def test_discovery_round_trips_what_cluster_wrote(audit):
    _, run_dir, path, result = audit
    written = json.loads(path.read_text(encoding="utf-8"))
    assert written["clusters"], "the audit must rank clusters for the round trip to mean something"
    disc = read_discovery(path)
    assert disc.to_dict() == written
    assert list(disc.to_dict()) == list(written), "same keys in the same order"
    assert [list(c.to_dict()) for c in disc.clusters] == [list(c) for c in written["clusters"]]
    assert Discovery.from_dict(disc.to_dict()) == disc
    assert disc == result.document, "what run_cluster returned is what a reader gets back from the file"
    # the typed fields are the file's values
    top = written["clusters"][0]
    assert (disc.clusters[0].class_name, disc.clusters[0].rank) == (top["class"], top["rank"])
    assert [r.image for r in disc.clusters[0].regions] == [r["image"] for r in top["regions"]]
    assert disc.medoid_array().shape == (written["k"], written["embedding_dim"])
    np.testing.assert_array_equal(disc.medoid_array(), np.asarray(written["medoids"], dtype=np.float32))
    assert disc.by_rank(1) == disc.clusters[0]
    with pytest.raises(ConfigError, match="rank 99 does not exist"):
        disc.by_rank(99)
    # the audit is the run record's, with the data manifest's absolute path
    record = RunRecord.from_dict(load_run_manifest(run_dir))
    assert disc.audit == Audit.of_run(record)
    assert disc.audit.run_dir_data == record.data_path and Path(record.data_path).is_absolute()
    assert disc.classes == record.classes


def test_run_record_round_trips_the_manifest(audit):
    _, run_dir, _, _ = audit
    manifest = load_run_manifest(run_dir)
    record = RunRecord.from_dict(manifest)
    as_written = record.to_dict()
    assert as_written == {key: manifest[key] for key in as_written}
    assert RunRecord.from_dict(as_written) == record
    assert record.model.name == "ravl-tiny-rn" and record.proposer.name == manifest["proposer"]["name"]


def test_run_record_of_an_older_manifest(audit):
    _, run_dir, _, _ = audit
    manifest = load_run_manifest(run_dir)
    before_resize = {k: v for k, v in manifest.items() if k != "resize"}
    assert RunRecord.from_dict(before_resize).resize == "squash", "embed squashed before --resize existed"
    with pytest.raises(ShardError) as err:
        RunRecord.from_dict({k: v for k, v in manifest.items() if k != "templates"}, source="run/manifest.json")
    _one_line(err, "run/manifest.json", "'templates'", "older ravl-engine", "re-run embed")


def test_a_wrong_format_tag_names_the_fix(audit, tmp_path):
    doc = json.loads(audit[2].read_text(encoding="utf-8"))
    path = _write(tmp_path / "discovery.json", {**doc, "format": "ravl-engine-discovery/0"})
    with pytest.raises(ConfigError) as err:
        read_discovery(path)
    _one_line(
        err,
        f"{path}: not a ravl-engine discovery.json (format ravl-engine-discovery/0, expected {DISCOVERY_FORMAT})",
        FIX,
    )
    untagged = _write(tmp_path / "untagged.json", {k: v for k, v in doc.items() if k != "format"})
    with pytest.raises(ConfigError) as err:
        load_discovery(untagged)
    _one_line(err, str(untagged), "format None", FIX)


def test_an_old_document_without_medoids_names_the_fix(audit, tmp_path):
    doc = json.loads(audit[2].read_text(encoding="utf-8"))
    path = _write(tmp_path / "discovery.json", {k: v for k, v in doc.items() if k != "medoids"})
    with pytest.raises(ConfigError) as err:
        read_discovery(path)
    _one_line(err, str(path), "'medoids'", "older ravl-engine", FIX)
    clusters = [{k: v for k, v in c.items() if k != "medoid"} for c in doc["clusters"]]
    path = _write(tmp_path / "no_medoid.json", {**doc, "clusters": clusters})
    with pytest.raises(ConfigError) as err:
        load_discovery(path)
    _one_line(err, str(path), "'medoid'", "older ravl-engine", FIX)


def test_a_document_from_before_cluster_naming_still_reads(audit, tmp_path):
    doc = json.loads(audit[2].read_text(encoding="utf-8"))
    added = ("names", "n_regions", "n_images")
    old = {k: v for k, v in doc.items() if k not in ("cluster_sizes", "naming")}
    old["clusters"] = [{k: v for k, v in c.items() if k not in added} for c in doc["clusters"]]
    disc = read_discovery(_write(tmp_path / "discovery.json", old))
    assert disc.cluster_sizes is None and disc.naming.to_dict() == {}
    for got, written in zip(disc.clusters, doc["clusters"], strict=True):
        assert got.names == ()
        assert got.n_regions == len(written["regions"])
        assert got.n_images == len({r["image"] for r in written["regions"]})
    assert "cluster_sizes" not in disc.to_dict()


@pytest.mark.parametrize("content", ["[1, 2]", "{not json", '{"format": "ravl-engine-discovery/1", "k": "two"}'])
def test_not_a_discovery_is_one_line(tmp_path, content):
    path = tmp_path / "discovery.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        read_discovery(path)
    _one_line(err, str(path), FIX)


@pytest.fixture(scope="module")
def arrays_document(tmp_path_factory, planted_small_module):
    """What `ravl-engine discover ARRAYS --out FILE` writes."""
    root = tmp_path_factory.mktemp("arrays")
    out = root / "discover.json"
    arrays = _write_arrays(root / "in.npz", planted_small_module)
    res = CliRunner().invoke(main, ["discover", str(arrays), "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def planted_small_module():
    from ravl_engine.synth import planted_embeddings

    return planted_embeddings(1200, dim=32, num_classes=4, seed=3)


def test_discover_out_is_tagged_as_arrays(arrays_document):
    doc = json.loads(arrays_document.read_text(encoding="utf-8"))
    assert doc["format"] == DISCOVER_ARRAYS_FORMAT
    assert doc["clusters"] and "region_indices" in doc["clusters"][0]


@pytest.mark.parametrize("reader", [read_discovery, load_discovery])
def test_every_library_reader_rejects_the_arrays_document(arrays_document, reader):
    with pytest.raises(ConfigError) as err:
        reader(arrays_document)
    _one_line(err, str(arrays_document), f"format {DISCOVER_ARRAYS_FORMAT}", "discover --out", FIX)


def _cli_error(res) -> str:
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    assert res.stdout == ""
    return lines[0]


def test_evaluate_and_mitigate_reject_the_arrays_document(audit, arrays_document, tmp_path):
    data = audit[0]
    runner = CliRunner()
    res = runner.invoke(
        main, ["evaluate", "--data", str(data), "--discovery", str(arrays_document), "--work", str(tmp_path / "w")]
    )
    line = _cli_error(res)
    assert str(arrays_document) in line and DISCOVER_ARRAYS_FORMAT in line and "ravl-engine cluster" in line
    assert not (tmp_path / "w").exists(), "refused before embedding"
    out = tmp_path / "fixed.pt"
    args = ["mitigate", "--train", str(data), "--discovery", str(arrays_document), "--out", str(out)]
    res = runner.invoke(main, args)
    line = _cli_error(res)
    assert str(arrays_document) in line and "ravl-engine cluster" in line
    assert not out.exists()
