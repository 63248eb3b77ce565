"""Controlled digit datasets with a planted spurious feature (RaVL's controlled evaluation).

Images are a grid of cells (default 2 x 2 cells of 28 px): one cell holds a digit, another may hold the spurious
feature (a coloured shape), the rest are black. In fine-tuning sets the feature is tied to one class with a requested
Cramer's V; in evaluation sets it appears with probability 0.5 independently of the class. Manifests follow the
embedding engine's format: every row carries the cells as boxes, and evaluation rows also the cells' region labels
(the digit's class name, the feature's name, or "none").

``layout="scene"`` writes larger images (default 112 px) with several objects of varied size at random
non-overlapping positions: the digit (scaled), 1-3 coloured distractor shapes (any shape x colour but the
feature's) in every image, and the feature when present. Every object is listed as a box, so the boxes follow the
objects, not a pooling grid. Region labels: the digit's class name (kind "digit"), the feature's name (kind
"feature") and ``distractor:<color>-<shape>`` (kind "distractor").
"""

from __future__ import annotations

import csv
import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ravl_engine.errors import ConfigError
from ravl_engine.outputs import check_out, staged_dir
from ravl_engine.shards import write_atomic

LAYOUTS = ("quadrants", "scene")
DISTRACTOR_PREFIX = "distractor:"
SHAPES = ("square", "disk", "ring", "triangle", "stripes")
COLORS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
CAPTION_TEMPLATES = (
    "the image shows a {}",
    "the digit appears to be {}",
    "there is an image showing a {}",
    "the number is a {}",
)


def _v_from_counts(a: float, b: float, d: float, e: float) -> float:
    """Cramer's V of the 2 x 2 table [[a, b], [d, e]] (feature present / absent x class / other)."""
    denom = math.sqrt((a + b) * (d + e) * (a + d) * (b + e))
    return abs(a * e - b * d) / denom if denom > 0 else 0.0


def cramers_v(feature: np.ndarray, is_class: np.ndarray) -> float:
    """Cramer's V (= |phi| for a 2 x 2 table) between two boolean arrays; 0 when a margin is empty."""
    f, c = np.asarray(feature, bool), np.asarray(is_class, bool)
    return _v_from_counts(float(np.sum(f & c)), float(np.sum(f & ~c)), float(np.sum(~f & c)), float(np.sum(~f & ~c)))


def feature_counts(n_class: int, n_other: int, target_v: float) -> tuple[int, int]:
    """How many images of the class (x) and of the other classes (y) show the feature so that Cramer's V is closest
    to ``target_v``; among equally close tables, the one with the feature on the most class images."""
    best: tuple[float, int, int] | None = None
    for x in range(1, n_class + 1):
        # with x fixed, V falls as y grows from 0 (while y / n_other < x / n_class): bisect for the target
        lo, hi = 0, n_other * x // n_class
        while lo < hi:
            mid = (lo + hi) // 2
            if _v_from_counts(x, mid, n_class - x, n_other - mid) > target_v:
                lo = mid + 1
            else:
                hi = mid
        for y in (lo - 1, lo):
            if 0 <= y <= n_other:
                gap = abs(_v_from_counts(x, y, n_class - x, n_other - y) - target_v)
                if best is None or gap < best[0] - 1e-12 or (abs(gap - best[0]) <= 1e-12 and x > best[1]):
                    best = (gap, x, y)
    assert best is not None
    return best[1], best[2]


