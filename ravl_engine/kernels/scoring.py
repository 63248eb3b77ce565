"""RaVL cluster scoring for all clusters at once: performance gaps, influence, filtering, ranking.

Everything is a segment reduction over index tensors: the distinct (cluster, image) pairs give "image i has a region
in cluster c"; ``bincount`` over ``cluster * C + class`` gives per-cluster, per-class counts; ``segment_argmax`` over
region -> image gives each image's most confident region. O(R log R + K C) in total, with no loop over clusters or
images.

Semantics follow the released RaVL code (``ravl/discover_utils.py``), see ``docs``/RAVL_METHOD.md step 5:

- Z_c = images with at least one region in c; for class y, the "present" group is Z_c's images of class y and the
  "absent" group the other images of class y. A class is scored only when both groups are non-empty.
- weighted gap G_c^y = w (p_in - p_out), w = 2 min(n_in, n_out) / (n_in + n_out); G_c = sum_y |G_c^y|.
- influence: over images of Z_c that are misclassified, have more than one region (switchable) and whose class has
  G_c^y < 0: the fraction whose most confident region for the predicted class lies in c, per true class; H_c is
  the largest fraction, -inf when no image qualifies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ravl_engine.kernels.segment import segment_argmax


@dataclass(frozen=True, slots=True)
class ClusterScores:
    """Scores of every cluster. K clusters, C classes; all tensors on the inputs' device.

    Attributes:
        n_present: [K, C] int64, images of class y with a region in the cluster.
        n_absent: [K, C] int64, images of class y without one.
        acc_present: [K, C] float64, accuracy of the present group (NaN when empty).
        acc_absent: [K, C] float64, accuracy of the absent group (NaN when empty).
        scored: [K, C] bool, both groups non-empty (the class enters the gap).
        gap: [K, C] float64 weighted gap G_c^y, 0 where not scored.
        gap_total: [K] float64, G_c = sum of |G_c^y|.
        influence: [K] float64, H_c (-inf when no image qualifies).
        class_index: [K] int64, argmax over scored classes of the unweighted gap (-1 when none is scored).
        n_regions: [K] int64, regions in the cluster.
    """

    n_present: Tensor
    n_absent: Tensor
    acc_present: Tensor
    acc_absent: Tensor
    scored: Tensor
    gap: Tensor
    gap_total: Tensor
    influence: Tensor
    class_index: Tensor
    n_regions: Tensor


def best_regions(region_scores: Tensor, region_image: Tensor, image_pred: Tensor, n_images: int) -> Tensor:
    """Each image's region with the highest score for the image's predicted class.

    Args:
        region_scores: [R, C] float, zero-shot probabilities of each region.
        region_image: [R] int64, image of each region (non-decreasing).
        image_pred: [N] int64, predicted class of each image.
        n_images: N.

    Returns:
        [N] int64 region index (the lowest on ties), -1 for images without regions.
    """
    values = region_scores.gather(1, image_pred[region_image][:, None]).squeeze(1)
    return segment_argmax(values, region_image, n_images)


def score_clusters(
    labels: Tensor,
    k: int,
    *,
    region_image: Tensor,
    num_regions: Tensor,
    image_labels: Tensor,
    image_pred: Tensor,
    best_region: Tensor,
    num_classes: int,
    skip_single_region: bool = True,
) -> ClusterScores:
    """Gap and influence of every cluster.

    Args:
        labels: [R] int64, cluster of each region, in [0, k).
        k: number of clusters K.
        region_image: [R] int64, image of each region.
        num_regions: [N] int64, regions per image.
        image_labels: [N] int64 true classes, in [0, num_classes).
        image_pred: [N] int64 predicted classes.
        best_region: [N] int64 from :func:`best_regions`.
        num_classes: C.
        skip_single_region: ignore one-region images in the influence score (released code).

    Returns:
        ClusterScores.
    """
    n_images, c = image_labels.shape[0], num_classes
    dev = labels.device
    pairs = torch.unique(labels * n_images + region_image)
    pc, pi = pairs // n_images, pairs % n_images
    py = image_labels[pi]
    correct = (image_pred == image_labels).to(torch.float64)

    cell = pc * c + py
    n_present = torch.bincount(cell, minlength=k * c).view(k, c)
    correct_present = torch.bincount(cell, weights=correct[pi], minlength=k * c).view(k, c)
    n_class = torch.bincount(image_labels, minlength=c)
    correct_class = torch.bincount(image_labels, weights=correct, minlength=c)
    n_absent = n_class[None, :] - n_present
    correct_absent = correct_class[None, :] - correct_present

    acc_present = correct_present / n_present
    acc_absent = correct_absent / n_absent
    scored = (n_present > 0) & (n_absent > 0)
    weight = 2.0 * torch.minimum(n_present, n_absent).to(torch.float64) / n_class[None, :].clamp_min(1)
    raw_gap = torch.where(scored, acc_present - acc_absent, torch.zeros((), dtype=torch.float64, device=dev))
    gap = weight * raw_gap
    gap_total = gap.abs().sum(1)

    # lowest class on ties among scored classes; -1 when the cluster scores no class
    masked = torch.where(scored, raw_gap, torch.full_like(raw_gap, float("-inf")))
    class_index = torch.where(scored.any(1), masked.argmax(1), torch.full((k,), -1, dtype=torch.int64, device=dev))

    eligible = (image_pred[pi] != py) & scored[pc, py] & (gap[pc, py] < 0)
    if skip_single_region:
        eligible &= num_regions[pi] > 1
    hit = labels[best_region[pi].clamp_min(0)] == pc
    n_eligible = torch.bincount(cell[eligible], minlength=k * c).view(k, c)
    n_hit = torch.bincount(cell[eligible & hit], minlength=k * c).view(k, c)
    fraction = torch.where(
        n_eligible > 0,
        n_hit.to(torch.float64) / n_eligible.clamp_min(1),
        torch.full((k, c), float("-inf"), dtype=torch.float64, device=dev),
    )
    influence = fraction.max(1).values

    return ClusterScores(
        n_present=n_present,
        n_absent=n_absent,
        acc_present=acc_present,
        acc_absent=acc_absent,
        scored=scored,
        gap=gap,
        gap_total=gap_total,
        influence=influence,
        class_index=class_index,
        n_regions=torch.bincount(labels, minlength=k),
    )


def select_clusters(scores: ClusterScores, *, influence_threshold: float = 0.25, two_sign_rule: bool = True) -> Tensor:
    """Clusters that pass the filter, ranked by G_c, descending (the lower cluster id first on ties).

    Kept: non-empty, H_c >= ``influence_threshold`` and, with ``two_sign_rule`` (released code), at least one class
    with G_c^y > 0 and one with G_c^y < 0.

    Returns:
        [M] int64 cluster ids, best first; may be empty.
    """
    keep = (scores.influence >= influence_threshold) & (scores.n_regions > 0)
    if two_sign_rule:
        keep &= (scores.gap > 0).any(1) & (scores.gap < 0).any(1)
    ids = keep.nonzero().squeeze(1)
    order = torch.sort(scores.gap_total[ids], descending=True, stable=True).indices
    return ids[order]


def rank_members(x: Tensor, labels: Tensor, cluster: int, medoid: int) -> tuple[Tensor, Tensor]:
    """Regions of one cluster ranked by cosine similarity to its medoid, descending (lower index first on ties).

    Args:
        x: [R, D] float, L2-normalised region embeddings.
        labels: [R] int64 cluster of each region.
        cluster: cluster id.
        medoid: row index of the cluster's medoid.

    Returns:
        (region indices [M] int64, similarities [M] of x's dtype), best first.
    """
    members = (labels == cluster).nonzero().squeeze(1)
    sims = x[members] @ x[medoid]
    order = torch.sort(sims, descending=True, stable=True).indices
    return members[order], sims[order]
