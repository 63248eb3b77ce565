"""Slow, plain float64 reference implementations of RaVL discovery.

Written for clarity, not speed: a dense N x N distance matrix, explicit Python loops, the released RaVL code's
semantics (ravl/discover.py, discover_utils.py) restated in our own words. The tests compare the fast kernels with
these, and bench/bench_discover.py times :func:`dense_discover` as the "released-code-style" baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import silhouette_score


def dense_distance(x: np.ndarray, *, clip: bool) -> np.ndarray:
    """N x N cosine distance of unit rows, float64, zero diagonal; clipped to [0, 1] like the released code."""
    x = np.asarray(x, dtype=np.float64)
    d = 1.0 - x @ x.T
    d = np.clip(d, 0.0, 1.0 if clip else 2.0)
    np.fill_diagonal(d, 0.0)
    return d


def dense_kpp_init(d: np.ndarray, n_centers: int, generator: torch.Generator, n_trials: int) -> list[int]:
    """Greedy k-medoids++ on a dense distance matrix, drawing random numbers in the kernel's order."""
    n = d.shape[0]
    centers = [int(torch.randint(n, (1,), generator=generator))]
    closest = d[centers[0]] ** 2
    for _ in range(1, n_centers):
        potential = float(closest.sum())
        u = torch.rand(n_trials, generator=generator, dtype=torch.float64).numpy()
        if potential > 0:
            candidates = np.minimum(np.searchsorted(np.cumsum(closest), u * potential), n - 1)
        else:
            candidates = [min(set(range(n)) - set(centers))] * n_trials
        best_pot, best_cand, best_closest = math.inf, -1, closest
        for cand in candidates:
            new_closest = np.minimum(closest, d[cand] ** 2)
            pot = float(new_closest.sum())
            if pot < best_pot:
                best_pot, best_cand, best_closest = pot, int(cand), new_closest
        centers.append(best_cand)
        closest = best_closest
    return centers


def dense_kmedoids(d: np.ndarray, init: list[int], *, max_iter: int = 300) -> tuple[np.ndarray, np.ndarray, int]:
    """Alternating K-medoids on a dense matrix (scikit-learn-extra's method="alternate").

    Returns (medoids, labels, iterations).
    """
    medoids = np.array(init, dtype=np.int64)
    n_iter = 0
    for it in range(1, max_iter + 1):
        n_iter = it
        old = medoids.copy()
        labels = np.argmin(d[medoids], axis=0)
        for k in range(len(medoids)):
            members = np.where(labels == k)[0]
            if len(members) == 0:
                continue  # an empty cluster keeps its medoid
            costs = d[np.ix_(members, members)].sum(axis=1)
            medoids[k] = members[np.argmin(costs)]
        if np.array_equal(old, medoids):
            break
    labels = np.argmin(d[medoids], axis=0)
    return medoids, labels, n_iter


@dataclass
class LoopCluster:
    cluster: int
    gaps: dict[int, float]  # weighted, per scored class
    raw_gaps: dict[int, float]
    rows: list[tuple[int, float, int, float, int]]  # class, acc_present, n_present, acc_absent, n_absent
    total_gap: float
    influence: float
    two_sign: bool
    class_index: int


def loop_scores(
    labels: np.ndarray,
    num_regions: np.ndarray,
    image_labels: np.ndarray,
    image_scores: np.ndarray,
    region_scores: np.ndarray,
    *,
    skip_single_region: bool = True,
) -> list[LoopCluster]:
    """Per-cluster gaps and influence with plain loops, one cluster at a time (released-code semantics)."""
    image_pred = [int(np.argmax(row)) for row in image_scores]
    image_of_region: list[int] = []
    regions_of_image: list[list[int]] = []
    for i, count in enumerate(num_regions):
        regions_of_image.append(list(range(len(image_of_region), len(image_of_region) + int(count))))
        image_of_region.extend([i] * int(count))

    out = []
    for c in sorted(set(int(v) for v in labels)):
        region_idx = [r for r in range(len(labels)) if labels[r] == c]
        in_images = sorted(set(image_of_region[r] for r in region_idx))
        in_set = set(in_images)
        classes = sorted(set(int(image_labels[i]) for i in in_images))
        out_images = [i for i in range(len(image_labels)) if image_labels[i] in classes and i not in in_set]

        gaps: dict[int, float] = {}
        raw: dict[int, float] = {}
        rows = []
        for y in classes:
            present = [i for i in in_images if image_labels[i] == y]
            absent = [i for i in out_images if image_labels[i] == y]
            if not present or not absent:
                continue
            acc_p = sum(image_pred[i] == y for i in present) / len(present)
            acc_a = sum(image_pred[i] == y for i in absent) / len(absent)
            weight = 2 * min(len(present), len(absent)) / (len(present) + len(absent))
            gaps[y] = weight * (acc_p - acc_a)
            raw[y] = acc_p - acc_a
            rows.append((y, acc_p, len(present), acc_a, len(absent)))

        hits: dict[int, list[bool]] = {}
        for i in in_images:
            if skip_single_region and len(regions_of_image[i]) == 1:
                continue
            regs = regions_of_image[i]
            p = image_pred[i]
            best = regs[int(np.argmax([region_scores[r][p] for r in regs]))]
            y = int(image_labels[i])
            if p != y and y in gaps and gaps[y] < 0:
                hits.setdefault(y, []).append(labels[best] == c)
        influence = max((sum(v) / len(v) for v in hits.values()), default=-math.inf)

        class_index = -1
        for y in sorted(raw):
            if class_index < 0 or raw[y] > raw[class_index]:
                class_index = y
        out.append(
            LoopCluster(
                cluster=c,
                gaps=gaps,
                raw_gaps=raw,
                rows=rows,
                total_gap=sum(abs(v) for v in gaps.values()),
                influence=influence,
                two_sign=any(v > 0 for v in gaps.values()) and any(v < 0 for v in gaps.values()),
                class_index=class_index,
            )
        )
    return out


