"""Image decoding and fitting to a model's square input, one image at a time, in uint8.

Every image is decoded to 8-bit RGB by its own bit depth (16-bit grey is scaled, not clipped), resized straight to
the model's input size while still uint8 (Pillow's antialiased bilinear filter), and only then turned into floats
by the caller, a batch of model-size images. So the memory a batch needs does not grow with the source resolution:
one decoded uint8 image per worker at a time.

Two ways to fit an image into the ``size x size`` input, neither of which crops (a region at the border would be cut
away and the audit could not see it):

- ``squash`` (default): stretch to ``size x size``; the aspect ratio changes.
- ``pad``: letterbox: scale the longer side to ``size`` keeping the aspect ratio, centre it, fill the rest black.

A ``Placement`` (scale and offset per axis) maps boxes from original-image pixels into the input and back; boxes
are always stored in original-image pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ravl_engine.errors import ConfigError

logger = logging.getLogger(__name__)

RESIZE_MODES = ("squash", "pad")


def check_resize(mode: str) -> None:
    """Raises ConfigError unless ``mode`` is one of RESIZE_MODES."""
    if mode not in RESIZE_MODES:
        raise ConfigError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")


@dataclass(frozen=True, slots=True)
class Placement:
    """Where an image lands in the model input: ``input = original * scale + offset`` per axis (pixels)."""

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float

    def as_tensor(self) -> Tensor:
        """[4] float64 (scale_x, scale_y, offset_x, offset_y)."""
        return torch.tensor([self.scale_x, self.scale_y, self.offset_x, self.offset_y], dtype=torch.float64)


def placement(height: int, width: int, size: int, mode: str) -> tuple[Placement, tuple[int, int]]:
    """How a ``height x width`` image fits a ``size x size`` input.

    Returns:
        (placement, (resized height, resized width)) in pixels.
    """
    check_resize(mode)
    if mode == "squash":
        new_h = new_w = size
    else:
        s = size / max(height, width)
        new_h, new_w = max(1, round(height * s)), max(1, round(width * s))
    off_x, off_y = (size - new_w) // 2, (size - new_h) // 2
    return Placement(new_w / width, new_h / height, float(off_x), float(off_y)), (new_h, new_w)


def _affine(placements: Tensor) -> tuple[Tensor, Tensor]:
    """[..., 4] placements -> ([..., 4] scale, [..., 4] offset) for xyxy boxes, float64."""
    p = placements.to(torch.float64)
    return torch.cat([p[..., :2], p[..., :2]], dim=-1), torch.cat([p[..., 2:], p[..., 2:]], dim=-1)


def boxes_to_input(boxes: Tensor, placements: Tensor) -> Tensor:
    """Map boxes from original-image pixels into the model input.

    Args:
        boxes: [K, 4] xyxy, original-image pixels.
        placements: [4] or [K, 4] (scale_x, scale_y, offset_x, offset_y), one for all boxes or one row per box.

    Returns:
        [K, 4] float32 xyxy, input pixels.
    """
    scale, offset = _affine(placements)
    return (boxes.to(torch.float64) * scale + offset).to(torch.float32)


def boxes_to_original(boxes: Tensor, placements: Tensor) -> Tensor:
    """The inverse of ``boxes_to_input``: [K, 4] input pixels -> [K, 4] float64 original-image pixels."""
    scale, offset = _affine(placements)
    return (boxes.to(torch.float64) - offset) / scale


def to_rgb8(img: Any) -> Any:
    """A Pillow image as 8-bit RGB, scaled by its bit depth.

    16-bit grey (``I;16*``, and ``I``, which is how Pillow opens many 16-bit PNG / TIFF files) is divided by 257
    (65535 -> 255) instead of clipped at 255. Alpha is dropped, palettes and CMYK converted, as open_clip's own
    preprocessing (``convert("RGB")``) does. Animated images give their current (first, after opening) frame.
    """
    from PIL import Image  # noqa: PLC0415

    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img).astype(np.int64).clip(0, 65535)
        img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to [H, W, 3] uint8 RGB (see ``to_rgb8``)."""
    from PIL import Image  # noqa: PLC0415

    with Image.open(path) as img:
        return np.asarray(to_rgb8(img), dtype=np.uint8)


def fit_image(rgb: Any, size: int, mode: str) -> tuple[Tensor, Placement]:
    """Resize an 8-bit RGB Pillow image into the ``size x size`` model input (uint8, no crop).

    Returns:
        (pixels [3, size, size] uint8, placement of the original in them).
    """
    from PIL import Image  # noqa: PLC0415

    width, height = rgb.size
    where, (new_h, new_w) = placement(height, width, size, mode)
    resized = np.asarray(rgb.resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.uint8)
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    x0, y0 = int(where.offset_x), int(where.offset_y)
    canvas[y0 : y0 + new_h, x0 : x0 + new_w] = resized
    return torch.from_numpy(canvas).permute(2, 0, 1).contiguous(), where


def load_input(path: str | Path, size: int, mode: str) -> tuple[Tensor, Placement, tuple[int, int]]:
    """Decode one image file and fit it to the model input.

    Returns:
        (pixels [3, size, size] uint8, placement, original (height, width) in pixels).
    """
    pixels, where, shape, _ = _decode_and_fit(path, size, mode, keep_full=False)
    return pixels, where, shape


def _decode_and_fit(
    path: str | Path, size: int, mode: str, *, keep_full: bool
) -> tuple[Tensor, Placement, tuple[int, int], Tensor | None]:
    """``load_input`` plus, with ``keep_full``, the decoded original as [3, H, W] uint8."""
    from PIL import Image  # noqa: PLC0415

    with Image.open(path) as img:
        rgb = to_rgb8(img)
        pixels, where = fit_image(rgb, size, mode)
        full = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1) if keep_full else None
        return pixels, where, (rgb.size[1], rgb.size[0]), full


@dataclass(frozen=True, slots=True)
class DecodedImage:
    """One decoded image: the model input, where the original lies in it, and its size."""

    index: int
    pixels: Tensor | None  # [3, S, S] uint8 model input; None when decoding failed
    placement: Placement | None
    height: int = 0
    width: int = 0
    full: Tensor | None = None  # [3, H, W] uint8 original, only for proposers that look at the pixels
    error: str | None = None


class ImageDataset(torch.utils.data.Dataset):
    """Decodes and resizes one image file at a time (in the DataLoader workers), keeping uint8: the memory of a
    batch is that of model-size images, whatever the source resolution. Failures come back as error strings."""

    def __init__(self, paths: Sequence[str | Path], *, size: int, resize: str, keep_full: bool) -> None:
        self.paths, self.size, self.resize, self.keep_full = paths, size, resize, keep_full

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> DecodedImage:
        try:
            pixels, where, (height, width), full = _decode_and_fit(
                self.paths[i], self.size, self.resize, keep_full=self.keep_full
            )
        except Exception as err:  # any decoding problem: skip the image, keep the run going
            return DecodedImage(i, None, None, error=f"{type(err).__name__}: {err}")
        return DecodedImage(i, pixels, where, height, width, full)


def normalize(pixels: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """[B, 3, S, S] uint8 -> float32 ``(x / 255 - mean) / std``; mean and std are [1, 3, 1, 1]."""
    return (pixels.float().div_(255.0) - mean) / std
