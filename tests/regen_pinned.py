"""Pinned discovery outputs: what ``tests/test_pinned.py`` compares today's code against.

The golden file ``tests/assets/pinned/discovery.json`` was written by this module with the code as it stood before a
refactor; rerun it only when a change of discovery's results is intended (and say so in the commit):

    python -m tests.regen_pinned
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

GOLDEN = Path(__file__).parent / "assets" / "pinned" / "discovery.json"
PREFIX = 20  # region indices pinned per ranked cluster

# name -> (planted_embeddings arguments, DiscoverConfig arguments); 4000x256 seed 0 is bench_discover's first input
_SMALL = {"n_regions": 2000, "dim": 64, "num_classes": 10, "seed": 1}
PLANTED_CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "planted_4000x256_auto": ({"n_regions": 4000, "dim": 256, "num_classes": 10, "seed": 0}, {}),
    "planted_2000x64_cached": (_SMALL, {"strategy": "cached"}),
    "planted_2000x64_search": (_SMALL, {"strategy": "search"}),
    "planted_2000x64_sharded": (_SMALL, {"strategy": "sharded"}),
}
RUN_DIR_CASE = "run_dir_digits"


def _float(v: float) -> float | str:
    v = float(v)
    return v if math.isfinite(v) else repr(v)  # JSON has no inf; "-inf" round-trips through float()


def summarize(result: Any) -> dict[str, Any]:
    """The pinned part of a DiscoveryResult: K, ids, ranked clusters (class, gap, influence, first regions), medoids."""
    return {
        "k": int(result.k),
        "silhouettes": {str(k): _float(v) for k, v in sorted(result.silhouettes.items())},
        "medoids": [int(m) for m in result.medoids],
        "cluster_sizes": np.bincount(result.assignments, minlength=result.k).tolist(),
        "assignments": [int(a) for a in result.assignments],
        "gap_total": [_float(g) for g in result.gap_total],
        "influence": [_float(h) for h in result.influence],
        "clusters": [
            {
                "rank": c.rank,
                "cluster_id": c.cluster_id,
                "class_index": c.class_index,
                "gap": _float(round(c.gap, 6)),
                "influence": _float(round(c.influence, 6)),
                "medoid": c.medoid,
                "n_regions": int(c.region_indices.shape[0]),
                "regions": [int(r) for r in c.region_indices[:PREFIX]],
                "similarities": [_float(s) for s in c.similarities[:PREFIX]],
            }
            for c in result.clusters
        ],
    }


def planted_case(name: str) -> dict[str, Any]:
    from ravl_engine import DiscoverConfig, discover  # noqa: PLC0415
    from ravl_engine.planted import planted_embeddings  # noqa: PLC0415

    data_kw, cfg_kw = PLANTED_CASES[name]
    data = planted_embeddings(**data_kw)
    result = discover(
        data.region_embeddings,
        data.num_regions,
        data.image_labels,
        data.image_scores,
        data.region_scores,
        seed=0,
        config=DiscoverConfig(**cfg_kw),
    )
    return summarize(result)


def run_dir_case(folder: Path) -> dict[str, Any]:
    """embed (tiny random-init model) + cluster (default K sweep) on 30 digit images from tests/assets/mnist."""
    from ravl_engine.cluster import ClusterConfig, run_cluster  # noqa: PLC0415
    from ravl_engine.embed import EmbedConfig, run_embed  # noqa: PLC0415
    from tests.conftest import write_digit_dataset  # noqa: PLC0415

    manifest = write_digit_dataset(folder / "digits", n_images=30)
    run_embed(EmbedConfig(data=str(manifest), out=str(folder / "run"), shard_size=8, batch_size=4))
    cfg = ClusterConfig(run_dir=str(folder / "run"), out=str(folder / "out"), report=False, names=False)
    result = run_cluster(cfg)
    doc = result.document
    out = summarize(result.discovery)
    out["document"] = {
        "format": doc["format"],
        "k": doc["k"],
        "classes": doc["classes"],
        "cluster_sizes": doc["cluster_sizes"],
        "clusters": [
            {"rank": c["rank"], "cluster_id": c["cluster_id"], "class": c["class"], "n_images": c["n_images"]}
            for c in doc["clusters"]
        ],
    }
    return out


def compute_all() -> dict[str, Any]:
    cases = {name: planted_case(name) for name in PLANTED_CASES}
    with tempfile.TemporaryDirectory() as tmp:
        cases[RUN_DIR_CASE] = run_dir_case(Path(tmp))
    return cases


def main() -> None:
    cases = compute_all()
    # one case per line: a regenerated golden diffs by case
    body = ",\n".join(f"{json.dumps(name)}: {json.dumps(case)}" for name, case in cases.items())
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text("{\n" + body + "\n}\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)


if __name__ == "__main__":
    main()
