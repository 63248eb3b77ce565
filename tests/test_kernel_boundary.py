"""The kernel boundary: kernels/ imports nothing of the engine and its modules import each other without a circle;
the kernels' own errors reach the user as the engine's error types, with the same message."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pytest

from ravl_engine import BackendError, DiscoverConfig, discover
from ravl_engine.kernels.backends import get_backend
from ravl_engine.kernels.errors import BackendUnavailableError, KernelError

KERNELS = Path(__file__).resolve().parents[1] / "ravl_engine" / "kernels"
PACKAGE = "ravl_engine.kernels"


def _imports(path: Path) -> list[str]:
    """Every module name an import statement of ``path`` names (``from a import b`` gives a and a.b)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import; write {PACKAGE}.<module>"
            names.append(node.module or "")
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def _modules() -> dict[str, Path]:
    paths = sorted(KERNELS.glob("*.py"))
    assert len(paths) >= 8, f"found only {len(paths)} kernel modules under {KERNELS}"
    return {f"{PACKAGE}.{p.stem}" if p.stem != "__init__" else PACKAGE: p for p in paths}


def test_kernels_import_nothing_of_the_engine():
    offenders = [
        f"{path.name}: {name}"
        for path in _modules().values()
        for name in _imports(path)
        if (name == "ravl_engine" or name.startswith("ravl_engine.")) and not name.startswith(PACKAGE)
    ]
    assert not offenders, offenders


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        module: {name for name in _imports(path) if name in modules and name not in (module, PACKAGE)}
        for module, path in modules.items()
        if module != PACKAGE  # the package's __init__ re-exports every module: it is the root, not part of a circle
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of the graph as a path (first == last), or None; depth-first search with colours."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_kernel_modules_import_each_other_without_a_circle():
    graph = _graph()
    assert any(graph.values()), "no imports among kernel modules found: the walk is broken"
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_circles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_missing_faiss_is_the_kernels_error_and_the_engines_backend_error(monkeypatch):
    import torch

    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    with pytest.raises(BackendUnavailableError, match="pip install faiss-gpu") as info:
        get_backend("faiss", device=torch.device("cpu"))
    assert isinstance(info.value, KernelError) and isinstance(info.value, ImportError)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    probs = np.full((10, 2), 0.5, dtype=np.float32)
    with pytest.raises(BackendError, match=r"^backend 'faiss' needs the faiss package: pip install") as info:
        discover(
            x,
            np.full(10, 4),
            np.arange(10) % 2,
            probs,
            np.full((40, 2), 0.5, dtype=np.float32),
            config=DiscoverConfig(k=2, strategy="search", backend="faiss"),
        )
    assert str(info.value) == str(info.value.__cause__)
