"""The ravl-engine CLI through click's CliRunner and as an installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
from click.testing import CliRunner

from ravl_engine import __version__
from ravl_engine.cli import main


def _write_arrays(path, ps, **override):
    arrays = {
        "region_embeddings": ps.region_embeddings,
        "num_regions": ps.num_regions,
        "image_labels": ps.image_labels,
        "image_scores": ps.image_scores,
        "region_scores": ps.region_scores,
    }
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_help_and_version():
    runner = CliRunner()
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "RaVL" in result.output and "discover" in result.output
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_discover_writes_json_and_prints_summary(tmp_path, planted_small):
    arrays = _write_arrays(tmp_path / "in.npz", planted_small)
    out = tmp_path / "res" / "discovery.json"
    result = CliRunner().invoke(main, ["discover", str(arrays), "--out", str(out), "--no-progress", "--top", "3"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["clusters"][0]["class_index"] == planted_small.spurious_class
    assert len(summary["clusters"][0]["region_indices"]) == 3
    full = json.loads(out.read_text())
    assert full["k"] == summary["k"]
    assert len(full["clusters"][0]["region_indices"]) == full["clusters"][0]["n_regions"]
    assert not (out.parent / "discovery.json.tmp").exists()


def test_discover_bad_input_is_one_clear_line(tmp_path, planted_small):
    arrays = _write_arrays(tmp_path / "bad.npz", planted_small, image_labels=planted_small.image_labels[:-1])
    out = tmp_path / "discovery.json"
    result = CliRunner().invoke(main, ["discover", str(arrays), "--out", str(out), "--no-progress"])
    assert result.exit_code != 0
    assert "image_labels has 299 entries but there are 300 images" in result.output
    assert not out.exists()

    missing = _write_arrays(tmp_path / "missing.npz", planted_small, region_scores=None)
    result = CliRunner().invoke(main, ["discover", str(missing), "--no-progress"])
    assert result.exit_code != 0 and "missing array(s) region_scores" in result.output

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    result = CliRunner().invoke(main, ["discover", str(garbage), "--no-progress"])
    assert result.exit_code != 0 and "not a readable .npz file" in result.output


def test_console_script_runs():
    from pathlib import Path

    beside = Path(sys.executable).parent / "ravl-engine"
    exe = str(beside) if beside.exists() else shutil.which("ravl-engine")
    assert exe is not None, "no ravl-engine console script: install the package (pip install -e .)"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert __version__ in out.stdout
    out = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "mitigate" in out.stdout
    out = subprocess.run([sys.executable, "-m", "ravl_engine.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "discover" in out.stdout


def test_evaluate_command_embeds_and_reports(tmp_path):
    from tests.conftest import write_digit_dataset

    data = write_digit_dataset(tmp_path / "d", n_images=24)
    work = tmp_path / "run"
    res = CliRunner().invoke(main, ["evaluate", "--data", str(data), "--work", str(work), "--spurious-class", "0"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["feature"] == "square" and summary["spurious_class"] == "0"
    assert 0.0 <= summary["image_worst_group"] <= summary["image_overall"] <= 1.0
    assert (work / "manifest.json").exists()  # --work keeps the embeddings
    res = CliRunner().invoke(main, ["evaluate", "--data", str(data), "--feature", "ruler"])
    assert res.exit_code != 0 and "feature 'ruler' is not among the region labels" in res.output
