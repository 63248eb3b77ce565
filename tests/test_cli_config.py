"""The CLI's one source of truth: option defaults and choices from the config dataclasses, --config FILE.toml as the
base of any command, the parsing of list-like options, and a --help that does not import torch."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ravl_engine.cli import main
from tests.test_cli_errors import one_error_line

# command -> (the config dataclasses its options come from, options that parse text into the field on purpose)
CONFIGS = {
    "embed": ("ravl_engine.embed:EmbedConfig", {"templates", "proposer_options"}),
    "cluster": ("ravl_engine.cluster:ClusterConfig ravl_engine.config:DiscoverConfig", set()),
    "discover": ("ravl_engine.config:DiscoverConfig", set()),
    "synth": ("ravl_engine.controlled:SynthConfig", {"classes"}),
    "finetune": ("ravl_engine.finetune:FinetuneConfig", set()),
    "mitigate": ("ravl_engine.mitigate:MitigateConfig", set()),
    "demo": ("ravl_engine.demo:DemoConfig", set()),
}


def _config_class(spec: str) -> type:
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _default(field: dataclasses.Field) -> object:
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else dataclasses.MISSING


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_option_defaults_are_the_config_fields_defaults(command):
    spec, parsed = CONFIGS[command]
    options = {p.name: p for p in main.commands[command].params}
    checked = 0
    for field in [f for cls in spec.split() for f in dataclasses.fields(_config_class(cls))]:
        option = options.get(field.name)
        if option is None or field.name in parsed:
            continue
        default = _default(field)
        if default is dataclasses.MISSING:
            assert option.required, field.name
        elif option.multiple:
            assert tuple(option.default) == tuple(default), field.name
        else:
            assert option.default == default, (field.name, option.default, default)
        checked += 1
    assert checked >= 5, f"{command}: only {checked} options matched a field"


def test_discovery_choices_are_the_literal_annotations():
    from ravl_engine.config import DiscoverConfig

    hints = typing.get_type_hints(DiscoverConfig)
    for command in ("discover", "cluster"):
        options = {p.name: p for p in main.commands[command].params}
        for name in ("strategy", "backend"):
            assert isinstance(options[name].type, click.Choice)
            assert tuple(options[name].type.choices) == typing.get_args(hints[name])
            assert options[name].default == getattr(DiscoverConfig(), name)


def test_device_help_follows_the_field_default():
    runner = CliRunner()
    embed = runner.invoke(main, ["embed", "--help"])
    cluster = runner.invoke(main, ["cluster", "--help"])
    assert embed.exit_code == 0 and cluster.exit_code == 0
    assert "[default: cpu]" in " ".join(embed.output.split())
    # DiscoverConfig.device is None: the help says what None means, and claims no other default
    cluster_device = " ".join(cluster.output.split()).split("--device TEXT", 1)[1].split("--top", 1)[0]
    assert "the inputs' device" in cluster_device and "[default:" not in cluster_device
    options = {p.name: p for p in main.commands["cluster"].params}
    assert options["device"].default is None


def test_import_and_help_do_not_import_torch():
    code = (
        "import sys\n"
        "import ravl_engine, ravl_engine.cli\n"
        "from ravl_engine.cli import main\n"
        "try:\n"
        "    main(['--help'], prog_name='ravl-engine')\n"
        "except SystemExit as stop:\n"
        "    assert stop.code == 0, stop.code\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout
    assert "Commands:" in out.stdout and "mitigate" in out.stdout
    # the public API still loads, on first use
    api = "from ravl_engine import discover, DiscoverConfig, ConfigError; print(callable(discover), DiscoverConfig().k)"
    out = subprocess.run([sys.executable, "-c", api], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "None"]


def test_unknown_package_attribute_is_an_attribute_error():
    import ravl_engine

    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        ravl_engine.no_such_name  # noqa: B018
    assert {"discover", "DiscoverConfig", "ConfigError"} <= set(dir(ravl_engine))


# ---------------------------------------------------------------- --config FILE.toml and list-like options


class _Captured:
    """Stands in for a stage function: records the config the command built."""

    def __init__(self, result: object) -> None:
        self.cfg = None
        self.result = result

    def __call__(self, cfg, **_kwargs):
        self.cfg = cfg
        return self.result


@pytest.fixture
def synth_calls(monkeypatch):
    from ravl_engine import controlled

    result = controlled.SynthResult(
        train_manifest="t.csv",
        eval_manifest="e.csv",
        n_train=1,
        n_eval=1,
        realised_cramers_v_train=0.0,
        realised_cramers_v_eval=0.0,
        feature="red square",
    )
    captured = _Captured(result)
    monkeypatch.setattr(controlled, "run_synth", captured)
    return captured


def test_config_file_is_the_base_and_explicit_options_win(tmp_path, synth_calls):
    toml = tmp_path / "synth.toml"
    lines = ['out = "from-file"', "n-train = 321", "n_eval = 77", 'shape = "disk"', 'classes = "0,2,3"']
    lines.append("overwrite = true")
    toml.write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(main, ["synth", "--config", str(toml), "--n-eval", "55"])
    assert res.exit_code == 0, res.output
    cfg = synth_calls.cfg
    assert (cfg.out, cfg.n_train, cfg.n_eval, cfg.shape, cfg.classes, cfg.overwrite) == (
        "from-file",
        321,
        55,  # the command line wins over the file
        "disk",
        (0, 2, 3),
        True,
    )
    assert cfg.color == "red" and cfg.cell == 28  # untouched: the config's defaults
    # the file may come after the options it is the base of
    res = CliRunner().invoke(main, ["synth", "--out", "cli-out", "--config", str(toml)])
    assert res.exit_code == 0, res.output
    assert synth_calls.cfg.out == "cli-out" and synth_calls.cfg.n_train == 321


def test_config_file_unknown_key_and_bad_toml_are_one_line(tmp_path, synth_calls):
    toml = tmp_path / "bad.toml"
    toml.write_text('out = "x"\nn-trian = 5\n')
    line = one_error_line(CliRunner().invoke(main, ["synth", "--config", str(toml)]), str(toml), "'n-trian'")
    assert "n-train" in line  # the valid keys are listed
    toml.write_text("out = \n")
    one_error_line(CliRunner().invoke(main, ["synth", "--config", str(toml)]), str(toml), "not valid TOML")
    assert synth_calls.cfg is None  # nothing ran


def test_config_file_works_for_every_command(tmp_path):
    toml = tmp_path / "empty.toml"
    toml.write_text("nope = 1\n")
    for command in ("discover", "embed", "cluster", "synth", "finetune", "mitigate", "evaluate", "demo"):
        args = [command, "--config", str(toml)] + ([str(toml)] if command == "discover" else [])
        args += ["run"] if command == "cluster" else []
        one_error_line(CliRunner().invoke(main, args), f"unknown key 'nope' for `{command}`")


@pytest.fixture
def embed_calls(monkeypatch, tmp_path):
    from ravl_engine import embed
    from tests.conftest import write_digit_dataset

    captured = _Captured(None)

    class Result:
        def to_dict(self):
            return {"run_dir": "x"}

    captured.result = Result()
    monkeypatch.setattr(embed, "run_embed", captured)
    return captured, write_digit_dataset(tmp_path / "d", n_images=3)


def test_proposer_options_templates_and_classes_parsing(tmp_path, embed_calls):
    captured, data = embed_calls
    args = ["embed", "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress"]
    res = CliRunner().invoke(
        main,
        [
            *args,
            "--proposer-option",
            "rows=3",
            "--proposer-option",
            "weights=some/file.pt",
            "--proposer-option",
            "flag=true",
            "--proposer-option",
            "limit=null",
            "--proposer-option",
            "expr=a=b",
            "--templates",
            "a photo of {}.|a {} drawn||",
            "--classes",
            " zero, one,,two ",
        ],
    )
    assert res.exit_code == 0, res.output
    cfg = captured.cfg
    expected = {"rows": 3, "weights": "some/file.pt", "flag": True, "limit": None, "expr": "a=b"}
    assert dict(cfg.proposer_options) == expected
    assert cfg.templates == ("a photo of {}.", "a {} drawn")
    assert cfg.classes == ("zero", "one", "two")

    res = CliRunner().invoke(main, args)  # none given: the config's defaults
    assert res.exit_code == 0, res.output
    from ravl_engine.embed import EmbedConfig

    default = EmbedConfig(data="d", out="o")
    assert captured.cfg.templates == default.templates and captured.cfg.classes is None
    assert dict(captured.cfg.proposer_options) == {}

    res = CliRunner().invoke(main, [*args, "--proposer-option", "rows"])
    assert res.exit_code == 2 and "'rows' is not KEY=VALUE" in res.output

    # the same options from a TOML file: a table of proposer options, a list of templates as one string
    toml = tmp_path / "embed.toml"
    toml.write_text('templates = "x {}|y {}"\n[proposer-option]\nrows = 2\ncols = 4\n')
    res = CliRunner().invoke(main, [*args, "--config", str(toml)])
    assert res.exit_code == 0, res.output
    assert dict(captured.cfg.proposer_options) == {"rows": 2, "cols": 4}
    assert captured.cfg.templates == ("x {}", "y {}")


def test_classes_file_is_read_one_name_per_line(tmp_path, embed_calls):
    from ravl_engine import ConfigError
    from ravl_engine.manifest import read_manifest, resolve_classes

    captured, data = embed_calls
    names = tmp_path / "classes.txt"
    names.write_text("\ufeff 0\n\n1 \n2\n", encoding="utf-8")  # a BOM, blank lines and spaces are dropped
    res = CliRunner().invoke(
        main, ["embed", "--data", str(data), "--out", str(tmp_path / "run"), "--classes-file", str(names)]
    )
    assert res.exit_code == 0, res.output
    assert captured.cfg.classes_file == str(names) and captured.cfg.classes is None
    rows = read_manifest(data)
    assert resolve_classes(rows, classes_file=captured.cfg.classes_file) == ["0", "1", "2"]
    assert resolve_classes(rows, classes=["2", "1", "0"], classes_file=names) == ["2", "1", "0"]  # --classes wins
    names.write_text("0\n1\n")  # the manifest's label 2 is not a class
    with pytest.raises(ConfigError):
        resolve_classes(rows, classes_file=names)
    names.write_text("0\n1\n0\n2\n")
    with pytest.raises(ConfigError):
        resolve_classes(rows, classes_file=names)


def test_synth_classes_must_be_digits(synth_calls):
    res = CliRunner().invoke(main, ["synth", "--out", "x", "--classes", "1,a"])
    assert res.exit_code == 2 and "classes must be digits" in res.output
    res = CliRunner().invoke(main, ["synth", "--out", "x", "--classes", "4, 7", "--spurious-class", "7"])
    assert res.exit_code == 0 and synth_calls.cfg.classes == (4, 7)


def test_printed_summary_is_the_stage_result(tmp_path, synth_calls):
    res = CliRunner().invoke(main, ["synth", "--out", str(tmp_path / "s")])
    assert res.exit_code == 0 and json.loads(res.stdout)["feature"] == "red square"
    assert Path(synth_calls.cfg.out) == tmp_path / "s"
