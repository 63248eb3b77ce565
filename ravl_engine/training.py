"""The one training loop of ``finetune`` and every ``mitigate`` method.

A run is: one ``torch.Generator`` seeded once with the run's seed, from which every epoch's order is drawn by the
injected sampler (a plain shuffle, or a group-balanced draw); batches of that order, each rank taking its equal
contiguous share under torchrun; one AdamW step per batch on the injected loss; after every epoch the BatchNorm
statistics are synchronised and the injected validation scores the model; the selection rule keeps the best epoch
(epoch 0 = the starting weights) or the last one, with early stopping on patience. Methods differ only in the loss
and the sampler, so ``mitigate --method standard`` and ``finetune`` train the same weights from the same start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ravl_engine.distributed import barrier, local_share, rank_world, sync_buffers
from ravl_engine.kernels.roi import _batchnorm_running_stats, crop_regions, region_embed_train, tower_kind
from ravl_engine.shards import write_atomic

logger = logging.getLogger(__name__)

# idx (this rank's share of a batch, indices into the training set) -> (loss, CLIP loss, auxiliary term)
LossFn = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
# (training indices, the run's generator) -> the epoch's order (indices into the training set)
Sampler = Callable[[Tensor, torch.Generator], Tensor]


class ClipWithRegions(nn.Module):
    """A CLIP model's training forward pass as one module, so DistributedDataParallel can wrap it.

    ``forward(images, tokens, boxes)`` -> (image embeddings [B, D], region embeddings [sum K_i, D] or None, caption
    embeddings [B, D]). With boxes the regions are embedded in ``region_mode``, the audit's:

    - ``roi``: from the same backbone pass as the images (:func:`ravl_engine.kernels.roi.region_embed_train`);
    - ``roi-mean`` (ViT): RoIAlign-mean of the final patch tokens, same pass;
    - ``crop``: each box cropped, resized to the input and encoded by the image tower; a ResNet's BatchNorm runs
      on its running statistics for the crops (taken before the image pass updates them), so the crops are
      embedded as preparation embedded them and the image statistics stay those of the images alone.
    """

    def __init__(self, model: Any, region_mode: str = "roi") -> None:
        super().__init__()
        self.model = model
        self.region_mode = region_mode

    def forward(
        self, images: Tensor, tokens: Tensor, boxes: list[Tensor] | None
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        if boxes is None:
            image_emb, region_emb = self.model.encode_image(images), None
        elif self.region_mode == "crop" and tower_kind(self.model.visual) == "resnet" and self.model.visual.training:
            # the crops first: the image pass then updates the running statistics, which the crops must not see
            with _batchnorm_running_stats(self.model.visual):
                region_emb = crop_regions(self.model.visual, images, boxes)
            image_emb = self.model.visual(images)
        else:
            image_emb, region_emb = region_embed_train(self.model.visual, images, boxes, mode=self.region_mode)
        return image_emb, region_emb, self.model.encode_text(tokens)


def shuffle_sampler(train_idx: Tensor, generator: torch.Generator) -> Tensor:
    """Every training image once per epoch, in a random order."""
    return train_idx[torch.randperm(train_idx.numel(), generator=generator)]


def balanced_sampler(groups: Tensor) -> Sampler:
    """Group-balanced draws with replacement (each group equally likely), as many as there are training images.

    ``groups`` [N] int64 indexes the whole training set (the sampler is given the training indices).
    """

    def sample(train_idx: Tensor, generator: torch.Generator) -> Tensor:
        g = groups[train_idx]
        weight = 1.0 / torch.bincount(g).double()[g]
        return train_idx[torch.multinomial(weight, train_idx.numel(), replacement=True, generator=generator)]

    return sample


def zero_shot(model: Any, images: Tensor, text: Tensor, device: str, batch: int = 256) -> Tensor:
    """Zero-shot predictions [N] int64: the nearest class embedding (``text`` [C, D], unit rows) of each image, in
    batches of ``batch``; the one scoring of every validation rule (finetune and mitigate)."""
    preds = []
    for start in range(0, images.shape[0], batch):
        emb = F.normalize(model.encode_image(images[start : start + batch].to(device)).float(), dim=-1)
        preds.append((emb @ text.to(device).T).argmax(1).cpu())
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def optimizer_step(model: Any, optimizer: torch.optim.Optimizer, loss: Tensor) -> None:
    """Backward, AdamW step, and CLIP's cap of the logit scale at 100."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, 4.6052)


