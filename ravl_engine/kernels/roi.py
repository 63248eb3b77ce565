"""Region embeddings from one backbone pass per image batch.

Three modes (../shared/docs/RAVL_METHOD.md, stage 1, step 2):

- ``roi`` for ResNet towers (RegionCLIP): stem and layer1..layer3 once per image, one ``roi_align`` for every box of
  the batch on the layer3 map (output 2x the attention pool's grid, ``aligned=True``), then layer4 and the attention
  pool on the pooled crops.
- ``roi`` for ViT towers (masked-attention CLS): all blocks but the last once per image; in the last block every
  region gets its own copy of the CLS query, which may attend only to itself and the patches whose centres lie in
  the box (keys and values shared), then ``ln_post`` and ``proj``. A whole-image box reproduces the image embedding.
- ``roi-mean`` for ViT towers: RoIAlign-mean of the final patch tokens after ``ln_post`` and ``proj``.
- ``crop`` for any tower: ``roi_align`` resamples every box to the input size (crop + resize in one batched call),
  then the tower encodes the crops.

Inputs are normalised images at the tower's input size and boxes in those pixels. Outputs are not normalised.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ravl_engine.kernels.roialign import roi_align

MODES = ("roi", "roi-mean", "crop")


def tower_kind(visual: Any) -> str:
    """ "resnet" (open_clip ModifiedResNet), "vit" (open_clip VisionTransformer) or "other"."""
    if all(hasattr(visual, name) for name in ("stem", "layer3", "layer4", "attnpool")):
        return "resnet"
    if all(hasattr(visual, name) for name in ("transformer", "class_embedding", "ln_post", "_embeds")):
        return "vit"
    return "other"


def supported_modes(visual: Any) -> tuple[str, ...]:
    """The region modes a tower supports; ``crop`` always."""
    kind = tower_kind(visual)
    if kind == "resnet":
        return ("roi", "crop")
    if kind == "vit" and _vit_last_block_supported(visual):
        return ("roi", "roi-mean", "crop")
    return ("crop",)


def _check_boxes(images: Tensor, boxes: Sequence[Tensor]) -> None:
    if len(boxes) != images.shape[0]:
        raise ValueError(f"got {len(boxes)} box tensors for {images.shape[0]} images")
    for i, b in enumerate(boxes):
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"boxes[{i}] must be [K, 4] xyxy, got shape {tuple(b.shape)}")


def _as_rois(boxes: Sequence[Tensor], like: Tensor) -> list[Tensor]:
    return [b.to(device=like.device, dtype=like.dtype) for b in boxes]


# ------------------------------------------------------------------------------------------------ ResNet


def resnet_trunk(visual: Any, images: Tensor) -> Tensor:
    """Stem and layer1..layer3: the map RoIAlign samples. [B, C, H/16, W/16]."""
    x = images.to(visual.conv1.weight.dtype)
    return visual.layer3(visual.layer2(visual.layer1(visual.stem(x))))


def attention_pool(pool: Any, x: Tensor) -> Tensor:
    """open_clip's ``AttentionPool2d`` computed for the one token it returns.

    The pool prepends the mean token, attends from all tokens and keeps the mean token's output; only that query
    and that output row are computed here (the keys and values of every token still are), which saves about a third
    of the pool's work. Same weights, same result up to float rounding (tests).

    Args:
        pool: ``ModifiedResNet.attnpool``.
        x: [R, C, h, w] layer4 output.

    Returns:
        [R, D].
    """
    tokens = x.flatten(2).permute(0, 2, 1)  # [R, hw, C]
    tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
    tokens = tokens + pool.positional_embedding.to(tokens.dtype)
    heads = pool.num_heads
    r, t, c = tokens.shape
    q = F.linear(tokens[:, :1], pool.q_proj.weight, pool.q_proj.bias).view(r, 1, heads, c // heads).transpose(1, 2)
    k = F.linear(tokens, pool.k_proj.weight, pool.k_proj.bias).view(r, t, heads, c // heads).transpose(1, 2)
    v = F.linear(tokens, pool.v_proj.weight, pool.v_proj.bias).view(r, t, heads, c // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(r, c)
    return pool.c_proj(out)


def resnet_head(visual: Any, maps: Tensor) -> Tensor:
    """layer4 and the attention pool. [R, C, 2g, 2g] -> [R, D]."""
    return attention_pool(visual.attnpool, visual.layer4(maps))


def _resnet_pool(visual: Any, maps: Tensor, images: Tensor, boxes: Sequence[Tensor]) -> Tensor:
    """RoIAlign of every box on the layer3 map, at twice the attention pool's grid. [sum K_i, C, 2g, 2g]."""
    grid = round(math.sqrt(visual.attnpool.positional_embedding.shape[0] - 1))
    return roi_align(
        maps,
        _as_rois(boxes, maps),
        output_size=2 * grid,
        spatial_scale=maps.shape[-1] / images.shape[-1],
        sampling_ratio=-1,
        aligned=True,
    )


