"""RoIAlign as two small matrix products per image: the same numbers as ``torchvision.ops.roi_align``, and a
backward made of matmuls.

RoIAlign averages bilinear samples on a regular grid inside each output bin. Bilinear interpolation is a product of
one linear interpolation along y and one along x, the sample grid of a bin is a product of its y and x positions,
and torchvision zeroes a sample that lies outside the map along either axis, which is again a product. So each box
is two weight matrices, ``Ay`` [out_h, H] and ``Ax`` [out_w, W] (the mean over the bin's samples of the 1-D
interpolation weights), and its pooled map is ``Ay @ F @ Ax^T`` per channel. torchvision's CPU kernel loops over
every output value and its backward scatters one sample at a time; here forward and backward are batched matmuls,
which is what a training step that pools every region of the batch needs (ravl_engine/kernels/roi.py).

Semantics follow torchvision (``aligned``, ``sampling_ratio``; -1 = ``ceil(box side / output side)`` samples per
bin and axis, per box; a sample with a coordinate below -1 or above the map size counts as zero; coordinates are
clamped to the map). Gradients flow to the features, not to the boxes (as in torchvision).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import roi_align as torchvision_roi_align

# the dense form (one [K * out_h * out_w, H * W] weight matrix per image) up to this many weights in all; it was the
# faster form with gradients at every measured size (4x4 to 14x14 maps), the row-then-column form bounds memory
DENSE_MAX_WEIGHTS = 1 << 26


def axis_weights(start: Tensor, length: Tensor, bins: int, size: int, sampling_ratio: int) -> Tensor:
    """[R, bins, size]: per box and output bin, the mean over the bin's samples of the 1-D bilinear weights.

    Args:
        start: [R] first coordinate of each box on the map (after scaling and the aligned half-pixel shift).
        length: [R] box side on the map.
        bins: output size along this axis.
        size: map size along this axis.
        sampling_ratio: samples per bin along this axis; <= 0 = ``ceil(length / bins)`` per box.
    """
    r, dtype, device = start.shape[0], start.dtype, start.device
    bin_len = length / bins
    if sampling_ratio > 0:
        n = torch.full_like(length, float(sampling_ratio))
    else:
        n = torch.ceil(bin_len)
    g = max(int(n.max().item()) if r else 0, 1)
    step = bin_len / n.clamp(min=1)
    p = torch.arange(bins, dtype=dtype, device=device)
    s = torch.arange(g, dtype=dtype, device=device)
    coord = start[:, None, None] + p[None, :, None] * bin_len[:, None, None] + (s + 0.5) * step[:, None, None]
    keep = (s[None, None, :] < n[:, None, None]) & (coord >= -1.0) & (coord <= size)  # [R, bins, g]
    c = coord.clamp(min=0)
    low = c.floor().long()
    at_end = low >= size - 1
    low = low.clamp(max=size - 1)
    high = torch.where(at_end, low, low + 1)
    frac = torch.where(at_end, torch.zeros_like(c), c - low.to(dtype))
    scale = keep.to(dtype) / n.clamp(min=1)[:, None, None]
    weights = torch.zeros(r, bins, size, dtype=dtype, device=device)
    weights.scatter_add_(2, low, (1 - frac) * scale)
    weights.scatter_add_(2, high, frac * scale)
    return weights


def roi_align_matmul(
    features: Tensor,
    boxes: Sequence[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = True,
) -> Tensor:
    """``torchvision.ops.roi_align(features, boxes, ...)`` for a list of per-image boxes.

    Args:
        features: [B, C, H, W].
        boxes: B tensors [K_i, 4], xyxy in the coordinates that ``spatial_scale`` maps onto the feature map.
        output_size: int or (out_h, out_w).
        spatial_scale, sampling_ratio, aligned: as torchvision's.

    Returns:
        [sum K_i, C, out_h, out_w], boxes in image order.
    """
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    b, c, h, w = features.shape
    if len(boxes) != b:
        raise ValueError(f"got {len(boxes)} box tensors for {b} feature maps")
    counts = [int(x.shape[0]) for x in boxes]
    k = max(counts, default=0)
    if k == 0:
        return features.new_zeros(0, c, out_h, out_w)
    # weights in float32 at least (bfloat16 coordinates would move the samples), then in the features' dtype
    wdtype = torch.promote_types(features.dtype, torch.float32)
    padded = features.new_zeros(b, k, 4, dtype=wdtype)
    for i, x in enumerate(boxes):
        padded[i, : counts[i]] = x.to(device=features.device, dtype=wdtype)
    flat = padded.reshape(b * k, 4) * spatial_scale - (0.5 if aligned else 0.0)
    x0, y0, x1, y1 = flat.unbind(1)
    width, height = x1 - x0, y1 - y0
    if not aligned:
        width, height = width.clamp(min=1.0), height.clamp(min=1.0)
    ay = axis_weights(y0, height, out_h, h, sampling_ratio).to(features.dtype).view(b, k, out_h, h)
    ax = axis_weights(x0, width, out_w, w, sampling_ratio).to(features.dtype).view(b, k, out_w, w)
    if b * k * out_h * out_w * h * w <= DENSE_MAX_WEIGHTS:
        dense = (ay[:, :, :, None, :, None] * ax[:, :, None, :, None, :]).reshape(b, k * out_h * out_w, h * w)
        pooled = torch.bmm(dense, features.reshape(b, c, h * w).transpose(1, 2))
        pooled = pooled.view(b, k, out_h, out_w, c).permute(0, 1, 4, 2, 3)
    else:  # rows, then columns: no [H * W]-wide matrix per output cell
        rows = torch.einsum("bkph,bchw->bkcpw", ay, features)  # [B, K, C, out_h, W]
        pooled = torch.einsum("bkcpw,bkqw->bkcpq", rows, ax)  # [B, K, C, out_h, out_w]
    present = torch.arange(k, device=features.device)[None, :] < torch.tensor(counts, device=features.device)[:, None]
    return pooled[present]


def roi_align(
    features: Tensor,
    boxes: Sequence[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = True,
) -> Tensor:
    """RoIAlign for a list of per-image boxes: :func:`roi_align_matmul` where a CPU backward will follow (a training
    step), ``torchvision.ops.roi_align`` otherwise (its forward is the faster one, and CUDA has its own kernel)."""
    if features.device.type == "cpu" and features.requires_grad and torch.is_grad_enabled():
        return roi_align_matmul(features, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    rois = [x.to(device=features.device, dtype=features.dtype) for x in boxes]
    return torchvision_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
