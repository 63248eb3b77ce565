"""The epoch selection rule of mitigation that does not leak: the audit set's pseudo-groups.

The audit set (the labelled images discovery ran on) is split in two halves by a seeded hash of each image id:
an image goes to the *selection half* when the first byte of ``sha256(f"{seed}:{image id}")`` is even, else to the
*test half*. The split depends on nothing but the id and the seed, so every method, every training seed and the
benchmark's evaluation see the same halves.

Pseudo-groups are class x "the image has a region in the chosen spurious cluster", the second read from
discovery.json itself (the audit images its cluster lists), never from ground-truth feature labels
(``region_labels`` or has-feature columns of the manifest are not read). Each epoch the selection half's zero-shot
accuracy is computed per pseudo-group, and the epoch with the best worst pseudo-group accuracy is kept; the test
half is left for evaluation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ravl_engine.errors import ConfigError
from ravl_engine.finetune import load_images
from ravl_engine.manifest import ManifestRow, read_manifest


def in_selection_half(image_id: str, seed: int = 0) -> bool:
    """Whether an audit image belongs to the selection half (else the test half); see the module docstring."""
    return hashlib.sha256(f"{seed}:{image_id}".encode()).digest()[0] % 2 == 0


def split_halves(rows: Sequence[ManifestRow], seed: int = 0) -> tuple[list[ManifestRow], list[ManifestRow]]:
    """(selection half, test half) of an audit manifest's rows, in manifest order."""
    select = [r for r in rows if in_selection_half(r.image, seed)]
    test = [r for r in rows if not in_selection_half(r.image, seed)]
    return select, test


def worst_group_accuracy(correct: Tensor, groups: Tensor, n_groups: int) -> float:
    """The lowest per-group mean of ``correct`` over the groups that have members."""
    return group_accuracy(correct, groups, n_groups)[0]


def group_accuracy(correct: Tensor, groups: Tensor, n_groups: int) -> tuple[float, float]:
    """(worst, mean) of the per-group means of ``correct`` over the groups that have members: the selection key.

    Epochs are compared on the worst group first and on the mean of the groups where the worst ties (from scratch
    every epoch can have a group at 0, and the earliest would otherwise win, chance-level or not).
    """
    count = torch.bincount(groups, minlength=n_groups)
    per = (torch.zeros(n_groups).index_add(0, groups, correct.float()) / count.clamp(min=1))[count > 0]
    return float(per.min()), float(per.mean())


@dataclass(frozen=True)
class PseudoGroupSet:
    """The selection half of the audit set, ready for per-epoch zero-shot scoring.

    Attributes:
        images: [N, 3, S, S] normalised at the trained model's input.
        labels: [N] int64 class indices (discovery.json's class order).
        groups: [N] int64 pseudo-group 2 * class + (image listed in the spurious cluster).
        n_groups: 2 * number of classes.
        path: the audit manifest.
    """

    images: Tensor
    labels: Tensor
    groups: Tensor
    n_groups: int
    path: str


def pseudo_group_set(
    audit_data: str | Path,
    classes: Sequence[str],
    spurious_images: frozenset[str],
    *,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    resize: str = "squash",
    seed: int = 0,
) -> PseudoGroupSet:
    """Load the selection half of the audit manifest with its pseudo-groups.

    Raises:
        ConfigError: an unlabelled row, a label outside the discovery's classes, or an empty selection half (names
            the manifest and the way out).
    """
    rows = read_manifest(audit_data)
    index = {c: i for i, c in enumerate(classes)}
    for n, r in enumerate(rows):
        if r.label is None or r.label not in index:
            raise ConfigError(
                f"{audit_data}: row {n + 1} has label {r.label!r}, not one of the discovery's classes; "
                "--select pseudo-group needs the labelled audit manifest (pass it as --audit-data), or use "
                "--select accuracy / last"
            )
    select, _ = split_halves(rows, seed)
    if not select:
        raise ConfigError(f"{audit_data}: the selection half is empty ({len(rows)} images); audit more images")
    images, _ = load_images([r.path for r in select], size=size, mean=mean, std=std, resize=resize)
    labels = torch.tensor([index[r.label] for r in select if r.label is not None], dtype=torch.long)
    present = torch.tensor([r.image in spurious_images for r in select], dtype=torch.long)
    return PseudoGroupSet(
        images=images, labels=labels, groups=2 * labels + present, n_groups=2 * len(classes), path=str(audit_data)
    )
