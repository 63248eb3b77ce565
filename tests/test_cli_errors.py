"""Bad input, failing disks, missing devices and Ctrl-C end every command with one line and an exit code
(issue 13, items 9-11): no traceback, no misleading text, nothing half-written left behind."""

from __future__ import annotations

import csv
import errno
import json
import os

import pytest
import torch
from click.testing import CliRunner

from ravl_engine.cli import EXIT_INTERRUPTED, error_line, main
from ravl_engine.errors import ConfigError
from ravl_engine.models import load_clip
from ravl_engine.shards import write_json_atomic
from tests.conftest import write_digit_dataset


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def one_error_line(result, *fragments: str) -> str:
    """The run failed cleanly: exit 1 through click (not an escaped exception), stderr is exactly one error line
    holding every fragment, and stdout has no half-printed summary."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert result.stdout == ""
    return lines[0]


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_digit_dataset(tmp_path_factory.mktemp("digits"), n_images=8)


def _csv(path, rows, *, encoding="utf-8", header=("image", "label")):
    with open(path, "w", newline="", encoding=encoding) as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _no_tmp_left(folder):
    return not [p for p in folder.rglob("*.tmp")]


# --- manifests (item 9: tracebacks, item 10: misleading text, item 11: silently accepted) ---


def test_latin1_csv_is_one_line_naming_the_file(tmp_path):
    manifest = _csv(tmp_path / "m.csv", [["caf\u00e9.png", "a"]], encoding="latin-1")
    one_error_line(invoke("embed", "--data", manifest, "--out", tmp_path / "run"), str(manifest), "not UTF-8")


def test_bom_csv_reads_its_image_column(tmp_path, dataset):
    rows = list(csv.reader(dataset.read_text().splitlines()))
    bom = dataset.parent / "bom.csv"
    _csv(bom, rows[1:], encoding="utf-8-sig", header=rows[0])
    assert bom.read_bytes().startswith(b"\xef\xbb\xbf")
    from ravl_engine.manifest import read_manifest

    read = read_manifest(bom)
    assert [r.image for r in read] == [r[0] for r in rows[1:]]
    assert read[0].boxes is not None and len(read[0].boxes) == 4


def test_empty_csv_says_empty(tmp_path):
    (tmp_path / "m.csv").write_text("")
    line = one_error_line(invoke("embed", "--data", tmp_path / "m.csv", "--out", tmp_path / "run"), "is empty")
    assert "found: )" not in line


def test_corrupt_parquet_is_one_line(tmp_path):
    (tmp_path / "m.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
    one_error_line(
        invoke("embed", "--data", tmp_path / "m.parquet", "--out", tmp_path / "run"),
        str(tmp_path / "m.parquet"),
        "not a readable Parquet file",
    )


def test_duplicate_image_rows_are_refused_with_their_row_numbers(tmp_path):
    manifest = _csv(tmp_path / "m.csv", [["a.png", "x"], ["b.png", "y"], ["a.png", "x"], ["b.png", "y"]])
    one_error_line(
        invoke("embed", "--data", manifest, "--out", tmp_path / "run"),
        str(manifest),
        "'a.png' is listed in rows 1, 3 and 1 more image(s)",
    )


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_boxes_name_the_row(tmp_path, bad):
    rows = [["a.png", "x", "[[0, 0, 10, 10]]"], ["b.png", "y", f"[[0, 0, 10, 10], [0, 0, {bad}, 5]]"]]
    manifest = _csv(tmp_path / "m.csv", rows, header=("image", "label", "boxes"))
    one_error_line(
        invoke("embed", "--data", manifest, "--out", tmp_path / "run", "--proposer", "manifest"),
        f"{manifest} row 2: box 2",
        "must be finite",
    )


def test_non_utf8_classes_file_names_it(tmp_path, dataset):
    classes = tmp_path / "classes.txt"
    classes.write_bytes("0\n1\n2\ncaf\u00e9\n".encode("latin-1"))
    one_error_line(
        invoke("embed", "--data", dataset, "--out", tmp_path / "run", "--classes-file", classes),
        str(classes),
        "not UTF-8",
    )


# --- options ---


@pytest.mark.parametrize(
    ("command", "device", "fragment"),
    [
        ("embed", "foo", "'foo' is not a torch device"),
        ("cluster", "foo", "'foo' is not a torch device"),
        ("finetune", "cuda", "no usable CUDA GPU"),
        ("cluster", "cuda:3", "CUDA GPU"),
        ("evaluate", "meta", "cpu, cuda or mps"),
    ],
)
def test_device_is_checked_before_any_work(tmp_path, dataset, command, device, fragment):
    if device.startswith("cuda") and torch.cuda.device_count() > (torch.device(device).index or 0):
        pytest.skip("this machine has the GPU")
    args = {
        "embed": ["embed", "--data", dataset, "--out", tmp_path / "run"],
        "cluster": ["cluster", tmp_path / "no-run", "--out", tmp_path / "found"],
        "finetune": ["finetune", "--train", dataset, "--out", tmp_path / "m.pt"],
        "evaluate": ["evaluate", "--data", dataset],
    }[command]
    line = one_error_line(invoke(*args, "--device", device), "--device", fragment)
    assert "weights" not in line and "network" not in line
    assert not (tmp_path / "run").exists() and not (tmp_path / "found").exists()


def test_non_integer_grid_option_says_so(tmp_path, dataset):
    line = one_error_line(
        invoke(
            "embed", "--data", dataset, "--out", tmp_path / "run", "--proposer", "grid", "--proposer-option", "rows=abc"
        ),
        "grid needs integer rows",
        "rows='abc'",
    )
    assert "not supported between" not in line


def test_score_threshold_above_one_is_refused_up_front(tmp_path, dataset):
    one_error_line(
        invoke("embed", "--data", dataset, "--out", tmp_path / "run", "--score-threshold", "2"),
        "--score-threshold",
        "[0, 1]",
    )
    assert not (tmp_path / "run").exists()


def test_every_box_dropped_is_a_warning_in_the_summary_and_on_stderr(tmp_path, dataset):
    res = invoke("embed", "--data", dataset, "--out", tmp_path / "run", "--min-box-size", "100", "--no-progress")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["n_images"] == 8 and summary["n_regions"] == 0 and summary["dropped_boxes"] == 32
    assert len(summary["warnings"]) == 1 and "all 32 box(es) of the 8 image(s) were dropped" in summary["warnings"][0]
    assert f"Warning: {summary['warnings'][0]}" in res.stderr.splitlines()


# --- evaluate --discovery is checked before the embedding, and must be cluster's document ---


def _discover_output(tmp_path):
    """What `discover --out` wrote before its document was tagged: clusters that name regions by index only."""
    doc = {"k": 2, "clusters": [{"rank": 1, "class_index": 0, "region_indices": [0, 3], "table": []}]}
    path = tmp_path / "discover.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("content", ["discover", "[]", "{}", "not json"])
def test_evaluate_rejects_a_wrong_discovery_before_embedding(tmp_path, dataset, content):
    if content == "discover":
        discovery = _discover_output(tmp_path)
        fragment = "not a ravl-engine discovery.json (format None"
    else:
        discovery = tmp_path / "discovery.json"
        discovery.write_text(content)
        fragment = "not a readable discovery.json" if content == "not json" else "not a ravl-engine discovery.json"
    work = tmp_path / "work"
    res = invoke("evaluate", "--data", dataset, "--discovery", discovery, "--work", work)
    one_error_line(res, str(discovery), fragment, "ravl-engine cluster")
    assert not work.exists()  # refused before any embedding


# --- disks: read-only, full, a directory in the way ---


def test_full_disk_during_embed_is_one_line(tmp_path, dataset, monkeypatch):
    def full(path, *_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("ravl_engine.embed.write_shard", full)
    res = invoke("embed", "--data", dataset, "--out", tmp_path / "run", "--no-progress")
    one_error_line(res, str(tmp_path / "run" / "shard-00000.h5"), os.strerror(errno.ENOSPC), "free some disk space")


def test_out_below_a_file_is_one_line(tmp_path, dataset):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    res = invoke("embed", "--data", dataset, "--out", blocker / "run", "--no-progress")
    one_error_line(res, str(blocker))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_out_is_one_line(tmp_path, dataset):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        res = invoke("finetune", "--train", dataset, "--out", locked / "sub" / "m.pt", "--epochs", "1", "--no-progress")
        one_error_line(res, str(locked / "sub"), "choose a location you can write to")
    finally:
        locked.chmod(0o700)


@pytest.fixture(scope="module")
def run_dir(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("embedded") / "run"
    res = invoke("embed", "--data", dataset, "--out", out, "--no-progress")
    assert res.exit_code == 0, res.output
    return out


def test_discovery_json_that_is_a_directory_is_refused_first(tmp_path):
    (tmp_path / "found" / "discovery.json").mkdir(parents=True)
    res = invoke("cluster", tmp_path / "no-run-needed", "--out", tmp_path / "found", "--no-progress")
    one_error_line(res, str(tmp_path / "found" / "discovery.json"), "is a directory")
    assert _no_tmp_left(tmp_path)


def test_full_disk_while_writing_discovery_leaves_no_tmp(tmp_path, run_dir, monkeypatch):
    from pathlib import Path

    real = Path.write_text

    def half_then_full(self, data, *args, **kwargs):
        real(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", half_then_full)
    out = tmp_path / "found"
    res = invoke("cluster", run_dir, "--out", out, "--k", "2", "--no-progress")
    one_error_line(res, "discovery.json.tmp: No space left on device", "free some disk space")
    assert not (out / "discovery.json").exists() and _no_tmp_left(out)
    assert not [p.name for p in tmp_path.iterdir() if "staging" in p.name]  # the staged output is cleared too


def test_atomic_write_onto_a_directory_leaves_no_tmp(tmp_path):
    (tmp_path / "x.json").mkdir()
    with pytest.raises(IsADirectoryError):
        write_json_atomic(tmp_path / "x.json", {"a": 1})
    assert _no_tmp_left(tmp_path)


def test_error_line_is_one_line_for_os_and_decode_errors():
    assert error_line(PermissionError(errno.EACCES, "Permission denied", "/ro/x")) == (
        "/ro/x: Permission denied; choose a location you can write to"
    )
    decode = UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid continuation byte")
    assert (
        error_line(decode) == "an input file is not UTF-8 text (invalid continuation byte at byte 0); save it as UTF-8"
    )
    assert error_line(ConfigError("first\nsecond")) == "first second"


# --- checkpoints (item 10) ---


def test_non_checkpoint_file_is_named_without_torch_advice(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_text("hello, not a checkpoint")
    with pytest.raises(ConfigError) as info:
        load_clip("ravl-tiny-rn", str(junk))
    message = str(info.value)
    assert message.startswith(f"{junk}: not a checkpoint") and "\n" not in message
    assert "weights_only" not in message and "network" not in message


def test_state_dict_mismatch_is_a_count_not_a_key_dump(tmp_path):
    vit = load_clip("ravl-tiny-vit").model
    path = tmp_path / "vit.pt"
    torch.save(vit.state_dict(), path)
    with pytest.raises(ConfigError) as info:
        load_clip("ravl-tiny-rn", str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: its weights do not fit ravl-tiny-rn (") and "missing keys" in message
    assert "unexpected keys" in message and "pass the --model it was trained as" in message
    assert len(message) < 300 and "\n" not in message


# --- finetune that never beats epoch 0 (item 11) ---


def test_finetune_that_never_beats_epoch_0_warns(tmp_path, dataset, monkeypatch):
    # training that leaves the weights as they were: no epoch can score above the starting model
    from ravl_engine.training import LoopResult, snapshot

    def no_gain(model, _optimizer, _idx, _loss, cfg, *, validate, **_kw):
        value = validate()
        entry = {"epoch": 1.0, "loss": 0.0, "clip": 0.0, "aux": 0.0, cfg.metric: value}
        return LoopResult(best_epoch=0, best_val=value, best_state=snapshot(model), history=[entry], step_seconds=0.0)

    monkeypatch.setattr("ravl_engine.finetune.train_loop", no_gain)
    out = tmp_path / "m.pt"
    res = invoke("finetune", "--train", dataset, "--out", out, "--epochs", "2", "--patience", "1", "--no-progress")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["best_epoch"] == 0 and out.exists()
    assert len(summary["warnings"]) == 1 and "no epoch beat the starting weights" in summary["warnings"][0]
    assert f"Warning: {summary['warnings'][0]}" in res.stderr.splitlines()


# --- Ctrl-C ---


@pytest.mark.parametrize(("command", "resumes"), [("embed", True), ("cluster", False)])
def test_ctrl_c_exits_130_and_says_whether_rerunning_resumes(tmp_path, dataset, monkeypatch, command, resumes):
    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(f"ravl_engine.{command}.run_{command}", interrupted)
    args = {
        "embed": ["embed", "--data", dataset, "--out", tmp_path / "run"],
        "cluster": ["cluster", tmp_path / "run", "--out", tmp_path / "found"],
    }[command]
    res = invoke(*args, "--no-progress")
    assert res.exit_code == EXIT_INTERRUPTED and "Aborted" not in res.output and "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Interrupted")
    assert ("rerun the same command to resume" in lines[0]) is resumes
