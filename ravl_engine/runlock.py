"""One writer per directory: an exclusive OS file lock held for the whole run.

``fcntl.flock`` on ``DIR/.lock``: the kernel releases it when the holding process exits or is killed, so a dead run
never leaves a stale lock (the file stays, with the last holder's pid inside for the message). Under torchrun only
rank 0 takes the lock, for the whole group: the other ranks learn the outcome from rank 0 and never try themselves
(they would conflict with rank 0's lock on the same machine).
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from ravl_engine.distributed import broadcast_object, rank_world
from ravl_engine.errors import ShardError

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"


def _holder(path: Path) -> str:
    try:
        pid = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid else "unknown pid"


def _try_flock(path: Path, operation: int) -> IO[str] | None:
    """The open lock file with ``operation`` (LOCK_EX or LOCK_SH) held, or None when another process holds it."""
    fh = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - the handle outlives this function: it is the lock
    try:
        fcntl.flock(fh, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    return fh


@contextmanager
def directory_lock(directory: str | Path, *, command: str) -> Iterator[None]:
    """Hold the exclusive lock of ``directory`` (created if needed) for the body of the ``with`` block.

    Args:
        directory: the directory written by this run.
        command: what is writing it ("embed", "cluster"), for the message.

    Raises:
        ShardError: another process holds the lock; the message names the directory and the holder's pid.
    """
    directory = Path(directory)
    path = directory / LOCK_NAME
    handle: list[IO[str]] = []

    def acquire() -> str | None:
        directory.mkdir(parents=True, exist_ok=True)
        fh = _try_flock(path, fcntl.LOCK_EX)
        if fh is None:
            return (
                f"{directory} is being written by another process ({_holder(path)}); wait for it to finish, or "
                f"give {command} another --out directory"
            )
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        handle.append(fh)
        return None

    _on_rank0(acquire)
    try:
        yield
    finally:
        for fh in handle:
            fh.close()  # releases the flock


def check_not_being_written(directory: str | Path) -> None:
    """Raise ShardError when a process holds ``directory``'s lock (a run still writing it); return otherwise."""
    path = Path(directory) / LOCK_NAME

    def probe() -> str | None:
        fh = _try_flock(path, fcntl.LOCK_SH) if path.exists() else None
        if fh is not None:
            fh.close()
        elif path.exists():
            return f"{directory} is still being written by embed ({_holder(path)}); wait for it to finish and rerun"
        return None

    _on_rank0(probe)


def _on_rank0(attempt: Callable[[], str | None]) -> None:
    """Run ``attempt`` on rank 0 only and raise its error message (if any) as ShardError on every rank."""
    rank, world = rank_world()
    error = attempt() if rank == 0 else None
    if world > 1:
        error = broadcast_object(error)
    if error is not None:
        raise ShardError(error)