def loop_select(clusters: list[LoopCluster], *, threshold: float = 0.25, two_sign_rule: bool = True) -> list[int]:
    """Cluster ids that pass the filter, by total gap descending, lower id first on ties."""
    kept = [c for c in clusters if c.influence >= threshold and (c.two_sign or not two_sign_rule)]
    kept.sort(key=lambda c: (-c.total_gap, c.cluster))
    return [c.cluster for c in kept]


def loop_rank_members(x: np.ndarray, labels: np.ndarray, cluster: int, medoid: int) -> list[int]:
    """Members of a cluster by similarity to the medoid, descending, lower index first on ties."""
    x = np.asarray(x, dtype=np.float64)
    members = [r for r in range(len(labels)) if labels[r] == cluster]
    return sorted(members, key=lambda r: (-float(x[r] @ x[medoid]), r))


@dataclass
class DenseDiscovery:
    k: int
    silhouettes: dict[int, float]
    medoids: np.ndarray
    labels: np.ndarray
    ranked: list[int]  # cluster ids
    ranked_regions: list[list[int]] = field(default_factory=list)
    scores: list[LoopCluster] = field(default_factory=list)


def dense_discover(
    x: np.ndarray,
    num_regions: np.ndarray,
    image_labels: np.ndarray,
    image_scores: np.ndarray,
    region_scores: np.ndarray,
    *,
    seed: int = 0,
    clip: bool = False,
    ks: list[int] | None = None,
    n_trials: int | None = None,
    max_iter: int = 300,
) -> DenseDiscovery:
    """The whole discovery with the dense matrix, scikit-learn's precomputed silhouette and loop scoring."""
    n_classes = image_scores.shape[1]
    ks = ks if ks is not None else list(range(2 * n_classes, 5 * n_classes))
    d = dense_distance(x, clip=clip)
    generator = torch.Generator().manual_seed(seed)
    trials = n_trials if n_trials is not None else 2 + int(math.log(max(ks)))
    init = dense_kpp_init(d, max(ks), generator, trials)
    best = None
    silhouettes = {}
    for k in ks:
        medoids, labels, _ = dense_kmedoids(d, init[:k], max_iter=max_iter)
        n_labels = len(set(labels.tolist()))
        score = silhouette_score(d, labels, metric="precomputed") if 2 <= n_labels <= len(labels) - 1 else math.nan
        silhouettes[k] = float(score)
        key = -math.inf if math.isnan(score) else score
        if best is None or key > best[0]:
            best = (key, k, medoids, labels)
    assert best is not None
    _, k, medoids, labels = best
    scores = loop_scores(labels, num_regions, image_labels, image_scores, region_scores)
    ranked = loop_select(scores)
    ranked_regions = [loop_rank_members(x, labels, c, int(medoids[c])) for c in ranked]
    return DenseDiscovery(
        k=k,
        silhouettes=silhouettes,
        medoids=medoids,
        labels=labels,
        ranked=ranked,
        ranked_regions=ranked_regions,
        scores=scores,
    )


def loop_region_aware_loss(
    regions: list[list[tuple[list[float], bool]]],
    labels: list[int],
    class_emb: list[list[float]],
    *,
    temperature: float = 0.07,
    reduction: str = "sum",
    distinct_labels: bool = True,
) -> tuple[float, float]:
    """RaVL's L_R and L_A written from the formulas, one image and one region at a time, in float64.

    ``regions[i]`` lists image i's regions as (embedding, is_spurious); ``labels[i]`` is -1 without a class.
    """

    def unit(v: list[float]) -> list[float]:
        n = math.sqrt(sum(a * a for a in v))
        return [a / n for a in v]

    text = [unit(t) for t in class_emb]

    def sigma(r: list[float], y: int) -> float:
        return math.exp(sum(a * b for a, b in zip(unit(r), text[y], strict=True)) / temperature)

    def sigma_m(rs: list[list[float]], y: int) -> float:
        return max(sigma(r, y) for r in rs)

    keep = [[r for r, s in image if not s] for image in regions]
    spurious = [r for image in regions for r, s in image if s]
    batch_labels = [y for y in labels if y >= 0]
    label_terms = sorted(set(batch_labels)) if distinct_labels else batch_labels
    p = sum(max(sigma(r, y) for y in set(batch_labels)) for r in spurious) if batch_labels else 0.0
    l_r, l_a = [], []
    for i, y in enumerate(labels):
        if y < 0 or not keep[i]:
            continue
        own = sigma_m(keep[i], y)
        l_r.append(-math.log(own / (sum(sigma_m(keep[i], yy) for yy in label_terms) + p)))
        others = sum(sigma_m(keep[j], y) for j, yj in enumerate(labels) if yj >= 0 and yj != y and keep[j])
        l_a.append(-math.log(own / (own + others + sum(sigma(r, y) for r in spurious))))
    if not l_r:
        return 0.0, 0.0
    if reduction == "mean":
        return sum(l_r) / len(l_r), sum(l_a) / len(l_a)
    return sum(l_r), sum(l_a)
