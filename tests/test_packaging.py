"""What a non-editable install gets: one top-level import name, the mapped kernel and proposer packages, the data files.

The wheel itself is built and installed by `.ci/wheel-check` (too slow for the default suite); these tests keep the
source tree and pyproject's mapping in step, so a new subpackage, data folder or stray top-level import fails here
first."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
MAPPED = {"kernels": "ravl_engine.kernels", "proposers": "ravl_engine.proposers"}


def _python_files() -> list[Path]:
    return [p for d in ("ravl_engine", "kernels", "proposers", "tests", "bench") for p in (ROOT / d).rglob("*.py")]


def test_nothing_imports_the_repository_folders_as_top_level_packages():
    """`kernels` and `proposers` exist as import names only inside ravl_engine once installed: an `import kernels`
    works from a source checkout (the folder is on sys.path) and fails, or loads Hugging Face's package, elsewhere."""
    offenders = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in MAPPED]
    assert not offenders, "import these as ravl_engine.kernels / ravl_engine.proposers: " + ", ".join(offenders)


def test_every_package_folder_is_listed_under_its_installed_name():
    packages = set(SETUPTOOLS["packages"])
    assert SETUPTOOLS["package-dir"] == {v: k for k, v in MAPPED.items()}
    found = {"ravl_engine"}
    for folder, name in [("ravl_engine", "ravl_engine"), *MAPPED.items()]:
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert packages == found, f"pyproject [tool.setuptools] packages should be {sorted(found)}"
    assert not any(p.split(".")[0] in MAPPED for p in packages)


def test_every_data_file_of_the_package_is_declared():
    """Files the code reads at run time (the tiny model configs) ship only if package-data names them."""
    declared = SETUPTOOLS["package-data"]
    missing = []
    for folder, name in [("ravl_engine", "ravl_engine"), *MAPPED.items()]:
        for path in (ROOT / folder).rglob("*"):
            if path.is_dir() or path.suffix in {".py", ".pyc"} or "__pycache__" in path.parts:
                continue
            rel = path.relative_to(ROOT / folder)
            if not any(rel.match(pattern) for pattern in declared.get(name, [])):
                missing.append(f"{folder}/{rel}")
    assert not missing, f"add to [tool.setuptools.package-data]: {missing}"
    configs = sorted((ROOT / "ravl_engine" / "model_configs").glob("*.json"))
    assert sorted(p.stem for p in configs) == ["ravl-tiny-rn", "ravl-tiny-rn-112", "ravl-tiny-vit", "ravl-tiny-vit-112"]


def test_the_default_model_config_is_found_through_the_package():
    from ravl_engine.models import CONFIG_DIR

    assert (CONFIG_DIR / "ravl-tiny-rn.json").is_file()
