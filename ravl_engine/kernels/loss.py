"""Contrastive losses (pure tensor functions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def clip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric InfoNCE of CLIP: matching (image, caption) pairs are the diagonal.

    Args:
        image_emb: [B, D] image embeddings (normalised here).
        text_emb: [B, D] caption embeddings, row i describing image i.
        logit_scale: multiplier of the cosine similarities (CLIP's exp(log scale), 1 / temperature).

    Returns:
        Scalar loss: the mean of the image->text and text->image cross-entropies.
    """
    image_emb = F.normalize(image_emb, dim=-1)
    text_emb = F.normalize(text_emb, dim=-1)
    logits = logit_scale * image_emb @ text_emb.T
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


REDUCTIONS = ("sum", "mean")


def pad_regions(
    region_emb: Tensor, counts: Tensor, *, fill: float = 0.0, width: int | None = None
) -> tuple[Tensor, Tensor]:
    """Flat per-image regions -> a padded batch.

    Args:
        region_emb: [R, ...] rows of all images, image by image.
        counts: [B] int64 regions per image (sum = R).
        fill: value of the padding rows.
        width: M, at least the largest count (default: the largest count).

    Returns:
        (padded [B, M, ...], mask [B, M] bool: True where a real region sits).
    """
    counts = counts.to(device=region_emb.device, dtype=torch.long)
    b = counts.shape[0]
    m = int(counts.max()) if b else 0
    if width is not None:
        if width < m:
            raise ValueError(f"width {width} is smaller than the largest count {m}")
        m = width
    owner = torch.repeat_interleave(torch.arange(b, device=region_emb.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(region_emb.shape[0], device=region_emb.device) - starts[owner]
    padded = region_emb.new_full((b, m, *region_emb.shape[1:]), fill)
    padded = padded.index_put((owner, slot), region_emb)
    mask = torch.zeros(b, m, dtype=torch.bool, device=region_emb.device)
    mask[owner, slot] = True
    return padded, mask


def region_aware_loss(
    region_emb: Tensor,
    region_mask: Tensor,
    spurious: Tensor,
    labels: Tensor,
    class_emb: Tensor,
    *,
    temperature: float = 0.07,
    reduction: str = "sum",
    distinct_labels: bool = True,
) -> tuple[Tensor, Tensor]:
    """RaVL's region-level losses L_R and L_A for a batch (../shared/docs/RAVL_METHOD.md, "Stage 2").

    With s(r, y) = <f(r), g(y)> / tau, R_i^r the non-spurious regions of image i and S the spurious regions of the
    batch, in log space (sigma = exp(s), sigma_m(A, y) = exp(max over a in A of s(a, y))):

    - L_R^i = -log sigma_m(R_i^r, y_i) / (sum over batch labels y of w_y sigma_m(R_i^r, y) + P), where w_y = 1 for
      every distinct label of the batch (``distinct_labels``) or the number of images labelled y, and
      P = sum over r in S of max over batch labels y_k of sigma(r, y_k);
    - L_A^i = -log sigma_m(R_i^r, y_i) / (sigma_m(R_i^r, y_i) + sum over j with y_j != y_i of sigma_m(R_j^r, y_i)
      + sum over r in S of sigma(r, y_i)).

    Anchors i are the images with a label and at least one non-spurious region; other images still contribute
    their spurious regions to S and, when labelled, their non-spurious regions to the L_A sums. With no anchor the
    losses are 0 (never NaN). Batch labels are the labels of all labelled images.

    Args:
        region_emb: [B, M, D] region embeddings, padded (normalised here).
        region_mask: [B, M] bool, True for real regions.
        spurious: [B, M] bool, True for regions in the spurious cluster (ignored where the mask is False).
        labels: [B] int64 class index per image, -1 = the caption names no class.
        class_emb: [C, D] class text embeddings g(y) (normalised here).
        temperature: tau.
        reduction: "sum" (the paper's formula) or "mean" over anchors.
        distinct_labels: count each batch label once in L_R's first denominator term (default) or once per image.

    Returns:
        (L_R, L_A), two scalars.
    """
    if region_emb.ndim != 3 or region_mask.shape != region_emb.shape[:2] or spurious.shape != region_mask.shape:
        raise ValueError(
            f"region_emb must be [B, M, D] with masks [B, M]; got {tuple(region_emb.shape)}, "
            f"{tuple(region_mask.shape)}, {tuple(spurious.shape)}"
        )
    if labels.shape != region_emb.shape[:1] or class_emb.ndim != 2 or class_emb.shape[1] != region_emb.shape[2]:
        raise ValueError(
            f"labels must be [B] and class_emb [C, D]; got {tuple(labels.shape)}, {tuple(class_emb.shape)}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    neg_inf = float("-inf")
    c = class_emb.shape[0]
    labelled = labels >= 0
    logits = F.normalize(region_emb, dim=-1) @ F.normalize(class_emb, dim=-1).T / temperature  # [B, M, C]
    keep = region_mask & ~spurious
    # log sigma_m(R_j^r, y) for every image and class: masked max over the non-spurious regions (-inf: none)
    m_r = logits.masked_fill(~keep[..., None], neg_inf).amax(dim=1)  # [B, C]
    has_r = keep.any(dim=1)
    anchor = torch.nonzero(labelled & has_r)[:, 0]
    if anchor.numel() == 0:
        zero = logits.sum() * 0.0  # keeps the graph, so backward() works on a batch without anchors
        return zero, zero
    spur = logits[region_mask & spurious]  # [S, C]
    y = labels[anchor]  # [A]
    in_batch = torch.bincount(labels[labelled], minlength=c) > 0  # [C]
    # every anchor's own label is in the batch and its m_r row is finite, so each logsumexp below has a finite
    # term and no backward meets inf - inf
    num = m_r[anchor, y]  # [A] = log sigma_m(R_i^r, y_i)
    if distinct_labels:
        log_w = torch.zeros(c, dtype=logits.dtype, device=logits.device)
    else:
        log_w = torch.bincount(labels[labelled], minlength=c).to(logits.dtype).clamp(min=1).log()
    log_w = log_w.masked_fill(~in_batch, neg_inf)
    p_terms = spur.masked_fill(~in_batch, neg_inf).amax(dim=1) if spur.shape[0] else spur.new_zeros(0)  # [S]
    label_terms = m_r[anchor] + log_w  # [A, C]
    denom_r = torch.logsumexp(torch.cat([label_terms, p_terms.expand(anchor.numel(), -1)], dim=1), dim=1)
    other_ok = labelled & has_r  # [B]: images whose non-spurious regions enter L_A's sum
    others = m_r[:, y].T.masked_fill(~(other_ok[None, :] & (labels[None, :] != y[:, None])), neg_inf)  # [A, B]
    spur_terms = spur[:, y].T  # [A, S] = s(r, y_i)
    denom_a = torch.logsumexp(torch.cat([num[:, None], others, spur_terms], dim=1), dim=1)
    loss_r, loss_a = denom_r - num, denom_a - num
    if reduction == "mean":
        return loss_r.mean(), loss_a.mean()
    return loss_r.sum(), loss_a.sum()


def box_mask(images: Tensor, boxes: Tensor, owner: Tensor) -> Tensor:
    """[B, H, W] bool: the pixels of ``images`` [B, C, H, W] whose centre lies inside one of their boxes.

    Args:
        images: [B, C, H, W] (only the shape and device are used).
        boxes: [S, 4] xyxy in pixels (pixel j spans [j, j + 1], its centre is j + 0.5; edges count as inside).
        owner: [S] int64, the image of each box.
    """
    b, _, h, w = images.shape
    hit = torch.zeros(b, h, w, device=images.device)
    if boxes.shape[0] == 0:
        return hit > 0
    boxes = boxes.to(images.device, torch.float32)
    ys = torch.arange(h, device=images.device, dtype=torch.float32) + 0.5
    xs = torch.arange(w, device=images.device, dtype=torch.float32) + 0.5
    in_y = (ys[None, :] >= boxes[:, 1:2]) & (ys[None, :] <= boxes[:, 3:4])  # [S, H]
    in_x = (xs[None, :] >= boxes[:, 0:1]) & (xs[None, :] <= boxes[:, 2:3])  # [S, W]
    inside = (in_y[:, :, None] & in_x[:, None, :]).float()  # [S, H, W]
    return hit.index_add_(0, owner.to(images.device), inside) > 0


def counterfactual_loss(with_logits: Tensor, without_logits: Tensor, labels: Tensor) -> Tensor:
    """RaVL's optional image term over pairs of one image with and without the spurious feature.

    Cross-entropy of the feature-free image's class logits to its label, plus the cross-entropy of the image with
    the feature to the feature-free image's class distribution (detached): classify without the feature, and
    classify the same with it. Pairs are (an image with a spurious region, its copy with those regions masked) and
    (an image of another class with those regions pasted in, that image).

    Args:
        with_logits: [P, C] class logits of the images carrying the feature.
        without_logits: [P, C] class logits of their feature-free partners.
        labels: [P] int64 class indices (>= 0).

    Returns:
        Scalar, the mean over the P pairs (0 with P = 0, keeping the graph).
    """
    if labels.numel() == 0:
        return with_logits.sum() * 0.0 + without_logits.sum() * 0.0
    target = F.softmax(without_logits.detach(), dim=-1)
    invariance = -(target * F.log_softmax(with_logits, dim=-1)).sum(dim=-1).mean()
    return F.cross_entropy(without_logits, labels) + invariance
