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
