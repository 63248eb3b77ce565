"""The proposer protocol, the registry, and box clean-up shared by every proposer."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "ravl_engine.proposers"


@dataclass(frozen=True, slots=True)
class Proposals:
    """Regions of one image.

    Attributes:
        boxes: [K, 4] float32, xyxy, input pixels, inside the image, non-empty.
        scores: [K] float32, the proposer's confidence (1 for fixed layouts).
        stats: counts of boxes ``clipped`` to the image and ``dropped`` (empty, too small, low score, over the cap).
        source: [K] int64, index of each box in the proposer's raw output (-1 for the added whole-image box); lets
            per-box metadata (the manifest's region labels) follow the boxes that were kept.
    """

    boxes: Tensor
    scores: Tensor
    stats: dict[str, int] = field(default_factory=dict)
    source: Tensor | None = None


class RegionProposer(Protocol):
    """Maps a batch of images to regions.

    A proposer may set a class attribute ``needs_pixels = False`` when it reads only the images' size (fixed
    layouts, given boxes); the embedding engine then passes a zero-stride stand-in of the right shape instead of the
    full-size image. Without the attribute it gets the decoded full-size image.
    """

    def __call__(self, images: Tensor, *, boxes: Sequence[Tensor | None] | None = None) -> list[Proposals]:
        """images: [B, 3, H, W] float in [0, 1]; boxes: optional per-image boxes from the manifest."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class BoxFilter:
    """Clean-up applied to every proposer's boxes.

    Attributes:
        max_boxes: keep at most this many boxes per image, highest score first (None: all).
        min_size: drop boxes whose width or height is below this many pixels (after clipping).
        score_threshold: drop boxes scoring below this (None: keep all).
        whole_image: add the whole image as one more region (score 1).
    """

    max_boxes: int | None = None
    min_size: float = 1.0
    score_threshold: float | None = None
    whole_image: bool = False

    def __post_init__(self) -> None:
        if self.max_boxes is not None and self.max_boxes < 1:
            raise ValueError(f"max_boxes must be >= 1 (or None), got {self.max_boxes}")
        if self.min_size < 0:
            raise ValueError(f"min_size must be >= 0, got {self.min_size}")


def finalize_boxes(boxes: Tensor, scores: Tensor, *, height: int, width: int, filt: BoxFilter) -> Proposals:
    """Clip boxes to the image, drop empty / small / low-scoring ones, cap the count, add the whole image.

    Args:
        boxes: [K, 4] xyxy pixels (any float dtype; may lie partly or wholly outside the image).
        scores: [K] scores.
        height, width: image size in pixels.
        filt: the clean-up rules.

    Returns:
        Proposals with float32 boxes and scores and the clipped / dropped counts.
    """
    boxes = boxes.detach().to(torch.float32).reshape(-1, 4)
    scores = scores.detach().to(torch.float32).reshape(-1)
    limits = torch.tensor([width, height, width, height], dtype=torch.float32, device=boxes.device)
    clipped = torch.minimum(boxes.clamp_min(0.0), limits)
    n_clipped = int((clipped != boxes).any(dim=1).sum())
    w = clipped[:, 2] - clipped[:, 0]
    h = clipped[:, 3] - clipped[:, 1]
    keep = (w > 0) & (h > 0) & (w >= filt.min_size) & (h >= filt.min_size)
    keep &= torch.isfinite(clipped).all(dim=1)
    if filt.score_threshold is not None:
        keep &= scores >= filt.score_threshold
    source = keep.nonzero().squeeze(1)
    if filt.max_boxes is not None and source.shape[0] > filt.max_boxes:
        order = torch.sort(scores[source], descending=True, stable=True).indices[: filt.max_boxes]
        source = source[torch.sort(order).values]  # keep the proposer's order among the kept boxes
    kept_boxes, kept_scores = clipped[source], scores[source]
    n_dropped = boxes.shape[0] - kept_boxes.shape[0]
    if filt.whole_image:
        kept_boxes = torch.cat([kept_boxes, limits.new_tensor([[0.0, 0.0, width, height]])])
        kept_scores = torch.cat([kept_scores, kept_scores.new_ones(1)])
        source = torch.cat([source, source.new_full((1,), -1)])
    return Proposals(
        boxes=kept_boxes, scores=kept_scores, stats={"clipped": n_clipped, "dropped": n_dropped}, source=source.cpu()
    )


_REGISTRY: dict[str, Callable[..., RegionProposer]] = {}


def register_proposer(name: str) -> Callable[[Callable[..., RegionProposer]], Callable[..., RegionProposer]]:
    """Decorator registering a proposer factory under ``name``; a second registration of a name raises."""

    def wrap(factory: Callable[..., RegionProposer]) -> Callable[..., RegionProposer]:
        if name in _REGISTRY:
            raise ValueError(f"a proposer named {name!r} is already registered ({_REGISTRY[name]!r})")
        _REGISTRY[name] = factory
        return factory

    return wrap


def _load_entry_points() -> None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        try:
            _REGISTRY[ep.name] = ep.load()
        except Exception as err:  # a broken plugin must not break the built-in proposers
            logger.warning("proposer plugin %r (%s) failed to load: %s", ep.name, ep.value, err)


def list_proposers() -> list[str]:
    """Names of all registered proposers (built-in and entry points), sorted."""
    _load_entry_points()
    return sorted(_REGISTRY)


def build_proposer(name: str, **cfg: Any) -> RegionProposer:
    """Build a proposer by name.

    Raises:
        ValueError: unknown name (the message lists the valid ones) or invalid settings.
    """
    if name not in _REGISTRY:
        _load_entry_points()
    if name not in _REGISTRY:
        raise ValueError(f"unknown proposer {name!r}; choose one of {', '.join(list_proposers())}")
    return _REGISTRY[name](**cfg)
