"""Mitigation's training methods: the loss and the sampler of each (the loop is ravl_engine/training.py).

- ``ravl``: lambda L_CL + (1 - lambda) (L_R + L_A), regions embedded in the audit's region mode;
- ``standard``: L_CL;
- ``upsampled``: L_CL with a group-balanced sampler;
- ``vl-erm``: lambda L_CL + (1 - lambda) cross-entropy of the zero-shot logits, group-balanced sampler;
- ``vl-gdro``: lambda L_CL + (1 - lambda) group DRO over the zero-shot cross-entropy, group-balanced sampler.

With an ``image_term`` (an extension, not the paper's; ``ravl``, ``vl-erm``, ``vl-gdro``) the class term gains L_M
over counterfactual pairs (:func:`counterfactual_pairs`, :func:`ravl_engine.kernels.loss.counterfactual_loss`),
which reaches the image embedding itself.

Groups are class x feature present (an image has a region in the spurious cluster); images whose caption names
no class form one more group per feature flag and only get the CLIP loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ravl_engine.distributed import gather, gather_with_grad, is_distributed
from ravl_engine.kernels.loss import box_mask, clip_loss, counterfactual_loss, pad_regions, region_aware_loss
from ravl_engine.mitigate_prep import TrainSet
from ravl_engine.training import (  # noqa: F401 (zero_shot: re-exported)
    ClipWithRegions,
    LossFn,
    Sampler,
    balanced_sampler,
    shuffle_sampler,
    zero_shot,
)

if TYPE_CHECKING:
    from ravl_engine.mitigate import MitigateConfig

METHODS = ("ravl", "standard", "upsampled", "vl-erm", "vl-gdro")
BALANCED = ("upsampled", "vl-erm", "vl-gdro")
SAMPLERS = ("method", "balanced", "shuffle")  # "method": balanced for the BALANCED methods, else shuffle
WITH_CLASSES = ("ravl", "vl-erm", "vl-gdro")
IMAGE_TERMS = ("none", "masked", "counterfactual")  # the optional image term (see counterfactual_pairs)
IMAGE_TERM_CHOICES = ("method", *IMAGE_TERMS)  # "method": counterfactual for ravl, none for the rest


def class_embeddings(model: Any, tokens: Tensor, n_classes: int) -> Tensor:
    """Class embeddings g(y) inside the graph: template embeddings normalised, averaged, renormalised. [C, D]."""
    emb = F.normalize(model.encode_text(tokens).float(), dim=-1)
    return F.normalize(emb.view(n_classes, -1, emb.shape[-1]).mean(dim=1), dim=-1)


class GroupDRO:
    """Group DRO (Sagawa et al. 2020): weights q over groups, q_g <- q_g exp(eta loss_g), loss = sum q_g loss_g."""

    def __init__(self, n_groups: int, step: float) -> None:
        self.q = torch.full((n_groups,), 1.0 / n_groups)
        self.step = step

    def __call__(self, losses: Tensor, groups: Tensor) -> Tensor:
        n = self.q.shape[0]
        total = torch.zeros(n, dtype=losses.dtype, device=losses.device).index_add(0, groups, losses)
        count = torch.bincount(groups, minlength=n).to(losses.dtype)
        mean = total / count.clamp(min=1)
        seen = (count > 0).cpu()
        q = self.q * torch.exp(self.step * mean.detach().cpu() * seen)
        self.q = q / q.sum()
        return (self.q.to(losses.device, losses.dtype) * mean).sum()


def batch_boxes(ts: TrainSet, idx: Tensor) -> tuple[list[Tensor], Tensor]:
    """Per-image box tensors of a batch and the matching [R_b] spurious flags."""
    starts, stops = ts.offsets[idx].tolist(), ts.offsets[idx + 1].tolist()
    boxes = [ts.boxes[a:b] for a, b in zip(starts, stops, strict=True)]
    flags = torch.cat([ts.spurious[a:b] for a, b in zip(starts, stops, strict=True)])
    return boxes, flags


@dataclass(frozen=True)
class Pairs:
    """Counterfactual pairs of a batch. Positions index ``cat([batch images, copies])``.

    Attributes:
        copies: [P', 3, S, S] the new images (masked, then pasted).
        with_feature: [P] positions of the images carrying the feature.
        without: [P] positions of their feature-free partners.
        labels: [P] int64 the class of each pair.
    """

    copies: Tensor
    with_feature: Tensor
    without: Tensor
    labels: Tensor


def counterfactual_pairs(
    images: Tensor, boxes: list[Tensor], spurious: Tensor, labels: Tensor, *, paste: bool
) -> Pairs:
    """The pairs of ``--image-term``, built from the discovered spurious regions only (no feature labels).

    Donors are the labelled images with a region in the spurious cluster. ``masked``: each donor and its copy with
    those regions set to 0 (the normalisation mean colour), label the donor's. ``counterfactual`` (``paste``) adds,
    for each donor, the next labelled image after it in the batch (cyclically) whose class differs and which has
    no spurious region: its copy with the donor's spurious-region pixels pasted in at the same place, and the image
    itself, label the recipient's. (A pasted box may cover the recipient's object where regions are large, as
    quadrants are.)
    """
    n, dev = len(boxes), images.device
    counts = torch.tensor([b.shape[0] for b in boxes], device=dev, dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(n, device=dev), counts)
    spurious = spurious.to(dev)
    has = torch.zeros(n, dtype=torch.bool, device=dev)
    has[owner[spurious]] = True
    donors = torch.nonzero(has & (labels >= 0))[:, 0]
    flat = torch.cat(boxes).to(dev) if boxes else images.new_zeros(0, 4)
    hit = box_mask(images, flat[spurious], owner[spurious])  # [B, H, W]: every image's spurious pixels
    masked = images[donors].masked_fill(hit[donors][:, None], 0.0)
    with_feature, without, pair_labels = [donors], [n + torch.arange(donors.numel(), device=dev)], [labels[donors]]
    copies = [masked]
    if paste:
        free = ((labels >= 0) & ~has).tolist()
        ys = labels.tolist()
        recipients: list[int] = []
        pasted_donors: list[int] = []
        for d in donors.tolist():
            r = next((j % n for j in range(d + 1, d + n) if free[j % n] and ys[j % n] != ys[d]), None)
            if r is not None:
                recipients.append(r)
                pasted_donors.append(d)
        if recipients:
            d_idx = torch.tensor(pasted_donors, device=dev)
            r_idx = torch.tensor(recipients, device=dev)
            copies.append(torch.where(hit[d_idx][:, None], images[d_idx], images[r_idx]))
            start = n + donors.numel()
            with_feature.append(start + torch.arange(r_idx.numel(), device=dev))
            without.append(r_idx)
            pair_labels.append(labels[r_idx])
    return Pairs(torch.cat(copies), torch.cat(with_feature), torch.cat(without), torch.cat(pair_labels))


@dataclass(frozen=True)
class StepBatch:
    """One training batch.

    Attributes:
        images: [B, 3, S, S] normalised images.
        tokens: [B, L] caption tokens.
        labels: [B] int64 class named by each caption, -1 = none.
        groups: [B] int64 group (2 * class + feature present; 2 * C + present without a class).
        boxes: (ravl) B tensors [K_i, 4], xyxy, tower input pixels.
        spurious: (ravl) [sum K_i] bool, regions in the spurious cluster.
    """

    images: Tensor
    tokens: Tensor
    labels: Tensor
    groups: Tensor
    boxes: list[Tensor] | None = None
    spurious: Tensor | None = None

    def to(self, device: str | torch.device) -> StepBatch:
        return StepBatch(
            images=self.images.to(device),
            tokens=self.tokens.to(device),
            labels=self.labels.to(device),
            groups=self.groups.to(device),
            boxes=[b.to(device) for b in self.boxes] if self.boxes is not None else None,
            spurious=self.spurious.to(device) if self.spurious is not None else None,
        )


def mitigation_loss(
    model: Any,
    batch: StepBatch,
    class_emb: Tensor | None,
    cfg: MitigateConfig,
    *,
    gdro: GroupDRO | None = None,
    towers: nn.Module | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The training loss of ``cfg.method`` for one batch: (total, L_CL, auxiliary term).

    ``ravl`` embeds the image and all its regions in one backbone pass and adds L_R + L_A; ``vl-erm`` / ``vl-gdro``
    add the (group-robust) cross-entropy of the zero-shot logits of the images whose caption names a class.
    ``class_emb`` [C, D] (unit rows) is needed by those three methods. With ``cfg.image_term`` any of them also
    adds L_M over this rank's counterfactual pairs (:func:`counterfactual_pairs`): the copies join the same image
    pass, so a ResNet's batch statistics include them.

    Under torch.distributed each rank passes its equal share of the global batch and ``towers`` (a
    DistributedDataParallel-wrapped :class:`ravl_engine.training.ClipWithRegions`); the embeddings are gathered
    with their gradients and every
    rank computes the loss of the whole global batch, so the averaged gradients equal one process's on that batch.
    """
    towers = towers if towers is not None else ClipWithRegions(model)
    term = resolved_image_term(cfg.method, cfg.image_term)
    if cfg.method == "ravl" and (batch.boxes is None or batch.spurious is None):
        raise ValueError("method 'ravl' needs boxes and spurious flags")
    if cfg.method in WITH_CLASSES and class_emb is None:
        raise ValueError(f"method {cfg.method!r} needs class embeddings")
    if term != "none" and (batch.boxes is None or batch.spurious is None):
        raise ValueError(f"image term {term!r} needs boxes and spurious flags")
    images, boxes, pairs = batch.images, batch.boxes if cfg.method == "ravl" else None, None
    if term != "none":
        assert batch.boxes is not None and batch.spurious is not None  # checked above
        pairs = counterfactual_pairs(
            batch.images, batch.boxes, batch.spurious, batch.labels, paste=term == "counterfactual"
        )
        images = torch.cat([images, pairs.copies])
        if boxes is not None:
            boxes = [*boxes, *(boxes[0].new_zeros(0, 4) for _ in range(pairs.copies.shape[0]))]
    image_emb, region_emb, text_emb = towers(images, batch.tokens, boxes)
    all_emb = image_emb  # this rank's images and copies, before the gather below
    image_emb = image_emb[: batch.images.shape[0]]
    labels, groups = gather(batch.labels), gather(batch.groups)
    image_emb = gather_with_grad(image_emb)
    loss_cl = clip_loss(image_emb, gather_with_grad(text_emb), model.logit_scale.exp())
    aux = loss_cl.new_zeros(())
    if cfg.method in ("standard", "upsampled"):
        return loss_cl, loss_cl, aux
    assert class_emb is not None
    if region_emb is not None and batch.boxes is not None and batch.spurious is not None:
        counts = torch.tensor([b.shape[0] for b in batch.boxes], device=region_emb.device)
        width = int(counts.max()) if counts.numel() else 0
        if is_distributed():  # the same padded width on every rank, so the gathered shapes agree
            import torch.distributed as dist  # noqa: PLC0415

            w = torch.tensor([width], device=region_emb.device)
            dist.all_reduce(w, op=dist.ReduceOp.MAX)
            width = int(w)
        padded, mask = pad_regions(region_emb.float(), counts, width=width)
        spurious, _ = pad_regions(batch.spurious, counts, fill=False, width=width)
        l_r, l_a = region_aware_loss(
            gather_with_grad(padded),
            gather(mask),
            gather(spurious),
            labels,
            class_emb,
            temperature=cfg.temperature,
            reduction=cfg.reduction,
            distinct_labels=cfg.distinct_labels,
        )
        aux = l_r + l_a
    else:
        has = labels >= 0
        if bool(has.any()):
            logits = F.normalize(image_emb[has].float(), dim=-1) @ class_emb.T / cfg.temperature
            ce = F.cross_entropy(logits, labels[has], reduction="none")
            aux = ce.mean() if gdro is None else gdro(ce, groups[has])
    if pairs is not None:
        logits = F.normalize(all_emb.float(), dim=-1) @ class_emb.T / cfg.temperature
        aux = aux + counterfactual_loss(logits[pairs.with_feature], logits[pairs.without], pairs.labels)
    lam = cfg.clip_weight
    return lam * loss_cl + (1 - lam) * aux, loss_cl, aux


