"""Output paths: refuse to overwrite unless asked, never mix old and new results, never write over an input.

A command's ``--out`` that already holds something is refused unless ``overwrite`` is set. Directory outputs are
written into a staging folder next to ``--out`` and swapped in whole when complete (``staged_dir``), so an
interrupted run leaves the old results (or nothing), never a mixture; file outputs are written to a temporary name
and renamed by their writers.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from ravl_engine.errors import ConfigError
from ravl_engine.runlock import LOCK_NAME

logger = logging.getLogger(__name__)


def _occupied(path: Path) -> bool:
    if path.is_dir():  # a run lock's file alone (ravl_engine.runlock) is no result
        return any(p.name != LOCK_NAME for p in path.iterdir())
    return path.exists() or path.is_symlink()


def check_out(path: str | Path, *, overwrite: bool, option: str = "--out") -> None:
    """Refuse an existing output (a file, or a non-empty directory) unless ``overwrite``.

    Raises:
        ConfigError: the output exists and ``overwrite`` is False (the message names it and the fix).
    """
    path = Path(path)
    if not overwrite and _occupied(path):
        raise ConfigError(f"{option} {path} already exists; pass --overwrite to replace it, or choose another {option}")


def _same(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_not_input(out: str | Path, inputs: Mapping[str, str | Path | None], *, option: str = "--out") -> None:
    """Refuse an output that is one of the inputs (same file by resolved path or inode), even with --overwrite.

    Args:
        out: the output file.
        inputs: option name -> path of each input (None = not given); values that name no file are skipped.

    Raises:
        ConfigError: ``out`` is one of the inputs.
    """
    out = Path(out)
    for name, value in inputs.items():
        if value is not None and str(value) and Path(value).is_file() and _same(out, Path(value)):
            raise ConfigError(f"{option} {out} is the {name} input; write the result to another file")


@contextmanager
def staged_dir(out: str | Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty staging folder next to ``out``; when the block ends without an error, it replaces ``out``.

    The swap is two renames (old ``out`` aside, staging folder in) followed by deleting the old folder, so at every
    moment ``out`` is either the complete old result, absent, or the complete new one. On an error the staging
    folder is removed and ``out`` is left as it was.

    Raises:
        ConfigError: ``out`` exists and is not empty (or is a file) and ``overwrite`` is False.
    """
    out = Path(out)
    check_out(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.with_name(f".{out.name}.staging")
    old = out.with_name(f".{out.name}.old")
    for leftover in (stage, old):  # from an interrupted earlier run
        if leftover.exists():
            shutil.rmtree(leftover)
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.is_dir():
        out.rename(old)
    else:
        _remove(out)
    stage.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def clear_out(out: str | Path, *, overwrite: bool) -> None:
    """Empty ``out`` before a run that writes many outputs into it (the demo), after ``check_out``.

    Raises:
        ConfigError: ``out`` holds something and ``overwrite`` is False.
    """
    out = Path(out)
    check_out(out, overwrite=overwrite)
    _remove(out)


def _remove(path: Path) -> None:
    """Delete a folder with its contents, a file or a link; nothing when ``path`` is absent."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
