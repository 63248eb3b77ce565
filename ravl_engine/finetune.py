"""CLIP contrastive fine-tuning (the core loop; the ``finetune`` command builds on it)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ravl_engine.distributed import gather_with_grad, local_device, wrap_ddp
from ravl_engine.errors import ConfigError
from ravl_engine.images import check_resize, load_input, normalize
from ravl_engine.kernels.loss import clip_loss
from ravl_engine.manifest import read_manifest, resolve_classes
from ravl_engine.models import load_clip
from ravl_engine.outputs import check_not_input, check_out
from ravl_engine.training import (  # noqa: F401 (optimizer_step, snapshot, save_checkpoint: re-exported)
    ClipWithRegions,
    LoopConfig,
    LossFn,
    optimizer_step,
    save_checkpoint,
    snapshot,
    train_loop,
    write_checkpoint,
    zero_shot,
)
from ravl_engine.zeroshot import DEFAULT_TEMPLATES, class_text_embeddings

logger = logging.getLogger(__name__)


def schedule_defaults(pretrained: str | None, lr: float | None, freeze_text: bool | None) -> tuple[float, bool]:
    """(learning rate, freeze the text tower): 1e-3 and both towers from scratch; 5e-5 and the image tower only
    from pretrained weights (the paper); explicit values win."""
    from_weights = pretrained is not None
    return (lr if lr is not None else (5e-5 if from_weights else 1e-3)), (
        freeze_text if freeze_text is not None else from_weights
    )


def holdout_split(n: int, fraction: float, seed: int, *, source: str) -> tuple[Tensor, Tensor]:
    """(validation indices, training indices): a seeded random ``fraction`` of n (at least one) held out.

    Raises:
        ConfigError: fewer than two training images would remain (names ``source``).
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(fraction * n)))
    if n - n_val < 2:
        raise ConfigError(f"{source}: too few images ({n}) to hold out {n_val} for validation")
    return order[:n_val], order[n_val:]


