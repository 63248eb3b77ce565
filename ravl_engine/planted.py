"""Controlled data with a known answer.

``planted_embeddings`` builds discovery inputs (region embeddings and zero-shot scores) in which a "spurious
feature" region, present in about half the images independently of the class, pushes the zero-shot prediction
toward one class, as in RaVL's controlled evaluation: the spurious class is more accurate with the feature, the
other classes less. Region kinds are returned so the discovered top cluster can be checked (Precision@k).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KIND_BACKGROUND, KIND_OBJECT, KIND_FEATURE = 0, 1, 2


@dataclass(frozen=True, slots=True)
class PlantedSet:
    """Discovery inputs with ground truth.

    Attributes:
        region_embeddings: [R, D] float32 (or the requested dtype), unit rows.
        num_regions: [N] int64, regions per image.
        image_labels: [N] int64, true classes.
        image_scores: [N, C] float32, zero-shot softmax probabilities.
        region_scores: [R, C] float32, zero-shot softmax probabilities.
        region_kind: [R] int8: 0 background, 1 the class object (digit), 2 the spurious feature.
        feature_present: [N] bool.
        spurious_class: the class the feature is tied to.
    """

    region_embeddings: np.ndarray
    num_regions: np.ndarray
    image_labels: np.ndarray
    image_scores: np.ndarray
    region_scores: np.ndarray
    region_kind: np.ndarray
    feature_present: np.ndarray
    spurious_class: int


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def precision_at_k(region_indices: np.ndarray, region_kind: np.ndarray, k: int = 10) -> float:
    """Fraction of the first ``k`` ranked regions that are the planted feature (fewer than k: of those there)."""
    top = np.asarray(region_indices)[:k]
    return float((region_kind[top] == KIND_FEATURE).mean()) if top.size else 0.0


def planted_embeddings(
    n_regions: int = 4000,
    *,
    dim: int = 256,
    num_classes: int = 10,
    regions_per_image: int = 4,
    spurious_class: int = 0,
    p_feature: float = 0.5,
    noise: float = 0.7,
    feature_boost: float = 2.0,
    n_background: int = 3,
    seed: int = 0,
    dtype: type = np.float32,
    chunk_size: int = 65536,
) -> PlantedSet:
    """Planted spurious-feature embeddings and scores.

    Each image has ``regions_per_image`` regions: one object region of its class, the feature region with
    probability ``p_feature`` (independent of the class), background for the rest. Region embeddings are a
    prototype of their kind (one per class, one feature, ``n_background`` backgrounds) plus Gaussian noise of norm
    about ``noise``, L2-normalised. The image logits favour the true class and add ``feature_boost`` to the
    spurious class when the feature is present.

    Args:
        n_regions: total regions R (rounded down to a multiple of ``regions_per_image``).
        dim: embedding dimension D.
        num_classes: C.
        regions_per_image: regions per image, >= 2.
        spurious_class: class tied to the feature.
        p_feature: probability an image shows the feature.
        noise: within-kind spread.
        feature_boost: logit added to the spurious class when the feature is present.
        n_background: number of background prototypes.
        seed: numpy seed; same seed, same arrays.
        dtype: embedding dtype.
        chunk_size: regions generated at once (bounds the temporary memory).

    Returns:
        PlantedSet.
    """
    if regions_per_image < 2:
        raise ValueError(f"regions_per_image must be >= 2, got {regions_per_image}")
    if not 0 <= spurious_class < num_classes:
        raise ValueError(f"spurious_class must be in [0, {num_classes}), got {spurious_class}")
    n_images = n_regions // regions_per_image
    if n_images < 1:
        raise ValueError(f"n_regions must be >= regions_per_image ({regions_per_image}), got {n_regions}")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n_images)
    present = rng.random(n_images) < p_feature

    # region layout per image: slot 0 object, slot 1 feature (if present) else background, rest background
    layout = np.full((n_images, regions_per_image), KIND_BACKGROUND, dtype=np.int8)
    layout[:, 0] = KIND_OBJECT
    layout[present, 1] = KIND_FEATURE
    # shuffle slots so the feature is not always the second region of its image
    order = np.argsort(rng.random((n_images, regions_per_image)), axis=1)
    kind = np.take_along_axis(layout, order, axis=1).reshape(-1)
    r = kind.shape[0]

    protos = _unit(rng, num_classes + 1 + n_background, dim).astype(np.float32)
    proto_id = np.empty(r, dtype=np.int64)
    region_label = np.repeat(labels, regions_per_image)
    proto_id[kind == KIND_OBJECT] = region_label[kind == KIND_OBJECT]
    proto_id[kind == KIND_FEATURE] = num_classes
    n_bg = int((kind == KIND_BACKGROUND).sum())
    proto_id[kind == KIND_BACKGROUND] = num_classes + 1 + rng.integers(0, n_background, n_bg)

    emb: np.ndarray = np.empty((r, dim), dtype=dtype)
    for start in range(0, r, chunk_size):
        stop = min(r, start + chunk_size)
        block = rng.standard_normal((stop - start, dim), dtype=np.float32)
        block *= noise / np.sqrt(dim)
        block += protos[proto_id[start:stop]]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        emb[start:stop] = block

    # image zero-shot logits: the true class, plus the feature's pull toward the spurious class
    logits = rng.standard_normal((n_images, num_classes))
    logits[np.arange(n_images), labels] += 2.5
    logits[present, spurious_class] += feature_boost
    image_scores = _softmax(logits).astype(np.float32)

    # region logits: object regions point at their class, feature regions at the spurious class
    reg_logits = rng.standard_normal((r, num_classes)).astype(np.float32)
    obj = kind == KIND_OBJECT
    reg_logits[np.flatnonzero(obj), region_label[obj]] += 3.0
    reg_logits[kind == KIND_FEATURE, spurious_class] += 3.0
    region_scores = _softmax(reg_logits)

    return PlantedSet(
        region_embeddings=emb,
        num_regions=np.full(n_images, regions_per_image, dtype=np.int64),
        image_labels=labels.astype(np.int64),
        image_scores=image_scores,
        region_scores=region_scores,
        region_kind=kind,
        feature_present=present,
        spurious_class=spurious_class,
    )
