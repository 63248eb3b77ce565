"""Fixed-layout proposers (quadrants, grid) and boxes given with each image (manifest)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ravl_engine.proposers.base import BoxFilter, Proposals, finalize_boxes, register_proposer


def grid_boxes(height: int, width: int, rows: int, cols: int) -> Tensor:
    """[rows * cols, 4] float32 xyxy boxes tiling the image, row-major (top-left cell first)."""
    ys = torch.linspace(0.0, float(height), rows + 1)
    xs = torch.linspace(0.0, float(width), cols + 1)
    y1, x1 = torch.meshgrid(ys[:-1], xs[:-1], indexing="ij")
    y2, x2 = torch.meshgrid(ys[1:], xs[1:], indexing="ij")
    return torch.stack([x1, y1, x2, y2], dim=-1).reshape(-1, 4)


class GridProposer:
    """Every image is cut into ``rows x cols`` equal cells (score 1 each)."""

    needs_pixels = False  # reads only the image size: the engine passes no full-size pixels

    def __init__(self, *, rows: int = 2, cols: int = 2, box_filter: BoxFilter | None = None) -> None:
        # options arrive from KEY=VALUE text: a non-integer must not reach the comparison below
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (rows, cols)):
            raise ValueError(f"grid needs integer rows >= 1 and cols >= 1, got rows={rows!r}, cols={cols!r}")
        self.rows, self.cols = rows, cols
        self.box_filter = box_filter or BoxFilter()

    def __call__(self, images: Tensor, *, boxes: Sequence[Tensor | None] | None = None) -> list[Proposals]:
        height, width = int(images.shape[-2]), int(images.shape[-1])
        cells = grid_boxes(height, width, self.rows, self.cols)
        scores = torch.ones(cells.shape[0])
        proposal = finalize_boxes(cells, scores, height=height, width=width, filt=self.box_filter)
        return [proposal for _ in range(images.shape[0])]


@register_proposer("grid")
def build_grid(*, rows: int = 2, cols: int = 2, box_filter: BoxFilter | None = None) -> GridProposer:
    return GridProposer(rows=rows, cols=cols, box_filter=box_filter)


@register_proposer("quadrants")
def build_quadrants(*, box_filter: BoxFilter | None = None) -> GridProposer:
    """The 2 x 2 quadrants of the controlled digit images (RaVL's synthetic evaluation)."""
    return GridProposer(rows=2, cols=2, box_filter=box_filter)


class ManifestProposer:
    """Uses the boxes listed with each image in the manifest (clipped and filtered like any proposer)."""

    needs_pixels = False

    def __init__(self, *, box_filter: BoxFilter | None = None) -> None:
        self.box_filter = box_filter or BoxFilter()

    def __call__(self, images: Tensor, *, boxes: Sequence[Tensor | None] | None = None) -> list[Proposals]:
        if boxes is None or len(boxes) != images.shape[0]:
            raise ValueError(
                "proposer 'manifest' needs the manifest's boxes for every image (a 'boxes' column); "
                "use another proposer for images without boxes"
            )
        height, width = int(images.shape[-2]), int(images.shape[-1])
        out = []
        for given in boxes:
            b = given if given is not None else torch.zeros(0, 4)
            out.append(finalize_boxes(b, torch.ones(b.shape[0]), height=height, width=width, filt=self.box_filter))
        return out


@register_proposer("manifest")
def build_manifest(*, box_filter: BoxFilter | None = None) -> ManifestProposer:
    return ManifestProposer(box_filter=box_filter)
