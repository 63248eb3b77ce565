"""Mitigation's training methods: the loss and the sampler of each (the loop is ravl_engine/training.py).

- ``ravl``: lambda L_CL + (1 - lambda) (L_R + L_A), regions embedded in the audit's region mode; with
  ``image_term="masked"`` (an extension, not the paper's) plus L_M, the feature-masked image term
  (:func:`ravl_engine.kernels.loss.masked_image_loss`), which reaches the image embedding itself;
- ``standard``: L_CL;
- ``upsampled``: L_CL with a group-balanced sampler;
- ``vl-erm``: lambda L_CL + (1 - lambda) cross-entropy of the zero-shot logits, group-balanced sampler;
- ``vl-gdro``: lambda L_CL + (1 - lambda) group DRO over the zero-shot cross-entropy, group-balanced sampler.

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
from ravl_engine.kernels.loss import clip_loss, mask_boxes, masked_image_loss, pad_regions, region_aware_loss
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
IMAGE_TERMS = ("none", "masked")  # ravl's optional image-level term (see masked_copies)


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


def masked_copies(images: Tensor, boxes: list[Tensor], spurious: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The feature-masked copies of a batch's labelled images that carry a spurious region.

    Every pixel inside one of the image's spurious boxes is set to 0, the normalisation mean colour.

    Returns:
        (which [A] int64 batch positions, copies [A, 3, S, S]).
    """
    counts = torch.tensor([b.shape[0] for b in boxes], device=images.device, dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(boxes), device=images.device), counts)
    spurious = spurious.to(images.device)
    has = torch.zeros(len(boxes), dtype=torch.bool, device=images.device)
    has[owner[spurious]] = True
    which = torch.nonzero(has & (labels >= 0))[:, 0]
    slot = torch.full((len(boxes),), -1, dtype=torch.long, device=images.device)
    slot[which] = torch.arange(which.numel(), device=images.device)
    flat = torch.cat(boxes).to(images.device) if boxes else images.new_zeros(0, 4)
    keep = spurious & (slot[owner] >= 0)
    return which, mask_boxes(images[which], flat[keep], slot[owner[keep]])


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

    ``ravl`` embeds the image and all its regions in one backbone pass and adds L_R + L_A (and, with
    ``cfg.image_term == "masked"``, L_M on this rank's images: their feature-masked copies join the same image pass,
    so a ResNet's batch statistics include them); ``vl-erm`` / ``vl-gdro``
    add the (group-robust) cross-entropy of the zero-shot logits of the images whose caption names a class.
    ``class_emb`` [C, D] (unit rows) is needed by those three methods.

    Under torch.distributed each rank passes its equal share of the global batch and ``towers`` (a
    DistributedDataParallel-wrapped :class:`ravl_engine.training.ClipWithRegions`); the embeddings are gathered
    with their gradients and every
    rank computes the loss of the whole global batch, so the averaged gradients equal one process's on that batch.
    """
    towers = towers if towers is not None else ClipWithRegions(model)
    if cfg.method == "ravl" and (batch.boxes is None or batch.spurious is None):
        raise ValueError("method 'ravl' needs boxes and spurious flags")
    if cfg.method in WITH_CLASSES and class_emb is None:
        raise ValueError(f"method {cfg.method!r} needs class embeddings")
    images, boxes, which = batch.images, batch.boxes if cfg.method == "ravl" else None, None
    if boxes is not None and batch.spurious is not None and cfg.image_term == "masked":
        which, copies = masked_copies(batch.images, boxes, batch.spurious, batch.labels)
        images = torch.cat([images, copies])
        boxes = [*boxes, *(boxes[0].new_zeros(0, 4) for _ in range(copies.shape[0]))]
    image_emb, region_emb, text_emb = towers(images, batch.tokens, boxes)
    n = batch.images.shape[0]
    image_emb, copy_emb = image_emb[:n], image_emb[n:]
    local_emb = image_emb  # this rank's rows, before the gather below
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
        if which is not None:
            assert class_emb is not None

            def class_logits(emb: Tensor) -> Tensor:
                return F.normalize(emb.float(), dim=-1) @ class_emb.T / cfg.temperature

            aux = aux + masked_image_loss(class_logits(local_emb[which]), class_logits(copy_emb), batch.labels[which])
    else:
        has = labels >= 0
        if bool(has.any()):
            logits = F.normalize(image_emb[has].float(), dim=-1) @ class_emb.T / cfg.temperature
            ce = F.cross_entropy(logits, labels[has], reduction="none")
            aux = ce.mean() if gdro is None else gdro(ce, groups[has])
    lam = cfg.clip_weight
    return lam * loss_cl + (1 - lam) * aux, loss_cl, aux


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
    with_regions = cfg.method == "ravl"

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
