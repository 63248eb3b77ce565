"""Report benchmark: size of report.html and its load time in headless Chromium for a large discovery result.

A synthetic discovery.json document (``--regions`` regions spread over ``--clusters`` ranked clusters, K = twice
that, 512-dim medoids) pointing at ``--images`` small noisy PNGs (noise is the worst case for JPEG); the report
embeds only the top regions of each cluster, so its size should not depend on ``--regions``. Load time is the
navigation's loadEventEnd (Chromium's Performance API), median of ``--repeats`` loads. One JSON line.

    python -m bench.bench_report --regions 1000000 --clusters 50
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _document(folder: Path, *, regions: int, clusters: int, images: int, dim: int, seed: int = 0) -> dict:
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True)
    for i in range(images):
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(folder / "img" / f"{i:05d}.png")
    k = 2 * clusters
    medoids = rng.normal(size=(k, dim))
    medoids /= np.linalg.norm(medoids, axis=1, keepdims=True)
    per = regions // clusters
    table = [
        {"class": str(c), "acc_present": float(rng.random()), "n_present": 50, "acc_absent": float(rng.random()),
         "n_absent": 500}
        for c in range(10)
    ]  # fmt: skip
    proposer = {"name": "quadrants", "options": {}, "max_boxes": None, "min_box_size": 1.0, "score_threshold": None,
                "whole_image": False}  # fmt: skip
    return {
        "format": "ravl-engine-discovery/1",
        "k": k,
        "classes": [str(c) for c in range(10)],
        "embedding_dim": dim,
        "audit": {
            "model": {"name": "ravl-tiny-rn", "pretrained": None, "checkpoint_sha256": None},
            "proposer": proposer,
            "region_mode": "roi",
            "resize": "squash",
            "templates": ["a photo of a {}."],
            "run_dir_data": str(folder / "eval.csv"),
        },  # fmt: skip
        "naming": {"status": "named", "score": "synthetic"},
        "cluster_sizes": [per] * k,
        "medoids": medoids.tolist(),
        "clusters": [
            {
                "rank": r + 1,
                "cluster_id": r,
                "class": str(r % 10),
                "gap": 1.0 - r / clusters,
                "influence": float(rng.random()),
                "names": [{"phrase": f"phrase {i}", "score": 0.1 / (i + 1)} for i in range(5)],
                "n_regions": per,
                "n_images": min(per, images),
                "table": table,
                "medoid": medoids[r].tolist(),
                "regions": [
                    {"image": f"img/{(r * per + j) % images:05d}.png", "box": [8.0, 8.0, 72.0, 64.0], "similarity": 0.9}
                    for j in range(per)
                ],
            }
            for r in range(clusters)
        ],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regions", type=int, default=1_000_000)
    parser.add_argument("--clusters", type=int, default=50)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from ravl_engine.documents import Discovery
    from ravl_engine.report import write_report

    folder = Path(tempfile.mkdtemp(prefix="ravl-bench-report-"))
    try:
        doc = Discovery.from_dict(
            _document(folder, regions=args.regions, clusters=args.clusters, images=args.images, dim=args.dim)
        )
        t0 = time.perf_counter()
        path = write_report(doc, folder / "report.html", image_folder=folder)
        render_s = time.perf_counter() - t0
        line = {
            "bench": "report",
            "regions": args.regions,
            "clusters": args.clusters,
            "html_bytes": path.stat().st_size,
            "render_s": round(render_s, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        }
        line.update(_load_times(path, args.repeats))
        print(json.dumps(line))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _load_times(path: Path, repeats: int) -> dict:
    """Median loadEventEnd in ms over fresh loads, and the images that decoded; empty without a browser."""
    driver_path = shutil.which("chromedriver")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if driver_path is None or binary is None:
        return {"load_ms": None, "note": "no chromium/chromedriver"}
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.binary_location = binary
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        times = []
        for _ in range(repeats):
            browser.get("about:blank")
            browser.get(path.resolve().as_uri())
            times.append(browser.execute_script("return performance.getEntriesByType('navigation')[0].loadEventEnd"))
        decoded = browser.execute_script("return [...document.images].filter(i => i.naturalWidth > 0).length")
        total = browser.execute_script("return document.images.length")
    finally:
        browser.quit()
    return {"load_ms": round(statistics.median(times)), "load_ms_all": [round(t) for t in times],
            "images": total, "images_decoded": decoded}  # fmt: skip


if __name__ == "__main__":
    main()