def make_optimizer(model: Any, *, lr: float, weight_decay: float, freeze_text: bool) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; with ``freeze_text`` everything outside the image tower is frozen."""
    params = []
    for name, p in model.named_parameters():
        trainable = not (freeze_text and not name.startswith("visual."))
        p.requires_grad_(trainable)
        if trainable:
            params.append(p)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def train_clip(
    model: Any,
    tokenizer: Any,
    images: Tensor,
    captions: Sequence[str],
    *,
    epochs: int = 4,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    freeze_text: bool = False,
    seed: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    towers: nn.Module | None = None,
) -> list[dict[str, float]]:
    """Fine-tune ``model`` in place on (image, caption) pairs with the CLIP loss.

    Args:
        model: open_clip model.
        tokenizer: its tokenizer.
        images: [N, 3, S, S] normalised images at the tower's input size (on the model's device or CPU).
        captions: N captions.
        epochs, batch_size, lr, weight_decay: AdamW training schedule (constant learning rate).
        freeze_text: keep the text tower fixed (the paper's setting for pretrained models).
        seed: seeds the run's one shuffling generator.
        optimizer: an optimizer to continue with (from :func:`make_optimizer`); default a new AdamW.
        on_epoch: called with each epoch's stats.
        towers: the forward pass (:class:`ravl_engine.training.ClipWithRegions` of ``model``, wrapped by
            :func:`ravl_engine.distributed.wrap_ddp` under torchrun: each rank then takes its equal share of every
            batch and the loss is the global batch's).

    Returns:
        One dict per epoch: ``epoch``, ``loss`` (mean over batches).
    """
    if len(captions) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
    optimizer = optimizer or make_optimizer(model, lr=lr, weight_decay=weight_decay, freeze_text=freeze_text)
    loop = LoopConfig(epochs=epochs, batch_size=batch_size, patience=epochs, seed=seed)
    loss_fn = clip_step(model, images, tokenizer(list(captions)), towers or ClipWithRegions(model))
    result = train_loop(model, optimizer, torch.arange(images.shape[0]), loss_fn, loop, on_epoch=on_epoch)
    return [{"epoch": h["epoch"], "loss": h["loss"]} for h in result.history]


def clip_step(model: Any, images: Tensor, tokens: Tensor, towers: nn.Module) -> LossFn:
    """The loss of ``finetune`` (and ``mitigate --method standard``): the CLIP loss of the global batch."""
    device = next(model.parameters()).device

    def loss_fn(idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        image_emb, _, text_emb = towers(images[idx].to(device), tokens[idx].to(device), None)
        loss = clip_loss(gather_with_grad(image_emb), gather_with_grad(text_emb), model.logit_scale.exp())
        return loss, loss, loss.new_zeros(())

    return loss_fn


@dataclass(frozen=True, slots=True, kw_only=True)
class FinetuneConfig:
    """Options of ``ravl-engine finetune``.

    Attributes:
        train: manifest with ``image`` and ``caption`` (and ``label`` for early stopping on zero-shot accuracy).
        out: checkpoint file to write (records its architecture; loadable by ``embed --pretrained``).
        model, pretrained: starting point (default: the tiny ResNet CLIP from scratch).
        epochs, batch_size, lr, weight_decay: AdamW schedule. ``lr`` None = 1e-3 from scratch, 5e-5 from weights.
        freeze_text: None = freeze the text tower when starting from pretrained weights (the paper), train both
            towers from scratch.
        val_fraction: share of the images held out for early stopping.
        patience: stop after this many epochs without improvement on the validation split.
        templates: zero-shot templates for the validation accuracy.
        seed, device: as everywhere.
        resize: how images fit the model input, "squash" (default) or "pad" (letterbox); see ``EmbedConfig``.
        overwrite: replace an existing ``out`` (default: refuse). ``out`` may never be the starting checkpoint or
            the manifest.
    """

    train: str
    out: str
    model: str = "ravl-tiny-rn"
    pretrained: str | None = None
    epochs: int = 8
    batch_size: int = 128
    lr: float | None = None
    weight_decay: float = 0.1
    freeze_text: bool | None = None
    val_fraction: float = 0.1
    patience: int = 2
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    seed: int = 0
    device: str = "cpu"
    resize: str = "squash"
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_resize(self.resize)
        if self.epochs < 1 or self.batch_size < 2:
            raise ConfigError(f"need epochs >= 1 and batch_size >= 2, got {self.epochs}, {self.batch_size}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.patience < 1:
            raise ConfigError(f"patience must be >= 1, got {self.patience}")


@dataclass(frozen=True)
class FinetuneResult:
    checkpoint: str
    best_epoch: int
    best_val: float
    val_metric: str
    history: list[dict[str, float]]
    n_train: int
    n_val: int
    seconds: float
    warnings: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_images(
    paths: Sequence[Path], *, size: int, mean: Sequence[float], std: Sequence[float], resize: str = "squash"
) -> tuple[Tensor, Tensor]:
    """Decode, fit to the model input (``resize``: "squash" or "pad", never a crop) and normalise images, one at a
    time in uint8 (ravl_engine/images.py), so memory does not grow with the source resolution.

    Returns:
        (images [N, 3, size, size] float32, placements [N, 4] float64 (scale_x, scale_y, offset_x, offset_y) mapping
        original-image pixels into the input).

    Raises:
        ConfigError: an image cannot be read (names the file).
    """
    pixels = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    placements = torch.empty(len(paths), 4, dtype=torch.float64)
    for i, path in enumerate(paths):
        try:
            pixels[i], where, _ = load_input(path, size, resize)
        except Exception as err:
            raise ConfigError(f"{path}: cannot read the image ({type(err).__name__}: {err})") from err
        placements[i] = where.as_tensor()
    return normalize(pixels, torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)), placements


def run_finetune(cfg: FinetuneConfig, *, on_epoch: Callable[[dict[str, float]], None] | None = None) -> FinetuneResult:
    """Fine-tune a CLIP model on a captioned manifest with early stopping; write the best checkpoint atomically."""
    t0 = time.perf_counter()
    cfg = dataclasses.replace(cfg, device=local_device(cfg.device))
    check_not_input(cfg.out, {"--pretrained": cfg.pretrained, "--train": cfg.train})
    check_out(cfg.out, overwrite=cfg.overwrite)
    rows = read_manifest(cfg.train)
    missing = [i for i, r in enumerate(rows) if r.caption is None]
    if missing:
        raise ConfigError(f"{cfg.train}: row {missing[0] + 1} has no caption; finetuning needs a 'caption' column")
    labelled = all(r.label is not None for r in rows)
    classes = resolve_classes(rows) if labelled else []
    loaded = load_clip(cfg.model, cfg.pretrained, device=cfg.device, init_seed=cfg.seed)
    lr, freeze_text = schedule_defaults(loaded.weights, cfg.lr, cfg.freeze_text)
    images, _ = load_images(
        [r.path for r in rows], size=loaded.image_size, mean=loaded.mean, std=loaded.std, resize=cfg.resize
    )
    val_idx, train_idx = holdout_split(len(rows), cfg.val_fraction, cfg.seed, source=cfg.train)
    captions = [rows[i].caption or "" for i in train_idx.tolist()]
    model = loaded.model
    label_of = {c: i for i, c in enumerate(classes)}
    val_labels = torch.tensor([label_of[rows[i].label] for i in val_idx.tolist()]) if labelled else None  # type: ignore[index]
    val_captions = [rows[i].caption or "" for i in val_idx.tolist()]

    @torch.no_grad()
    def validate() -> float:
        model.eval()
        if val_labels is not None:
            text = class_text_embeddings(model, loaded.tokenizer, classes, cfg.templates)
            return float((zero_shot(model, images[val_idx], text, cfg.device) == val_labels).float().mean())
        emb = model.encode_image(images[val_idx].to(cfg.device)).float().cpu()
        txt = model.encode_text(loaded.tokenizer(val_captions).to(cfg.device)).float().cpu()
        return -float(clip_loss(emb, txt, model.logit_scale.exp().cpu()))

    metric = "zero_shot_accuracy" if labelled else "neg_clip_loss"
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    optimizer = make_optimizer(model, lr=lr, weight_decay=cfg.weight_decay, freeze_text=freeze_text)
    towers = wrap_ddp(ClipWithRegions(model), cfg.device)
    loss_fn = clip_step(model, images[train_idx], loaded.tokenizer(captions), towers)
    loop = LoopConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, patience=cfg.patience, seed=cfg.seed, metric=metric)
    # the indices of the loop are positions in images[train_idx]
    result = train_loop(
        model, optimizer, torch.arange(train_idx.numel()), loss_fn, loop, validate=validate, on_epoch=on_epoch
    )
    best = (result.best_val, result.best_epoch)
    write_checkpoint(out, {"arch": loaded.name, "state_dict": result.best_state, "epoch": best[1], metric: best[0]})
    warnings = []
    if best[1] == 0:
        warnings.append(
            f"no epoch beat the starting weights on the validation split ({metric} {best[0]:.4f}), so {out} holds "
            "the untrained weights; train longer, change --lr, or check the captions"
        )
        logger.info("%s", warnings[-1])  # the CLI prints result.warnings on stderr
    return FinetuneResult(
        checkpoint=str(out),
        best_epoch=best[1],
        best_val=best[0],
        val_metric=metric,
        history=result.history,
        n_train=int(train_idx.numel()),
        n_val=int(val_idx.numel()),
        seconds=time.perf_counter() - t0,
        warnings=warnings,
    )
