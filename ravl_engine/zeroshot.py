"""Zero-shot classification: class text embeddings from prompt templates, softmax scores."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

# the MNIST templates of RaVL's controlled evaluation (../shared/docs/RAVL_METHOD.md)
DEFAULT_TEMPLATES = ("a photo of the number {}", "the digit {}", "an image of a {}", "{}")
TEMPERATURE = 0.07


@torch.no_grad()
def class_text_embeddings(
    model: Any, tokenizer: Any, classes: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
) -> Tensor:
    """Class embedding = mean of the L2-normalised template embeddings, renormalised.

    Args:
        model: open_clip model (``encode_text``).
        tokenizer: its tokenizer.
        classes: C class names.
        templates: format strings with one ``{}``.

    Returns:
        [C, D] float32, unit rows.
    """
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("every prompt template needs one '{}' for the class name")
    device = next(model.parameters()).device
    texts = [t.format(c) for c in classes for t in templates]
    emb = model.encode_text(tokenizer(texts).to(device)).float()
    emb = torch.nn.functional.normalize(emb, dim=-1).view(len(classes), len(templates), -1).mean(dim=1)
    return torch.nn.functional.normalize(emb, dim=-1).cpu()


def zero_shot_probs(embeddings: Tensor, text: Tensor, *, temperature: float = TEMPERATURE) -> Tensor:
    """softmax(emb @ text.T / temperature) over classes, in float32. [N, D] x [C, D] -> [N, C]."""
    emb = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    return torch.softmax(emb @ text.float().T / temperature, dim=-1)