@dataclass(frozen=True, slots=True, kw_only=True)
class SynthConfig:
    """Options of ``ravl-engine synth``.

    Attributes:
        out: output folder (images under ``train/`` and ``eval/``, manifests ``train.csv`` and ``eval.csv``).
        source: "sklearn" (scikit-learn's bundled 8 x 8 digits, upscaled; offline), a folder of MNIST-style idx
            files (``t10k-images-idx3-ubyte.gz`` ...; MNIST or Fashion-MNIST), or "torchvision:mnist" /
            "torchvision:fashion-mnist" (downloaded once through torchvision).
        spurious_class: the class tied to the feature in the fine-tuning set.
        cramers_v: the association strength in the fine-tuning set, in [0, 1); 0 = none (the feature appears with
            probability ``eval_feature_p`` independently of the class, as in a pretraining set).
        n_train, n_eval: images per set.
        classes: the digit classes used (default 0..9).
        shape, color, size: the feature: one of SHAPES, one of COLORS, fraction of the cell (0, 1].
        grid, cell: cells per side and cell size in pixels.
        eval_feature_p: probability of the feature in the evaluation set (independent of the class), and in the
            fine-tuning set when ``cramers_v`` is 0.
        seed: everything is drawn from this seed.
        caption_feature: captions also name the feature where it is shown ("... with a red square"), so that a
            model pretrained on the set has seen the feature words (the naming benchmark's pretraining set).
        layout: "quadrants" (a grid of cells, the default) or "scene" (objects at random non-overlapping positions).
        image_size: side of a scene image in pixels (scene layout only; ``grid`` and ``cell`` are then unused).
            The digit is scaled to 1/4 .. 3/7 of it (28-48 px at 112), the shapes to 1/7 .. 1/4 (16-28 px at 112,
            times ``size`` for the feature).
        overwrite: replace an existing non-empty ``out`` (default: refuse). The setting is written aside and
            swapped in whole, so an interrupted run never leaves old and new files mixed.
    """

    out: str
    source: str = "sklearn"
    spurious_class: int = 0
    cramers_v: float = 0.9
    n_train: int = 2000
    n_eval: int = 500
    classes: tuple[int, ...] = tuple(range(10))
    shape: str = "square"
    color: str = "red"
    size: float = 1.0
    grid: int = 2
    cell: int = 28
    eval_feature_p: float = 0.5
    seed: int = 0
    captions: tuple[str, ...] = field(default=CAPTION_TEMPLATES)
    caption_feature: bool = False
    layout: str = "quadrants"
    image_size: int = 112
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_feature(self.shape, self.color)
        if not 0 <= self.cramers_v < 1:
            raise ConfigError(f"cramers_v must be in [0, 1), got {self.cramers_v}")
        if not 0 < self.size <= 1:
            raise ConfigError(f"size must be in (0, 1], got {self.size}")
        if self.grid < 2:
            raise ConfigError(f"grid must be >= 2 (a digit cell and a feature cell), got {self.grid}")
        if self.cell < 8:
            raise ConfigError(f"cell must be >= 8 pixels, got {self.cell}")
        if self.spurious_class not in self.classes:
            raise ConfigError(f"spurious_class {self.spurious_class} is not among the classes {list(self.classes)}")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"classes must be at least 2 distinct digits, got {list(self.classes)}")
        if self.n_train < 2 * len(self.classes) or self.n_eval < 2 * len(self.classes):
            raise ConfigError(f"n_train and n_eval must be >= 2 per class ({2 * len(self.classes)})")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"unknown layout {self.layout!r}; choose one of {', '.join(LAYOUTS)}")
        if self.layout == "scene" and not 64 <= self.image_size <= 1024:
            raise ConfigError(f"image_size must be in [64, 1024] pixels for the scene layout, got {self.image_size}")
        if not 0 < self.eval_feature_p < 1:
            raise ConfigError(f"eval_feature_p must be in (0, 1), got {self.eval_feature_p}")


