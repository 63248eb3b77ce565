"""What a non-editable install gets: one top-level import name, the kernel and proposer packages in it, data files.

The wheel itself is built and installed by `.ci/wheel-check` (too slow for the default suite); these tests keep the
source tree and pyproject's package list in step, so a new subpackage, data folder or stray top-level import fails here
first."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
INNER = ("kernels", "proposers")  # import names that exist only as ravl_engine.kernels / ravl_engine.proposers


def _python_files() -> list[Path]:
    return [p for d in ("ravl_engine", "tests", "bench") for p in (ROOT / d).rglob("*.py")]


def _packages() -> dict[str, Path]:
    """Every package under ravl_engine/ (a folder with __init__.py), by dotted name."""
    return {
        ".".join(init.parent.relative_to(ROOT).parts): init.parent
        for init in (ROOT / "ravl_engine").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }


def test_nothing_imports_the_inner_packages_as_top_level_packages():
    """`kernels` and `proposers` exist as import names only inside ravl_engine: a bare `import kernels` loads Hugging
    Face's package (a transformers dependency) or fails."""
    offenders = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in INNER]
    assert not offenders, "import these as ravl_engine.kernels / ravl_engine.proposers: " + ", ".join(offenders)


def test_the_clone_shadows_no_installed_package():
    """Run from the repository root (on sys.path under pytest and `python -m`), a top-level folder named like a
    distribution would be imported instead of it: with transformers >= 5, a root `kernels/` folder broke every
    Hugging Face import. Only ravl_engine, tests and bench are importable from the root."""
    importable = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert importable == ["bench", "ravl_engine", "tests"], importable
    if str(ROOT) in map(str, sys.path) or "" in sys.path:
        spec = importlib.util.find_spec("kernels")
        assert spec is None or not str(spec.origin).startswith(str(ROOT / "kernels")), spec


def test_every_package_folder_is_listed():
    assert "package-dir" not in SETUPTOOLS, "the packages live under ravl_engine/; no folder is mapped"
    found = set(_packages())
    assert set(SETUPTOOLS["packages"]) == found, f"pyproject [tool.setuptools] packages should be {sorted(found)}"
    assert {"ravl_engine.kernels", "ravl_engine.proposers"} <= found


def test_every_data_file_of_the_package_is_declared():
    """Files the code reads at run time (the tiny model configs) ship only if package-data names them under the
    package whose folder holds them (setuptools matches patterns per package, not in subpackages)."""
    declared = SETUPTOOLS["package-data"]
    packages = _packages()
    missing = []
    for path in (ROOT / "ravl_engine").rglob("*"):
        if path.is_dir() or path.suffix in {".py", ".pyc"} or "__pycache__" in path.parts:
            continue
        owner = max((n for n, f in packages.items() if path.is_relative_to(f)), key=len)
        rel = path.relative_to(packages[owner])
        patterns = declared.get(owner, [])
        if not any(rel.match(p) and len(rel.parts) == len(Path(p).parts) for p in patterns):
            missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"add to [tool.setuptools.package-data]: {missing}"
    configs = sorted((ROOT / "ravl_engine" / "model_configs").glob("*.json"))
    assert sorted(p.stem for p in configs) == ["ravl-tiny-rn", "ravl-tiny-rn-112", "ravl-tiny-vit", "ravl-tiny-vit-112"]


def test_the_default_model_config_is_found_through_the_package():
    from ravl_engine.models import CONFIG_DIR

    assert (CONFIG_DIR / "ravl-tiny-rn.json").is_file()
