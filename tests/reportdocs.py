"""A synthetic discovery.json document with small images on disk, for report tests (no model, no run directory)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def table(rows: list[tuple[str, float, int, float, int]]) -> list[dict[str, Any]]:
    return [
        {"class": c, "acc_present": ap, "n_present": n_p, "acc_absent": aa, "n_absent": n_a}
        for c, ap, n_p, aa, n_a in rows
    ]


AUDIT = {
    "model": {"name": "ravl-tiny-rn", "pretrained": None, "checkpoint_sha256": None},
    "proposer": {
        "name": "quadrants",
        "options": {},
        "max_boxes": None,
        "min_box_size": 1.0,
        "score_threshold": None,
        "whole_image": False,
    },
    "region_mode": "roi",
    "resize": "squash",
    "templates": ["a photo of a {}."],
    "run_dir_data": "/data/eval.csv",
}


def cluster_dict(rank: int, class_name: str | None, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A discovery.json cluster with the given rank, class and table (no names, no regions)."""
    return {
        "rank": rank,
        "cluster_id": rank - 1,
        "class": class_name,
        "gap": 0.5,
        "influence": 0.5,
        "names": [],
        "n_regions": 0,
        "n_images": 0,
        "table": rows,
        "medoid": [1.0, 0.0],
        "regions": [],
    }


def synthetic_document(
    folder: Path,
    *,
    n_clusters: int = 4,
    regions_per_cluster: int = 30,
    n_images: int = 12,
    dim: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """Clusters ranked 1..n with distinct gaps, names and tables; images are 48 x 40 PNGs with a white quadrant box
    at [0, 0, 24, 20] (the region every cluster points at in image 0)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        pixels = rng.integers(0, 120, (40, 48, 3), dtype=np.uint8)
        pixels[:20, :24] = 255
        Image.fromarray(pixels).save(folder / "img" / f"{i:03d}.png")
    k = n_clusters + 2
    medoids = rng.normal(size=(k, dim))
    medoids /= np.linalg.norm(medoids, axis=1, keepdims=True)
    clusters = []
    for r in range(n_clusters):
        regions = [
            {"image": f"img/{j % n_images:03d}.png", "box": [0.0, 0.0, 24.0, 20.0], "similarity": 1.0 - j / 1000}
            for j in range(regions_per_cluster)
        ]
        clusters.append(
            {
                "rank": r + 1,
                "cluster_id": r,
                "class": str(r),
                "gap": [0.9, 0.2, 0.5, 0.7, 0.3, 0.8][r % 6] + r * 1e-3,
                "influence": [0.3, 0.9, 0.1, 0.6, 0.5, 0.2][r % 6] + r * 1e-3,
                "names": [{"phrase": f"phrase {r}-{i}", "score": 0.5 - i / 10} for i in range(5)],
                "n_regions": regions_per_cluster,
                "n_images": min(regions_per_cluster, n_images),
                "table": table([(str(r), 1.0, 10, 0.88, 50), ("9", 0.0, 12, 0.73, 48), ("5", 0.5, 4, 0.5, 40)]),
                "medoid": medoids[r].tolist(),
                "regions": regions,
            }
        )
    return {
        "format": "ravl-engine-discovery/1",
        "k": k,
        "classes": [str(c) for c in range(10)],
        "embedding_dim": dim,
        "audit": AUDIT,
        "naming": {"status": "named", "score": "mean cosine to the cluster's regions minus mean cosine to all regions"},
        "cluster_sizes": [regions_per_cluster] * k,
        "clusters": clusters,
        "medoids": medoids.tolist(),
    }