def resolved_image_term(method: str, image_term: str = "method") -> str:
    """One of IMAGE_TERMS: ``image_term``, where "method" is the method's own (``counterfactual`` for ``ravl``, the
    engine's default, measured in the README; ``none`` for the others, whose published losses have no such term)."""
    if image_term != "method":
        return image_term
    return "counterfactual" if method == "ravl" else "none"


def resolved_sampler(method: str, sampler: str = "method") -> str:
    """ "balanced" or "shuffle": ``sampler``, where "method" is the method's own (group-balanced for the BALANCED
    methods, else a plain shuffle)."""
    if sampler != "method":
        return sampler
    return "balanced" if method in BALANCED else "shuffle"


def method_sampler(method: str, groups: Tensor, sampler: str = "method") -> Sampler:
    """The training sampler (see :func:`resolved_sampler`): group-balanced over ``groups``, or a plain shuffle."""
    return balanced_sampler(groups) if resolved_sampler(method, sampler) == "balanced" else shuffle_sampler


def method_loss(
    model: Any,
    ts: TrainSet,
    caption_tokens: Tensor,
    cfg: MitigateConfig,
    *,
    n_classes: int,
    class_emb: Callable[[], Tensor] | None,
    towers: nn.Module,
    device: str,
) -> LossFn:
    """The loop's loss for ``cfg.method``: this rank's share of a batch (training-set indices) ->
    :func:`mitigation_loss` (total, L_CL, auxiliary term).

    ``class_emb`` gives each step's class embeddings (the frozen ones, or recomputed in the graph); None for the
    methods without a class term.
    """
    gdro = GroupDRO(2 * n_classes + 2, cfg.gdro_step) if cfg.method == "vl-gdro" else None
    with_regions = cfg.method == "ravl" or resolved_image_term(cfg.method, cfg.image_term) != "none"

    def loss_fn(idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        boxes, flags = batch_boxes(ts, idx) if with_regions else (None, None)
        batch = StepBatch(
            images=ts.images[idx],
            tokens=caption_tokens[idx],
            labels=ts.labels[idx],
            groups=ts.groups[idx],
            boxes=boxes,
            spurious=flags,
        )
        emb = class_emb() if class_emb is not None else None
        return mitigation_loss(model, batch.to(device), emb, cfg, gdro=gdro, towers=towers)

    return loss_fn
