"""Distributed discovery benchmark: the sharded K-medoids discovery on N ranks (gloo, CPU) vs one process.

The planted set (``ravl_engine.planted.planted_embeddings``) is generated once and saved; every rank memory-maps it
and copies only its contiguous share of the region embeddings (the other arrays are small and whole on every rank),
as ``ravl-engine cluster`` does under torchrun. Prints one JSON line per world size: wall seconds from the first
collective to the result, each rank's peak RSS, the chosen K, the top cluster's Precision@10 against the planted
feature, and whether the ranking equals the world-size-1 run of the same code.

    python -m bench.bench_distributed                           # 1,000,000 x 512, world sizes 1 and 2
    python -m bench.bench_distributed --regions 100000 --dim 256 --ranks 1,2
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import resource
import socket
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, folder: str, threads: int, seed: int) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist

    from ravl_engine.config import DiscoverConfig
    from ravl_engine.discover import run_discover
    from ravl_engine.distributed import TorchComm

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(hours=2))
    small = np.load(Path(folder) / "small.npz")
    x_all = np.load(Path(folder) / "x.npy", mmap_mode="r")
    bounds = np.linspace(0, x_all.shape[0], world + 1).astype(int)
    mine = np.array(x_all[bounds[rank] : bounds[rank + 1]])
    del x_all
    dist.barrier()
    t0 = time.perf_counter()
    result = run_discover(
        DiscoverConfig(strategy="sharded"),
        mine,
        small["num_regions"],
        small["image_labels"],
        small["image_scores"],
        small["region_scores"],
        seed=seed,
        comm=TorchComm(),
    )
    seconds = time.perf_counter() - t0
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
    peaks = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(peaks, peak)
    if rank == 0:
        top = result.clusters[0].region_indices if result.clusters else np.zeros(0, np.int64)
        kind = small["region_kind"]
        out = {
            "seconds": seconds,
            "peak_rss_mb_per_rank": [round(float(p), 1) for p in peaks],
            "k": result.k,
            "precision_at_10": float((kind[top[:10]] == 2).mean()) if top.size else 0.0,
            "ranking": [int(c.cluster_id) for c in result.clusters],
            "top_regions": top[:50].tolist(),
        }
        (Path(folder) / f"result-{world}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regions", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--ranks", default="1,2", help="world sizes to run, comma-separated")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per rank (default: cores / ranks)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from ravl_engine.planted import planted_embeddings

    with tempfile.TemporaryDirectory() as folder:
        data = planted_embeddings(args.regions, dim=args.dim, num_classes=args.classes, seed=args.seed)
        np.save(Path(folder) / "x.npy", data.region_embeddings)
        np.savez(
            Path(folder) / "small.npz",
            num_regions=data.num_regions,
            image_labels=data.image_labels,
            image_scores=data.image_scores,
            region_scores=data.region_scores,
            region_kind=data.region_kind,
        )
        del data
        reference = None
        for world in (int(w) for w in args.ranks.split(",")):
            threads = args.threads or max(1, (os.cpu_count() or 1) // world)
            ctx = mp.get_context("spawn")
            port = _free_port()
            t0 = time.perf_counter()
            procs = [ctx.Process(target=_rank, args=(r, world, port, folder, threads, args.seed)) for r in range(world)]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            wall = time.perf_counter() - t0
            if any(p.exitcode != 0 for p in procs):
                print(json.dumps({"bench": "discover-distributed", "ranks": world, "error": "a rank failed"}))
                continue
            res = json.loads((Path(folder) / f"result-{world}.json").read_text())
            reference = reference or res
            print(
                json.dumps(
                    {
                        "bench": "discover-distributed",
                        "device": "cpu",
                        "torch": torch.__version__,
                        "shape": [args.regions, args.dim],
                        "ranks": world,
                        "threads_per_rank": threads,
                        "seconds": res["seconds"],
                        "wall_seconds_with_start_and_load": wall,
                        "peak_rss_mb_per_rank": res["peak_rss_mb_per_rank"],
                        "k": res["k"],
                        "precision_at_10": res["precision_at_10"],
                        "same_ranking_as_first": res["ranking"] == reference["ranking"]
                        and res["top_regions"] == reference["top_regions"],
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
