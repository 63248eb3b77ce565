"""Launch a test body on several CPU processes joined in a gloo process group."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(body: Callable[..., None], rank: int, world: int, port: int, group_timeout: float, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # the ranks share the machine's cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=group_timeout))
    try:
        body(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(
    body: Callable[..., None], *args: Any, world: int = 2, timeout: float = 300, group_timeout: float = 60
) -> list[int]:
    """Run ``body(rank, world, *args)`` in ``world`` spawned processes of one gloo group; their exit codes.

    ``body`` must be a module-level function (it is pickled into the children).
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(body, r, world, port, group_timeout, args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    return [p.exitcode for p in procs]
