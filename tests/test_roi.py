"""Region embedding kernels on tiny random-init open_clip towers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from ravl_engine.kernels.roi import (
    region_embed,
    region_patch_mask,
    resnet_head,
    resnet_trunk,
    supported_modes,
    tower_kind,
)
from ravl_engine.models import load_clip


@pytest.fixture(scope="module")
def towers():
    torch.manual_seed(0)
    return {name: load_clip(name).model.visual.eval() for name in ("ravl-tiny-rn", "ravl-tiny-vit")}


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 64, 64, generator=g)


def _whole(n):
    return [torch.tensor([[0.0, 0.0, 64.0, 64.0]]) for _ in range(n)]


def _quadrants(n):
    q = torch.tensor([[0, 0, 32, 32], [32, 0, 64, 32], [0, 32, 32, 64], [32, 32, 64, 64]], dtype=torch.float32)
    return [q.clone() for _ in range(n)]


@pytest.mark.parametrize(
    ("name", "mode"),
    [("ravl-tiny-rn", "roi"), ("ravl-tiny-vit", "roi"), ("ravl-tiny-rn", "crop"), ("ravl-tiny-vit", "crop")],
)
@torch.no_grad()
def test_whole_image_box_reproduces_the_image_embedding(towers, images, name, mode):
    visual = towers[name]
    image_emb, region_emb = region_embed(visual, images, _whole(3), mode=mode)
    reference = visual(images)
    torch.testing.assert_close(image_emb, reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(region_emb, reference, atol=1e-5, rtol=1e-4)
    assert F.cosine_similarity(region_emb, reference).min() > 0.99999


@torch.no_grad()
def test_resnet_batched_roi_equals_one_box_at_a_time(towers, images):
    visual = towers["ravl-tiny-rn"]
    boxes = [torch.tensor([[3.0, 5.0, 40.0, 61.0], [0.0, 0.0, 16.0, 16.0]]), torch.zeros(0, 4), _quadrants(1)[0]]
    _, batched = region_embed(visual, images, boxes, mode="roi")
    assert batched.shape == (6, 64)
    maps = resnet_trunk(visual, images)
    singles = []
    for i, b in enumerate(boxes):
        for box in b:
            pooled = roi_align(
                maps[i : i + 1], [box[None]], output_size=4, spatial_scale=maps.shape[-1] / 64, aligned=True
            )
            singles.append(resnet_head(visual, pooled)[0])
    torch.testing.assert_close(batched, torch.stack(singles), atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_vit_masked_cls_equals_a_per_region_attention_loop(towers, images):
    visual = towers["ravl-tiny-vit"]
    boxes = [_quadrants(1)[0], torch.tensor([[10.0, 10.0, 50.0, 30.0], [1.0, 1.0, 3.0, 3.0]]), torch.zeros(0, 4)]
    _, batched = region_embed(visual, images, boxes, mode="roi")
    x = visual._embeds(images)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    last = visual.transformer.resblocks[-1]
    expected = []
    for i, b in enumerate(boxes):
        for box in b:
            allowed = region_patch_mask(visual, box[None])[0]
            tokens = x[i : i + 1]
            normed = last.ln_1(tokens)
            out, _ = last.attn(normed[:, :1], normed, normed, key_padding_mask=~allowed[None], need_weights=False)
            y = tokens[:, :1] + last.ls_1(out)
            y = y + last.ls_2(last.mlp(last.ln_2(y)))
            expected.append((visual.ln_post(y) @ visual.proj)[0, 0])
    torch.testing.assert_close(batched, torch.stack(expected), atol=1e-5, rtol=1e-4)


def test_patch_mask_uses_centres_and_never_leaves_a_region_blind(towers):
    visual = towers["ravl-tiny-vit"]  # 8 x 8 patches of 8 px
    mask = region_patch_mask(visual, torch.tensor([[0.0, 0.0, 32.0, 32.0], [1.0, 1.0, 3.0, 3.0]]))
    assert mask[:, 0].all()  # every query sees itself
    assert int(mask[0, 1:].sum()) == 16  # centres 4, 12, 20, 28 in both directions
    assert int(mask[1, 1:].sum()) == 1 and bool(mask[1, 1])  # tiny box: the patch under its centre


@torch.no_grad()
def test_roi_mean_whole_box_is_the_patch_mean(towers, images):
    visual = towers["ravl-tiny-vit"]
    _, region = region_embed(visual, images, _whole(3), mode="roi-mean")
    x = visual._embeds(images)
    for block in visual.transformer.resblocks:
        x = block(x)
    tokens = visual.ln_post(x) @ visual.proj
    torch.testing.assert_close(region, tokens[:, 1:].mean(dim=1), atol=1e-5, rtol=1e-4)


def test_modes_and_errors(towers, images):
    assert tower_kind(towers["ravl-tiny-rn"]) == "resnet" and tower_kind(towers["ravl-tiny-vit"]) == "vit"
    assert supported_modes(towers["ravl-tiny-rn"]) == ("roi", "crop")
    assert supported_modes(towers["ravl-tiny-vit"]) == ("roi", "roi-mean", "crop")
    with pytest.raises(ValueError, match="not supported by this resnet tower; use one of roi, crop"):
        region_embed(towers["ravl-tiny-rn"], images, _whole(3), mode="roi-mean")
    with pytest.raises(ValueError, match="must be one of"):
        region_embed(towers["ravl-tiny-rn"], images, _whole(3), mode="pixels")
    with pytest.raises(ValueError, match="got 2 box tensors for 3 images"):
        region_embed(towers["ravl-tiny-rn"], images, _whole(2))


@torch.no_grad()
def test_channels_last_resnet_gives_the_same_embeddings(images):
    visual = load_clip("ravl-tiny-rn").model.visual.eval()
    boxes = _quadrants(3)
    ref = region_embed(visual, images, boxes, mode="roi")
    visual = visual.to(memory_format=torch.channels_last)
    got = region_embed(visual, images.contiguous(memory_format=torch.channels_last), boxes, mode="roi")
    for a, b in zip(ref, got, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_attention_pool_for_one_token_equals_open_clips_pool():
    from ravl_engine.kernels.roi import attention_pool

    visual = load_clip("ravl-tiny-rn", init_seed=5).model.visual.eval()
    x = torch.randn(7, visual.attnpool.k_proj.in_features, 2, 2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(attention_pool(visual.attnpool, x), visual.attnpool(x), atol=1e-5, rtol=1e-4)
