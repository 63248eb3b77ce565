"""Shared fixtures: seeded synthetic embeddings and scores; everything offline and on CPU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one thread per worker, not 2 x 2 on 2 cores
    torch.set_num_threads(1)


def unit_rows(n: int, d: int, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """n random unit vectors in d dims."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=1).to(dtype)


def clustered_rows(
    n: int, d: int, centers: int, *, spread: float = 0.4, seed: int = 0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """n unit vectors around ``centers`` random directions (a clustering with a clear answer)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.nn.functional.normalize(torch.randn(centers, d, generator=g, dtype=torch.float64), dim=1)
    which = torch.randint(centers, (n,), generator=g)
    x = protos[which] + spread * torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5
    return torch.nn.functional.normalize(x, dim=1).to(dtype)


def random_scores(n: int, c: int, *, seed: int = 0, sharp: float = 2.0) -> np.ndarray:
    """[n, c] softmax probabilities."""
    rng = np.random.default_rng(seed)
    logits = sharp * rng.standard_normal((n, c))
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


@pytest.fixture
def planted_small():
    from ravl_engine.planted import planted_embeddings

    return planted_embeddings(1200, dim=32, num_classes=4, seed=3)


def pytest_configure(config):
    from hypothesis import settings

    # CI runs a fixed example sequence so a red build always reproduces; locally hypothesis explores freely
    settings.register_profile("dev", max_examples=60)
    settings.register_profile("ci", max_examples=60, derandomize=True)
    settings.register_profile("explore", max_examples=2000)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


MNIST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "mnist")  # 20 test digits per class


def write_digit_dataset(
    folder, n_images: int = 24, *, seed: int = 0, classes=("0", "1", "2"), fmt: str = "csv", mnist_dir=None
):
    """Small controlled digit set on disk: 56 x 56 PNGs, a digit in one quadrant and a red square (p = 0.5) in another,
    with a manifest listing label, caption, quadrant boxes and region labels. Returns the manifest path."""
    import csv
    import json
    from pathlib import Path

    from PIL import Image

    folder = Path(folder)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    from ravl_engine.data import load_mnist

    digits, digit_labels = load_mnist(mnist_dir or MNIST_DIR)
    quads = [[0, 0, 28, 28], [28, 0, 56, 28], [0, 28, 28, 56], [28, 28, 56, 56]]
    rows = []
    for i in range(n_images):
        label = str(classes[i % len(classes)])
        pool = np.flatnonzero(digit_labels == int(label)) if label.isdigit() else np.arange(len(digits))
        digit = digits[int(rng.choice(pool if pool.size else np.arange(len(digits))))]
        canvas = np.zeros((56, 56, 3), dtype=np.uint8)
        slots = rng.permutation(4)
        x1, y1, _, _ = quads[slots[0]]
        canvas[y1 : y1 + 28, x1 : x1 + 28] = digit[:, :, None]
        region_labels = ["none"] * 4
        region_labels[slots[0]] = label
        if rng.random() < 0.5:
            sx, sy, _, _ = quads[slots[1]]
            canvas[sy : sy + 28, sx : sx + 28, 0] = 255
            region_labels[slots[1]] = "square"
        name = f"img/{i:04d}.png"
        Image.fromarray(canvas).save(folder / name)
        rows.append(
            {
                "image": name,
                "label": label,
                "caption": f"the digit {label}",
                "boxes": json.dumps(quads),
                "region_labels": json.dumps(region_labels),
            }
        )
    path = folder / f"manifest.{fmt}"
    if fmt == "csv":
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text(
            "".join(
                json.dumps({**r, "boxes": json.loads(r["boxes"]), "region_labels": json.loads(r["region_labels"])})
                + "\n"
                for r in rows
            )
        )
    return path


def minimal_discovery(*, model: dict | None = None, resize: str = "squash", run_dir_data: str | None = None) -> dict:
    """A complete, tagged discovery.json document (2 classes, k = 2, one ranked cluster without regions) for tests
    that only need mitigate or evaluate to get past reading it."""
    from tests.reportdocs import AUDIT, cluster_dict

    return {
        "format": "ravl-engine-discovery/1",
        "k": 2,
        "classes": ["a", "b"],
        "embedding_dim": 2,
        "audit": {**AUDIT, "model": model or AUDIT["model"], "resize": resize, "run_dir_data": run_dir_data},
        "clusters": [cluster_dict(1, "a", [])],
        "medoids": [[1.0, 0.0], [0.0, 1.0]],
    }
