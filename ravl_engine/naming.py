"""Names for discovered clusters: phrases scored with the audited model's own text tower.

A phrase's score for cluster c is the mean cosine similarity between its text embedding and the cluster's regions
minus its mean similarity to every region of the run, ``(mean_c - mean_all) . t``. Subtracting the run-wide mean
keeps a phrase that is close to every region (a generic one, or one the text tower maps near the image manifold's
centre) from naming every cluster. The phrase embeddings are computed at ``cluster`` time from the model the run
recorded (its checkpoint's sha256 is checked), with the run's prompt templates.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ravl_engine.documents import RunRecord
from ravl_engine.errors import ConfigError, RavlEngineError, RavlEngineWarning
from ravl_engine.zeroshot import DEFAULT_TEMPLATES, class_text_embeddings

logger = logging.getLogger(__name__)

SCORE_RULE = "mean cosine to the cluster's regions minus mean cosine to all regions"
TEXT_BATCH = 256  # phrases per text-tower pass: bounds memory for large vocabularies and large towers


def read_vocabulary(path: str | Path) -> list[str]:
    """Phrases of a vocabulary file, one per line (blank lines and lines starting with '#' ignored).

    Raises:
        ConfigError: the file cannot be read or holds no phrase.

    Duplicates (ignoring case and surrounding spaces) are dropped with a ``RavlEngineWarning`` naming the first one.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"vocabulary {path}: cannot read it ({err}); give a UTF-8 text file, one phrase per line"
        ) from err
    phrases = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not phrases:
        raise ConfigError(f"vocabulary {path} has no phrase; write one phrase per line")
    unique: dict[str, str] = {}
    duplicates = []
    for phrase in phrases:
        if phrase.casefold() in unique:
            duplicates.append(phrase)
        else:
            unique[phrase.casefold()] = phrase
    if duplicates:
        warnings.warn(
            f"vocabulary {path}: {len(duplicates)} duplicate phrase(s) dropped (first: {duplicates[0]!r})",
            RavlEngineWarning,
            stacklevel=2,
        )
    return list(unique.values())


def cluster_means(x: Tensor, labels: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-cluster sums and counts of region embeddings: ([K, D] float64, [K] int64). Sums, not means, so that ranks
    holding shares of the regions can add theirs."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, labels, x.double())
    return sums, torch.bincount(labels, minlength=k)


def phrase_scores(sums: Tensor, counts: Tensor, phrases: Tensor) -> Tensor:
    """[K, P] float64 scores ``(mean_c - mean_all) . t_p`` from cluster sums [K, D], counts [K], phrases [P, D].

    Empty clusters score 0 for every phrase.
    """
    phrases = phrases.double()
    overall = sums.sum(0) / counts.sum().clamp(min=1)
    means = sums / counts.clamp(min=1)[:, None]
    scores = (means - overall) @ phrases.T
    return torch.where(counts[:, None] > 0, scores, torch.zeros_like(scores))


def top_names(scores: Tensor, phrases: Sequence[str], *, top: int = 5) -> list[list[dict[str, Any]]]:
    """For each cluster (row), its ``top`` best phrases with their scores, best first."""
    values, index = scores.topk(min(top, scores.shape[1]), dim=1)
    return [
        [{"phrase": phrases[j], "score": float(v)} for v, j in zip(vs, js, strict=True)]
        for vs, js in zip(values.tolist(), index.tolist(), strict=True)
    ]


def phrase_embeddings(record: RunRecord, phrases: Sequence[str], *, checkpoint: str | None = None) -> Tensor:
    """[P, D] unit rows: each phrase through the run's text tower, averaged over the run's prompt templates.

    Args:
        record: the run's record (model name, checkpoint path and sha256, templates).
        phrases: the vocabulary.
        checkpoint: the audited checkpoint's current path, if it moved since ``embed`` (its sha256 must match).

    Raises:
        ConfigError: the checkpoint is missing or changed, or the model cannot be loaded.
    """
    from ravl_engine.models import load_clip  # noqa: PLC0415  (open_clip is heavy)
    from ravl_engine.shards import sha256_file  # noqa: PLC0415

    pretrained = checkpoint or record.model.pretrained
    expected = record.model.checkpoint_sha256
    if expected is not None:
        if not pretrained or not Path(pretrained).is_file():
            raise ConfigError(
                f"the audited checkpoint {pretrained} is gone; pass its new path (--checkpoint) to name the clusters"
            )
        if sha256_file(pretrained) != expected:
            raise ConfigError(
                f"checkpoint {pretrained} changed since embed (sha256 differs); pass the audited one (--checkpoint)"
            )
    loaded = load_clip(record.model.name, pretrained)
    templates = record.templates or DEFAULT_TEMPLATES
    parts = [
        class_text_embeddings(loaded.model, loaded.tokenizer, phrases[i : i + TEXT_BATCH], templates)
        for i in range(0, len(phrases), TEXT_BATCH)
    ]
    return torch.cat(parts)


def name_clusters(
    record: RunRecord,
    phrases: Sequence[str],
    sums: Tensor,
    counts: Tensor,
    *,
    top: int = 5,
    checkpoint: str | None = None,
) -> tuple[list[list[dict[str, Any]]] | None, str | None]:
    """Names of every cluster (by cluster id), or (None, reason) when the text tower is unavailable.

    A missing or changed checkpoint, or a model that cannot be loaded, skips naming with a ``RavlEngineWarning``
    that says why: discovery itself needs no model.
    """
    try:
        text = phrase_embeddings(record, phrases, checkpoint=checkpoint)
    except RavlEngineError as err:
        reason = f"clusters not named: {err}"
        warnings.warn(reason, RavlEngineWarning, stacklevel=2)
        return None, reason
    if text.shape[1] != sums.shape[1]:
        reason = f"clusters not named: the text tower gives {text.shape[1]}-dim embeddings, the regions {sums.shape[1]}"
        warnings.warn(reason, RavlEngineWarning, stacklevel=2)
        return None, reason
    return top_names(phrase_scores(sums, counts, text), phrases, top=top), None
