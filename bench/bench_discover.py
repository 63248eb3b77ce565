"""Discovery benchmark: ravl-engine's discover() on planted spurious-feature embeddings.

Prints one JSON line per configuration (regions x dims): median / IQR seconds over ``--repeats`` runs, regions/s,
peak RSS of the process, the chosen K, the top cluster's Precision@10 against the planted feature, and, for sizes
up to ``--dense-max``, the time of a straightforward dense implementation of the same semantics (N x N cosine
matrix, scikit-learn silhouette, per-cluster Python loops as in the released RaVL code) and the speed-up.

Each configuration runs in its own subprocess so that the peak RSS is its own.

    python -m bench.bench_discover                       # 4000x256, 20000x256, 100000x512, 1000000x512
    python -m bench.bench_discover --configs 4000x256 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

DEFAULT_CONFIGS = "4000x256,20000x256,100000x512,1000000x512"


def _parse_config(text: str) -> tuple[int, int]:
    try:
        regions, dim = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise SystemExit(f"--configs: {text!r} is not REGIONSxDIMS (e.g. 4000x256)") from err
    return regions, dim


def _quartiles(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from ravl_engine import DiscoverConfig, discover  # noqa: PLC0415
    from ravl_engine.planted import planted_embeddings, precision_at_k  # noqa: PLC0415

    regions, dim = _parse_config(args.configs)
    t0 = time.perf_counter()
    data = planted_embeddings(regions, dim=dim, num_classes=args.classes, seed=args.seed)
    gen_seconds = time.perf_counter() - t0
    inputs = (data.region_embeddings, data.num_regions, data.image_labels, data.image_scores, data.region_scores)
    cfg = DiscoverConfig(strategy=args.strategy, device=args.device, memory_budget_mb=args.memory_budget_mb)

    for _ in range(args.warmup):
        discover(*inputs, seed=args.seed, config=cfg)
    times, result = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        result = discover(*inputs, seed=args.seed, config=cfg)
        if args.device and args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    assert result is not None
    top = result.clusters[0] if result.clusters else None
    line: dict[str, Any] = {
        "bench": "discover",
        "device": args.device or "cpu",
        "machine": f"{platform.machine()} {os.cpu_count()} cpu",
        "torch": torch.__version__,
        "shape": [int(data.region_embeddings.shape[0]), dim],
        "classes": args.classes,
        "dtype": str(data.region_embeddings.dtype),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "ms_median": 1000 * statistics.median(times),
        "ms_iqr": 1000 * _quartiles(times),
        "items_per_s": data.region_embeddings.shape[0] / statistics.median(times),
        "k": result.k,
        "clusters_kept": len(result.clusters),
        "top_class": top.class_index if top else None,
        "spurious_class": data.spurious_class,
        "precision_at_10": precision_at_k(top.region_indices, data.region_kind, 10) if top else 0.0,
        "timings": result.timings,
        "generate_s": gen_seconds,
    }
    if regions <= args.dense_max:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from tests.oracles import dense_discover  # noqa: PLC0415

        dense_times, dense = [], None
        for _ in range(args.dense_repeats):
            t0 = time.perf_counter()
            dense = dense_discover(*inputs, seed=args.seed)
            dense_times.append(time.perf_counter() - t0)
        assert dense is not None
        line["dense_ms_median"] = 1000 * statistics.median(dense_times)
        line["dense_repeats"] = args.dense_repeats
        line["speedup"] = statistics.median(dense_times) / statistics.median(times)
        line["same_k"] = dense.k == result.k
        line["same_top_cluster"] = bool(
            dense.ranked_regions and top is not None and dense.ranked_regions[0] == top.region_indices.tolist()
        )
        line["dense_precision_at_10"] = (
            precision_at_k(np.asarray(dense.ranked_regions[0]), data.region_kind, 10) if dense.ranked_regions else 0.0
        )
    line["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated REGIONSxDIMS")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of discover() per configuration")
    parser.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="untimed runs before the timed ones (the first 2-3 runs of a process "
        "are 10-30%% slower while the allocator grows)",
    )
    parser.add_argument("--dense-max", type=int, default=8000, help="run the dense baseline up to this many regions")
    parser.add_argument("--dense-repeats", type=int, default=1)
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda")
    parser.add_argument("--strategy", default="auto", choices=["auto", "cached", "search"])
    parser.add_argument("--memory-budget-mb", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(run_child(args)), flush=True)
        return
    for config in args.configs.split(","):
        _parse_config(config)
        cmd = [sys.executable, "-m", "bench.bench_discover", "--child", "--configs", config]
        names = ("classes", "repeats", "warmup", "dense_max", "dense_repeats", "strategy", "memory_budget_mb", "seed")
        for name in names:
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        if args.device:
            cmd += ["--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(json.dumps({"bench": "discover", "config": config, "error": out.stderr.strip()[-2000:]}))
            continue
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
