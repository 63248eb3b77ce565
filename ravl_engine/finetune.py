"""CLIP contrastive fine-tuning (the core loop; the ``finetune`` command builds on it)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from kernels.loss import clip_loss

logger = logging.getLogger(__name__)


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
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Fine-tune ``model`` in place on (image, caption) pairs with the CLIP loss.

    Args:
        model: open_clip model.
        tokenizer: its tokenizer.
        images: [N, 3, S, S] normalised images at the tower's input size (on the model's device or CPU).
        captions: N captions.
        epochs, batch_size, lr, weight_decay: AdamW training schedule (constant learning rate).
        freeze_text: keep the text tower fixed (the paper's setting for pretrained models).
        seed: shuffling seed.
        on_epoch: called with each epoch's stats.

    Returns:
        One dict per epoch: ``epoch``, ``loss`` (mean over batches).
    """
    if len(captions) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
    device = next(model.parameters()).device
    tokens = tokenizer(list(captions))
    text_params = {id(p) for name, p in model.named_parameters() if not name.startswith("visual.")}
    params = [p for p in model.parameters() if not (freeze_text and id(p) in text_params)]
    for p in model.parameters():
        p.requires_grad_(not (freeze_text and id(p) in text_params))
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    history = []
    model.train()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(images.shape[0], generator=generator)
        total, batches = 0.0, 0
        for start in range(0, images.shape[0] - 1, batch_size):
            idx = order[start : start + batch_size]
            if idx.numel() < 2:
                continue
            image_emb = model.encode_image(images[idx].to(device))
            text_emb = model.encode_text(tokens[idx].to(device))
            loss = clip_loss(image_emb, text_emb, model.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, 4.6052)  # CLIP caps the scale at 100
            total += loss.item()
            batches += 1
        stats = {"epoch": float(epoch), "loss": total / max(1, batches)}
        history.append(stats)
        logger.info("epoch %d: loss %.4f", epoch, stats["loss"])
        if on_epoch is not None:
            on_epoch(stats)
    model.eval()
    return history