def resnet_roi_embed(visual: Any, images: Tensor, boxes: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """RegionCLIP-style region embeddings of a ModifiedResNet.

    Args:
        visual: open_clip ``ModifiedResNet``.
        images: [B, 3, S, S] normalised images at the tower's input size.
        boxes: B tensors [K_i, 4], xyxy, input pixels.

    Returns:
        (image embeddings [B, D], region embeddings [sum K_i, D]), regions in image order.
    """
    _check_boxes(images, boxes)
    maps = resnet_trunk(visual, images)
    if sum(b.shape[0] for b in boxes) == 0:
        image_emb = resnet_head(visual, maps)
        return image_emb, image_emb.new_zeros(0, image_emb.shape[1])
    pooled = _resnet_pool(visual, maps, images, boxes)
    if pooled.shape[-2:] == maps.shape[-2:]:  # square inputs: images and regions share one head pass
        both = resnet_head(visual, torch.cat([maps, pooled.to(memory_format=torch.contiguous_format)]))
        return both[: images.shape[0]], both[images.shape[0] :]
    return resnet_head(visual, maps), resnet_head(visual, pooled)


# ------------------------------------------------------------------------------------------------ ViT


def _vit_last_block_supported(visual: Any) -> bool:
    last = visual.transformer.resblocks[-1]
    return (
        isinstance(getattr(last, "attn", None), nn.MultiheadAttention)
        and getattr(visual, "attn_pool", None) is None
        and getattr(visual, "pool_type", "tok") == "tok"
        and not hasattr(last, "ln_1_kv")
    )


def _run_blocks(transformer: Any, blocks: Sequence[Any], x: Tensor) -> Tensor:
    if not getattr(transformer, "batch_first", True):
        x = x.transpose(0, 1)
    for block in blocks:
        x = block(x)
    return x if getattr(transformer, "batch_first", True) else x.transpose(0, 1)


def vit_tokens_before_last(visual: Any, images: Tensor) -> Tensor:
    """Tokens entering the last block: [B, 1 + P, W] (CLS first)."""
    x = visual._embeds(images.to(visual.conv1.weight.dtype))
    return _run_blocks(visual.transformer, visual.transformer.resblocks[:-1], x)


def patch_centres(visual: Any, device: torch.device) -> Tensor:
    """[P, 2] (x, y) centres of the patches in input pixels, row-major like the token order."""
    gh, gw = visual.grid_size
    ph, pw = visual.patch_size
    ys = (torch.arange(gh, device=device, dtype=torch.float32) + 0.5) * ph
    xs = (torch.arange(gw, device=device, dtype=torch.float32) + 0.5) * pw
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([cx.reshape(-1), cy.reshape(-1)], dim=1)


def region_patch_mask(visual: Any, rois: Tensor) -> Tensor:
    """Which tokens each region's CLS query may attend to: itself and the patches whose centres lie in the box.

    A box too small to contain any patch centre gets the patch under its own centre.

    Args:
        rois: [R, 4] xyxy input pixels.

    Returns:
        [R, 1 + P] bool.
    """
    centres = patch_centres(visual, rois.device)
    x1, y1, x2, y2 = (rois[:, i : i + 1] for i in range(4))
    inside = (centres[:, 0] >= x1) & (centres[:, 0] <= x2) & (centres[:, 1] >= y1) & (centres[:, 1] <= y2)
    empty = ~inside.any(dim=1)
    if bool(empty.any()):
        mid = torch.stack([(rois[:, 0] + rois[:, 2]) / 2, (rois[:, 1] + rois[:, 3]) / 2], dim=1)
        nearest = torch.cdist(mid[empty], centres).argmin(dim=1)
        inside[empty.nonzero().squeeze(1), nearest] = True
    return torch.cat([torch.ones_like(inside[:, :1]), inside], dim=1)


def vit_roi_embed(visual: Any, images: Tensor, boxes: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Masked-attention CLS region embeddings of an open_clip VisionTransformer.

    Args:
        visual: open_clip ``VisionTransformer`` with a token pool and a standard last block.
        images: [B, 3, S, S] normalised images at the tower's input size.
        boxes: B tensors [K_i, 4], xyxy, input pixels.

    Returns:
        (image embeddings [B, D], region embeddings [sum K_i, D]).
    """
    _check_boxes(images, boxes)
    if not _vit_last_block_supported(visual):
        raise NotImplementedError("this ViT's last block or pooling is not supported by mode 'roi'; use 'crop'")
    tokens = vit_tokens_before_last(visual, images)
    last = visual.transformer.resblocks[-1]
    full = _run_blocks(visual.transformer, [last], tokens)
    image_emb = visual.ln_post(full[:, 0]) @ visual.proj
    counts = [b.shape[0] for b in boxes]
    if sum(counts) == 0:
        return image_emb, image_emb.new_zeros(0, image_emb.shape[1])
    rois = torch.cat(_as_rois(boxes, tokens)).float()
    owner = torch.repeat_interleave(
        torch.arange(len(boxes), device=tokens.device), torch.tensor(counts, device=tokens.device)
    )
    allowed = region_patch_mask(visual, rois)  # [R, 1 + P]

    attn: nn.MultiheadAttention = last.attn
    width, heads = tokens.shape[-1], attn.num_heads
    head_dim = width // heads
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None, None, None)
    normed = last.ln_1(tokens)
    keys = F.linear(normed, w_k, b_k).view(tokens.shape[0], -1, heads, head_dim).transpose(1, 2)  # [B, H, T, dh]
    values = F.linear(normed, w_v, b_v).view(tokens.shape[0], -1, heads, head_dim).transpose(1, 2)
    cls = tokens[owner, 0]  # [R, W]: each region's own copy of its image's CLS token
    query = F.linear(last.ln_1(cls), w_q, b_q)  # [R, W]
    # the regions of one image share its keys and values: attend per image with the queries padded to the
    # largest region count (no per-region copy of the keys); padded queries may see only the CLS token
    n_img, k_max = len(boxes), max(counts)
    starts = torch.tensor([0, *counts[:-1]], device=tokens.device).cumsum(0)
    slot = torch.arange(owner.shape[0], device=tokens.device) - starts[owner]
    q = query.new_zeros(n_img, k_max, width).index_put((owner, slot), query)
    mask = torch.zeros(n_img, k_max, allowed.shape[1], dtype=torch.bool, device=tokens.device)
    mask[:, :, 0] = True
    mask = mask.index_put((owner, slot), allowed)
    q = q.view(n_img, k_max, heads, head_dim).transpose(1, 2)  # [B, H, K, dh]
    mixed = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None])  # [B, H, K, dh]
    mixed = mixed.transpose(1, 2).reshape(n_img, k_max, width)[owner, slot]  # [R, W]
    out = attn.out_proj(mixed)
    y = cls + last.ls_1(out)
    y = y + last.ls_2(last.mlp(last.ln_2(y)))
    return image_emb, visual.ln_post(y) @ visual.proj


def vit_roi_mean_embed(visual: Any, images: Tensor, boxes: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """RoIAlign-mean of the final patch tokens after ``ln_post`` and ``proj`` (an option; measured weak)."""
    _check_boxes(images, boxes)
    tokens = vit_tokens_before_last(visual, images)
    full = visual.ln_post(_run_blocks(visual.transformer, visual.transformer.resblocks[-1:], tokens))
    projected = full @ visual.proj  # [B, 1 + P, D]
    image_emb = projected[:, 0]
    if sum(b.shape[0] for b in boxes) == 0:
        return image_emb, image_emb.new_zeros(0, image_emb.shape[1])
    gh, gw = visual.grid_size
    grid = projected[:, 1:].transpose(1, 2).reshape(images.shape[0], -1, gh, gw)
    pooled = roi_align(
        grid,
        _as_rois(boxes, grid),
        output_size=2,
        spatial_scale=gw / images.shape[-1],
        sampling_ratio=-1,
        aligned=True,
    )
    return image_emb, pooled.mean(dim=(2, 3))


# ------------------------------------------------------------------------------------------------ any tower


def crop_regions(visual: Any, images: Tensor, boxes: Sequence[Tensor]) -> Tensor:
    """Crop every box, resize it to the input size (one batched ``roi_align``) and encode it like an image.

    Returns:
        [sum K_i, D], not normalised; [0, D] when there are no boxes.
    """
    if sum(b.shape[0] for b in boxes) == 0:
        return visual(images[:0])
    crops = roi_align(
        images,
        _as_rois(boxes, images),
        output_size=(images.shape[-2], images.shape[-1]),
        spatial_scale=1.0,
        sampling_ratio=-1,
        aligned=True,
    )
    return visual(crops)


def crop_embed(visual: Any, images: Tensor, boxes: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """The images and :func:`crop_regions` of their boxes."""
    _check_boxes(images, boxes)
    image_emb = visual(images)
    if sum(b.shape[0] for b in boxes) == 0:
        return image_emb, image_emb.new_zeros(0, image_emb.shape[1])
    return image_emb, crop_regions(visual, images, boxes)


@contextmanager
def _batchnorm_running_stats(module: nn.Module) -> Iterator[None]:
    """Run the BatchNorm layers of ``module`` on their running statistics (eval mode) for the block's duration."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


def region_embed_train(
    visual: Any, images: Tensor, boxes: Sequence[Tensor], *, mode: str = "roi"
) -> tuple[Tensor, Tensor]:
    """:func:`region_embed` for a tower being trained: one backbone pass, differentiable, batch statistics intact.

    For a ResNet in train mode the image path is exactly a plain forward (its BatchNorm layers see only the images,
    as in a CLIP step), and the pooled regions go through layer4 with BatchNorm on the running statistics, so the
    regions are embedded as at inference and do not leak into the image statistics. Other towers have no batch
    statistics and use :func:`region_embed` unchanged.

    Returns:
        (image embeddings [B, D], region embeddings [sum K_i, D]), not normalised.
    """
    if mode != "roi" or tower_kind(visual) != "resnet" or not visual.training:
        return region_embed(visual, images, boxes, mode=mode)
    _check_boxes(images, boxes)
    maps = resnet_trunk(visual, images)
    image_emb = resnet_head(visual, maps)
    if sum(b.shape[0] for b in boxes) == 0:
        return image_emb, image_emb.new_zeros(0, image_emb.shape[1])
    pooled = _resnet_pool(visual, maps, images, boxes)
    with _batchnorm_running_stats(visual.layer4):
        return image_emb, resnet_head(visual, pooled)


def region_embed(visual: Any, images: Tensor, boxes: Sequence[Tensor], *, mode: str = "roi") -> tuple[Tensor, Tensor]:
    """Image and region embeddings (not normalised) in one backbone pass per image.

    Args:
        visual: an open_clip image tower.
        images: [B, 3, S, S] normalised images at the tower's input size.
        boxes: B tensors [K_i, 4], xyxy, input pixels.
        mode: "roi", "roi-mean" or "crop"; see the module docstring.

    Returns:
        (image embeddings [B, D], region embeddings [sum K_i, D]).

    Raises:
        ValueError: unknown mode, or a mode this tower does not support (the message lists the supported ones).
    """
    if mode not in MODES:
        raise ValueError(f"region mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode not in supported_modes(visual):
        raise ValueError(
            f"region mode {mode!r} is not supported by this {tower_kind(visual)} tower; use one of "
            f"{', '.join(supported_modes(visual))}"
        )
    if mode == "crop":
        return crop_embed(visual, images, boxes)
    if tower_kind(visual) == "resnet":
        return resnet_roi_embed(visual, images, boxes)
    if mode == "roi-mean":
        return vit_roi_mean_embed(visual, images, boxes)
    return vit_roi_embed(visual, images, boxes)