def snapshot(model: Any) -> dict[str, Tensor]:
    """A CPU copy of the model's weights."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save_checkpoint(path: Path, blob: dict[str, Any]) -> None:
    """torch.save to a temporary name, then rename: the file is either absent, the old one, or complete."""
    write_atomic(path, lambda tmp: torch.save(blob, tmp))


@dataclass(frozen=True, slots=True, kw_only=True)
class LoopConfig:
    """The schedule of one training run.

    Attributes:
        epochs, batch_size: passes over the training set and the global batch size.
        patience: stop after this many epochs without a better validation value (not with ``keep_last``).
        keep_last: keep the last epoch's weights (``--select last``); the validation value is still recorded.
        keep_start: the starting weights (epoch 0) compete with the trained epochs; False = only trained epochs
            can be kept (epoch 0 is still scored, as ``extra["start_val"]``).
        freeze_bn: every BatchNorm layer runs on its starting running statistics and keeps its affine weights
            (eval mode, no gradient), so the image path normalises as the region path and as at inference.
        seed: seeds the run's one generator; every epoch's order is drawn from it.
        metric: the name the validation value is recorded under in the history.
        tiebreak: the name of the second validation value, for a ``validate`` that returns a pair (value, tie-break):
            epochs are compared on the value, then on the tie-break; None = ``validate`` returns one float.
    """

    epochs: int
    batch_size: int
    patience: int
    keep_last: bool = False
    keep_start: bool = True
    freeze_bn: bool = False
    seed: int = 0
    metric: str = "zero_shot_accuracy"
    tiebreak: str | None = None


@dataclass(frozen=True)
class LoopResult:
    best_epoch: int
    best_val: float
    best_state: dict[str, Tensor]
    history: list[dict[str, float]]
    step_seconds: float
    steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def train_loop(
    model: Any,
    optimizer: torch.optim.Optimizer,
    train_idx: Tensor,
    loss_fn: LossFn,
    cfg: LoopConfig,
    *,
    sampler: Sampler = shuffle_sampler,
    validate: Callable[[], float | tuple[float, float]] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> LoopResult:
    """Train ``model`` in place; return the selected epoch's weights (a CPU copy) and the history.

    Without ``validate`` every epoch scores 0 and the last one is kept. Each history entry holds ``epoch``, the
    batch means of ``loss``, ``clip`` and ``aux``, ``cfg.metric`` and, for a pair-valued ``validate``,
    ``cfg.tiebreak``.
    """
    world = rank_world()[1]
    keep_last = cfg.keep_last or validate is None

    def score() -> tuple[float, ...]:
        value = validate() if validate is not None else 0.0
        return value if isinstance(value, tuple) else (value,)

    generator = torch.Generator().manual_seed(cfg.seed)
    start_key = score()
    best_key, best_epoch = (start_key, 0) if cfg.keep_start else ((float("-inf"),) * len(start_key), 0)
    best_state = snapshot(model)
    history: list[dict[str, float]] = []
    stale, steps, step_time = 0, 0, 0.0
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if cfg.freeze_bn else []
    for m in norms:
        m.requires_grad_(False)
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        for m in norms:
            m.eval()
        order = sampler(train_idx, generator)
        sums = {"loss": 0.0, "clip": 0.0, "aux": 0.0}
        batches = 0
        for start in range(0, order.numel(), cfg.batch_size):
            # every rank draws the same global order and takes its equal, contiguous share of each batch
            idx = local_share(order[start : start + cfg.batch_size])
            if idx.numel() * world < 2:
                continue
            t_step = time.perf_counter()
            loss, loss_cl, aux = loss_fn(idx)
            optimizer_step(model, optimizer, loss)
            step_time += time.perf_counter() - t_step
            steps += 1
            sums["loss"] += loss.item()
            sums["clip"] += loss_cl.item()
            sums["aux"] += aux.item()
            batches += 1
        sync_buffers(model)  # BatchNorm statistics: rank 0's everywhere, so every rank validates the same model
        key = score()
        entry = {"epoch": float(epoch), **{k: v / max(1, batches) for k, v in sums.items()}, cfg.metric: key[0]}
        if cfg.tiebreak is not None and len(key) > 1:
            entry[cfg.tiebreak] = key[1]
        history.append(entry)
        logger.info("epoch %d: %s", epoch, entry)
        if on_epoch is not None:
            on_epoch(entry)
        if keep_last or key > best_key:
            best_key, best_epoch, stale = key, epoch, 0
            best_state = snapshot(model)
        else:
            stale += 1
            if stale >= cfg.patience:
                logger.info("early stop after epoch %d (best epoch %d)", epoch, best_epoch)
                break
    model.eval()
    return LoopResult(
        best_epoch=best_epoch,
        best_val=best_key[0],
        best_state=best_state,
        history=history,
        step_seconds=step_time / max(1, steps),
        steps=steps,
        extra={"start_val": start_key[0]},
    )


def write_checkpoint(path: Path, blob: dict[str, Any]) -> None:
    """Rank 0 writes the checkpoint (once, at the end: an interrupted run leaves none that looks finished)."""
    if rank_world()[0] == 0:
        save_checkpoint(path, blob)
    barrier()