def load_digits_source(source: str) -> tuple[np.ndarray, np.ndarray]:
    """Grey digits [N, 28, 28] uint8 and labels [N] from ``source`` ("sklearn" or an idx folder)."""
    if source == "sklearn":
        from sklearn.datasets import load_digits  # noqa: PLC0415

        bunch = load_digits()
        small = (bunch.images / 16.0 * 255).astype(np.float32)  # 8 x 8, 0..255
        import torch  # noqa: PLC0415

        big = torch.nn.functional.interpolate(torch.from_numpy(small)[:, None], size=(28, 28), mode="bilinear")
        return big[:, 0].clamp(0, 255).round().to(torch.uint8).numpy(), bunch.target.astype(np.int64)
    if source in TORCHVISION_SOURCES:
        return _download_torchvision(source)
    from ravl_engine.data import load_mnist  # noqa: PLC0415

    if not Path(source).is_dir():
        raise ConfigError(
            f"--source {source!r} is not 'sklearn', {', '.join(TORCHVISION_SOURCES)} or a folder of idx files"
        )
    try:
        return load_mnist(source)
    except ConfigError:
        return load_mnist(source, split="train")


TORCHVISION_SOURCES = ("torchvision:mnist", "torchvision:fashion-mnist")


def _download_torchvision(source: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST / Fashion-MNIST test split through torchvision's downloader (needs the network once; cached)."""
    from torchvision import datasets  # noqa: PLC0415

    cls = datasets.MNIST if source == "torchvision:mnist" else datasets.FashionMNIST
    root = Path.home() / ".cache" / "ravl-engine" / "torchvision"
    try:
        data = cls(root=str(root), train=False, download=True)
    except Exception as err:  # offline: URLError / RuntimeError from the downloader
        raise ConfigError(
            f"could not download {source} ({type(err).__name__}: {err}); without network use --source sklearn or a "
            "folder of idx files"
        ) from err
    return data.data.numpy().astype(np.uint8), data.targets.numpy().astype(np.int64)


def check_feature(shape: str, color: str) -> None:
    """ConfigError unless ``shape`` is one of SHAPES and ``color`` one of COLORS."""
    if shape not in SHAPES:
        raise ConfigError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    if color not in COLORS:
        raise ConfigError(f"unknown colour {color!r}; choose one of {', '.join(COLORS)}")


def feature_patch(shape: str, color: str, size: int) -> np.ndarray:
    """[size, size, 3] uint8 RGB patch of the shape on black."""
    rgb = np.array(COLORS[color], dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    c = size / 2
    r = np.hypot(xx - c, yy - c)
    if shape == "square":
        mask = np.ones((size, size), bool)
    elif shape == "disk":
        mask = r <= c
    elif shape == "ring":
        mask = (r <= c) & (r >= 0.6 * c)
    elif shape == "triangle":  # apex at the top centre, base along the bottom edge
        mask = yy >= 2 * np.abs(xx - c)
    else:  # stripes
        mask = (np.floor(yy / max(1, size // 7)) % 2) == 0
    patch = np.zeros((size, size, 3), dtype=np.uint8)
    patch[mask] = rgb
    return patch


def _compose(
    digit: np.ndarray, digit_cell: int, feature_cell: int | None, patch: np.ndarray, cfg: SynthConfig
) -> np.ndarray:
    side = cfg.grid * cfg.cell
    img = np.zeros((side, side, 3), dtype=np.uint8)
    dy, dx = divmod(digit_cell, cfg.grid)
    if cfg.cell != 28:
        import torch  # noqa: PLC0415

        t = torch.nn.functional.interpolate(
            torch.from_numpy(digit).float()[None, None], size=(cfg.cell, cfg.cell), mode="bilinear"
        )
        digit = t[0, 0].clamp(0, 255).round().to(torch.uint8).numpy()
    img[dy * cfg.cell : (dy + 1) * cfg.cell, dx * cfg.cell : (dx + 1) * cfg.cell] = digit[:, :, None]
    if feature_cell is not None:
        fy, fx = divmod(feature_cell, cfg.grid)
        off = (cfg.cell - patch.shape[0]) // 2
        y0, x0 = fy * cfg.cell + off, fx * cfg.cell + off
        img[y0 : y0 + patch.shape[0], x0 : x0 + patch.shape[1]] = patch
    return img


def _cells(cfg: SynthConfig) -> list[list[int]]:
    return [
        [c * cfg.cell, r * cfg.cell, (c + 1) * cfg.cell, (r + 1) * cfg.cell]
        for r in range(cfg.grid)
        for c in range(cfg.grid)
    ]


def _scene(
    digit: np.ndarray, label: str, present: bool, feature_name: str, cfg: SynthConfig, rng: np.random.Generator
) -> tuple[np.ndarray, list[list[int]], list[str]]:
    """One scene image: the digit, the feature if ``present``, 1-3 distractors; with their boxes and labels."""
    from PIL import Image  # noqa: PLC0415

    side = cfg.image_size
    d = int(rng.integers(side // 4, 3 * side // 7 + 1))
    grey = np.asarray(Image.fromarray(digit).resize((d, d), Image.Resampling.BILINEAR))
    patches = [np.repeat(grey[:, :, None], 3, axis=2)]
    labels = [label]
    lo, hi = max(8, side // 7), max(8, side // 4)
    if present:
        patches.append(feature_patch(cfg.shape, cfg.color, max(4, round(int(rng.integers(lo, hi + 1)) * cfg.size))))
        labels.append(feature_name)
    pairs = [(c, s) for s in SHAPES for c in COLORS if (c, s) != (cfg.color, cfg.shape)]
    for _ in range(int(rng.integers(1, 4))):
        color, shape = pairs[int(rng.integers(len(pairs)))]
        patches.append(feature_patch(shape, color, int(rng.integers(lo, hi + 1))))
        labels.append(f"{DISTRACTOR_PREFIX}{color}-{shape}")
    boxes = place_boxes([p.shape[0] for p in patches], side, rng)
    img = np.zeros((side, side, 3), dtype=np.uint8)
    for (x1, y1, x2, y2), patch in zip(boxes, patches, strict=True):
        img[y1:y2, x1:x2] = patch
    return img, boxes, labels


def boxes_apart(a: Sequence[float], b: Sequence[float], gap: float = 2) -> bool:
    """Whether boxes ``[x1, y1, x2, y2]`` are at least ``gap`` pixels apart along x or along y."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def place_boxes(
    sides: Sequence[int], size: int, rng: np.random.Generator, taken: Sequence[Sequence[float]] = ()
) -> list[list[int]]:
    """Random positions for squares of the given sides in a ``size`` px image, apart from each other and from
    ``taken`` (rejection sampling, deterministic for a generator state).

    Raises:
        ConfigError: no such placement found (the objects do not fit); the fix is a larger image.
    """
    for _ in range(200):
        boxes: list[list[int]] = []
        for s in sides:
            for _ in range(100):
                x, y = (int(v) for v in rng.integers(0, size - s + 1, 2))
                box = [x, y, x + s, y + s]
                if all(boxes_apart(box, b) for b in [*taken, *boxes]):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == len(sides):
            return boxes
    raise ConfigError(
        f"cannot place objects of sizes {list(sides)} apart in a {size} px image; use a larger image_size"
    )


@dataclass(frozen=True)
class SynthResult:
    """What synth wrote and the realised association."""

    train_manifest: str
    eval_manifest: str
    n_train: int
    n_eval: int
    realised_cramers_v_train: float
    realised_cramers_v_eval: float
    feature: str

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict  # noqa: PLC0415

        return asdict(self)


def run_synth(cfg: SynthConfig) -> SynthResult:
    """Write the fine-tuning and evaluation sets of one controlled setting.

    Raises:
        ConfigError: bad options, an existing non-empty ``out`` without ``overwrite``, an unreadable source, or a
            class with too few source digits for the request (checked before any file is written).
    """
    check_out(cfg.out, overwrite=cfg.overwrite)
    digits, labels = load_digits_source(cfg.source)
    rng = np.random.default_rng(cfg.seed)
    classes = list(cfg.classes)
    pools = {c: np.flatnonzero(labels == c) for c in classes}
    for c, pool in pools.items():
        if pool.size < 2:
            raise ConfigError(f"source {cfg.source!r} has {pool.size} images of class {c}; each class needs at least 2")
    # disjoint digit images for the two sets: the first 70% of each class pool trains, the rest evaluates
    split = {c: (p[: max(1, int(0.7 * p.size))], p[max(1, int(0.7 * p.size)) :]) for c, p in pools.items()}
    patch = feature_patch(cfg.shape, cfg.color, max(2, round(cfg.size * cfg.cell)))
    feature_name = f"{cfg.color} {cfg.shape}"
    out = Path(cfg.out)
    with staged_dir(out, overwrite=cfg.overwrite) as stage:
        realised = _write_sets(cfg, stage, digits, split, patch, feature_name, rng)
    return SynthResult(
        train_manifest=str(out / "train.csv"),
        eval_manifest=str(out / "eval.csv"),
        n_train=cfg.n_train,
        n_eval=cfg.n_eval,
        realised_cramers_v_train=realised["train"],
        realised_cramers_v_eval=realised["eval"],
        feature=feature_name,
    )


def _write_sets(
    cfg: SynthConfig,
    out: Path,
    digits: np.ndarray,
    split: dict[int, tuple[np.ndarray, np.ndarray]],
    patch: np.ndarray,
    feature_name: str,
    rng: np.random.Generator,
) -> dict[str, float]:
    """Write both sets' images and manifests into ``out``; returns the realised Cramer's V of each."""
    from PIL import Image  # noqa: PLC0415

    classes = list(cfg.classes)
    cells = _cells(cfg)
    n_cells = cfg.grid * cfg.grid
    realised = {}
    for part, n in (("train", cfg.n_train), ("eval", cfg.n_eval)):
        y = np.array([classes[i % len(classes)] for i in range(n)])
        rng.shuffle(y)
        is_class = y == cfg.spurious_class
        if part == "train" and cfg.cramers_v > 0:
            x, z = feature_counts(int(is_class.sum()), int((~is_class).sum()), cfg.cramers_v)
            present = np.zeros(n, bool)
            present[rng.choice(np.flatnonzero(is_class), x, replace=False)] = True
            present[rng.choice(np.flatnonzero(~is_class), z, replace=False)] = True
        else:
            present = rng.random(n) < cfg.eval_feature_p
        realised[part] = cramers_v(present, is_class)
        (out / part).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n):
            pool = split[int(y[i])][0 if part == "train" else 1]
            digit = digits[int(rng.choice(pool))]
            if cfg.layout == "scene":
                img, boxes, region_labels = _scene(digit, str(int(y[i])), bool(present[i]), feature_name, cfg, rng)
            else:
                order = rng.permutation(n_cells)
                feature_cell = int(order[1]) if present[i] else None
                img = _compose(digit, int(order[0]), feature_cell, patch, cfg)
                boxes = cells
                region_labels = ["none"] * n_cells
                region_labels[int(order[0])] = str(int(y[i]))
                if feature_cell is not None:
                    region_labels[feature_cell] = feature_name
            name = f"{part}/{i:06d}.png"
            Image.fromarray(img).save(out / name)
            row = {
                "image": name,
                "label": str(int(y[i])),
                "caption": cfg.captions[int(rng.integers(len(cfg.captions)))].format(int(y[i]))
                + (f" with a {feature_name}" if cfg.caption_feature and present[i] else ""),
                "split": part,
            }
            row["boxes"] = json.dumps(boxes)  # so that both sets can use the manifest proposer
            if part == "eval":
                row["region_labels"] = json.dumps(region_labels)
            rows.append(row)
        path = out / f"{part}.csv"
        write_atomic(path, functools.partial(write_csv, rows=rows))
    return realised


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], fieldnames: Sequence[str] | None = None) -> None:
    """A manifest CSV: a header (``fieldnames``, default the first row's keys), then one line per row."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fieldnames if fieldnames is not None else rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def class_names(classes: Sequence[int]) -> list[str]:
    return [str(c) for c in classes]
