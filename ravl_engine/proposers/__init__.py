"""Region proposer plugins behind one registry.

A proposer maps a batch of images to boxes (xyxy pixels) and scores per image::

    from ravl_engine.proposers import build_proposer, list_proposers
    proposer = build_proposer("grid", rows=3, cols=3)
    proposals = proposer(images)            # images: [B, 3, H, W] float in [0, 1]
    proposals[0].boxes, proposals[0].scores

Built in: ``quadrants``, ``grid``, ``manifest`` (boxes given with each image), ``rpn`` (torchvision Faster R-CNN
region proposal network) and ``yolo`` (ultralytics). Third-party proposers register through the Python entry point
group ``ravl_engine.proposers`` (``name = "package.module:factory"``).
"""

from __future__ import annotations

from ravl_engine.proposers import detectors as _detectors  # noqa: F401  (registers rpn, yolo)
from ravl_engine.proposers import simple as _simple  # noqa: F401  (registers quadrants, grid, manifest)
from ravl_engine.proposers.base import (
    BoxFilter,
    Proposals,
    RegionProposer,
    build_proposer,
    finalize_boxes,
    list_proposers,
    register_proposer,
)

__all__ = [
    "BoxFilter",
    "Proposals",
    "RegionProposer",
    "build_proposer",
    "finalize_boxes",
    "list_proposers",
    "register_proposer",
]
