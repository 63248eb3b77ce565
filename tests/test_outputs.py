"""--out refused unless --overwrite, never an input, and replaced whole (old and new results never mix)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from click.testing import CliRunner

from ravl_engine import ConfigError
from ravl_engine import controlled as controlled_module
from ravl_engine.cli import main
from ravl_engine.controlled import SynthConfig, run_synth
from ravl_engine.outputs import check_not_input, staged_dir
from tests.conftest import minimal_discovery


def _tree(folder):
    """{relative path: sha256} of every file under folder."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _synth(out, **kw):
    return SynthConfig(out=str(out), classes=(0, 1, 2), n_train=30, n_eval=12, **kw)


def test_synth_refuses_a_non_empty_out_and_an_interrupted_overwrite_keeps_the_old_setting(tmp_path, monkeypatch):
    out = tmp_path / "setting"
    run_synth(_synth(out, seed=0))
    before = _tree(out)
    res = CliRunner().invoke(main, ["synth", "--out", str(out), "--classes", "0,1,2", "--n-train", "30"])
    assert res.exit_code != 0 and "--overwrite" in res.output and len(res.output.strip().splitlines()) == 1
    assert _tree(out) == before
    # Ctrl-C half-way through rewriting the images: the old setting survives intact, no staging folder is left
    real, saved = controlled_module._write_sets, []

    def interrupted(cfg, folder, *args):
        from PIL import Image

        original = Image.Image.save

        def save(self, fp, *a, **k):
            if len(saved) == 20:
                raise KeyboardInterrupt
            saved.append(fp)
            return original(self, fp, *a, **k)

        monkeypatch.setattr(Image.Image, "save", save)
        return real(cfg, folder, *args)

    monkeypatch.setattr(controlled_module, "_write_sets", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_synth(_synth(out, seed=1, overwrite=True))
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["setting"]
    assert all(str(out) not in str(p) for p in saved)  # nothing was written into the live setting


def test_synth_overwrite_replaces_the_setting_as_a_whole(tmp_path):
    out = tmp_path / "setting"
    run_synth(SynthConfig(out=str(out), classes=(0, 1, 2), n_train=40, n_eval=12, seed=0))
    (out / "stray.txt").write_text("old")
    result = run_synth(_synth(out, seed=1, overwrite=True))
    files = _tree(out)
    assert "stray.txt" not in files and len([f for f in files if f.startswith("train/")]) == 30
    rows = (out / "train.csv").read_text().strip().splitlines()
    assert len(rows) == 31 and result.train_manifest == str(out / "train.csv")


def test_staged_dir_swaps_in_only_complete_results(tmp_path):
    out = tmp_path / "audit"
    with staged_dir(out, overwrite=False) as stage:
        (stage / "discovery.json").write_text("1")
    assert (out / "discovery.json").read_text() == "1"
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        with staged_dir(out, overwrite=False):
            pass
    with pytest.raises(RuntimeError):
        with staged_dir(out, overwrite=True) as stage:
            (stage / "discovery.json").write_text("2")
            raise RuntimeError("killed")
    assert _tree(out) == {"discovery.json": hashlib.sha256(b"1").hexdigest()}
    with staged_dir(out, overwrite=True) as stage:
        (stage / "report.html").write_text("new")
    assert sorted(_tree(out)) == ["report.html"]  # the old discovery.json does not linger next to the new report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit"]


def test_an_output_that_is_an_input_is_refused_by_path_and_by_inode(tmp_path):
    model = tmp_path / "aud" / "model.pt"
    model.parent.mkdir()
    model.write_bytes(b"weights")
    (tmp_path / "link.pt").symlink_to(model)
    for out in (model, tmp_path / "aud" / ".." / "aud" / "model.pt", tmp_path / "link.pt"):
        with pytest.raises(ConfigError, match="is the --pretrained input"):
            check_not_input(out, {"--pretrained": str(model), "--train": None})
    check_not_input(tmp_path / "aud" / "new.pt", {"--pretrained": str(model)})


def test_mitigate_and_finetune_refuse_to_write_over_their_inputs_even_with_overwrite(tmp_path):
    model = tmp_path / "aud" / "model.pt"
    model.parent.mkdir()
    model.write_bytes(b"audited weights")
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    train = tmp_path / "train.csv"
    train.write_text("image,caption\nx.png,a photo\n")
    doc = minimal_discovery(model={"name": "ravl-tiny-rn", "pretrained": str(model), "checkpoint_sha256": digest})
    discovery = tmp_path / "discovery.json"
    discovery.write_text(json.dumps(doc))
    base = ["mitigate", "--train", str(train), "--discovery", str(discovery), "--no-progress", "--overwrite"]
    runner = CliRunner()
    res = runner.invoke(main, [*base, "--pretrained", str(model), "--out", str(model)])
    assert res.exit_code != 0 and "is the --pretrained input" in res.output
    res = runner.invoke(main, [*base, "--out", str(tmp_path / "aud" / ".." / "aud" / "model.pt")])
    assert res.exit_code != 0 and "is the audited checkpoint input" in res.output
    res = runner.invoke(main, [*base, "--out", str(discovery)])
    assert res.exit_code != 0 and "is the --discovery input" in res.output
    res = runner.invoke(
        main, ["finetune", "--train", str(train), "--pretrained", str(model), "--out", str(model), "--overwrite"]
    )
    assert res.exit_code != 0 and "is the --pretrained input" in res.output
    assert hashlib.sha256(model.read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("command", ["finetune", "mitigate", "discover", "demo", "cluster"])
def test_every_out_is_refused_without_overwrite_and_left_untouched(tmp_path, command):
    train = tmp_path / "train.csv"
    train.write_text("image,caption\nx.png,a photo\n")
    discovery = tmp_path / "d.json"
    discovery.write_text("{}")
    arrays = tmp_path / "a.npz"
    np.savez(arrays, x=np.zeros(1))
    existing = tmp_path / "existing"
    if command in ("demo", "cluster"):
        existing.mkdir()
        (existing / "discovery.json").write_text('{"old": true}')
    else:
        existing.write_text('{"unrelated": true}')
    args = {
        "finetune": ["finetune", "--train", str(train), "--out", str(existing)],
        "mitigate": ["mitigate", "--train", str(train), "--discovery", str(discovery), "--out", str(existing)],
        "discover": ["discover", str(arrays), "--out", str(existing)],
        "demo": ["demo", "--out", str(existing)],
        "cluster": ["cluster", str(tmp_path / "run"), "--out", str(existing)],
    }[command]
    before = _tree(tmp_path)
    if command == "cluster":  # cluster reads its run directory first: give it a real one
        from ravl_engine.embed import EmbedConfig, run_embed
        from tests.conftest import write_digit_dataset

        data = write_digit_dataset(tmp_path / "digits", n_images=12)
        run_embed(EmbedConfig(data=str(data), out=str(tmp_path / "run"), proposer="manifest"))
        before = _tree(existing)
    res = CliRunner().invoke(main, [*args, "--no-progress"] if command in ("finetune", "cluster") else args)
    assert res.exit_code != 0, res.output
    assert "already exists; pass --overwrite" in res.output and len(res.output.strip().splitlines()) == 1
    assert (_tree(existing) if command == "cluster" else _tree(tmp_path)) == before


def test_cluster_and_demo_overwrite_replace_old_results_as_a_whole(tmp_path):
    from ravl_engine.embed import EmbedConfig, run_embed
    from ravl_engine.outputs import clear_out
    from tests.conftest import write_digit_dataset

    data = write_digit_dataset(tmp_path / "digits", n_images=12)
    run_embed(EmbedConfig(data=str(data), out=str(tmp_path / "run"), proposer="manifest"))
    out = tmp_path / "audit"
    out.mkdir()
    (out / "stale-montage.png").write_bytes(b"old")
    res = CliRunner().invoke(
        main, ["cluster", str(tmp_path / "run"), "--out", str(out), "--k", "2", "--overwrite", "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["discovery.json", "report.html"]
    assert json.loads((out / "discovery.json").read_text())["k"] == 2
    demo = tmp_path / "demo"
    (demo / "run").mkdir(parents=True)
    (demo / "run" / "shard-00000.h5").write_bytes(b"another seed")
    clear_out(demo, overwrite=True)  # what demo --overwrite does first: no shard of another seed survives
    assert not demo.exists()
