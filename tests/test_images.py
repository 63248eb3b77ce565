"""Image decoding by bit depth, --resize squash|pad, boxes in original pixels, and per-image memory."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from ravl_engine import ShardError
from ravl_engine import embed as embed_module
from ravl_engine.embed import EmbedConfig, run_embed
from ravl_engine.images import (
    Placement,
    boxes_to_input,
    boxes_to_original,
    decode_rgb,
    load_input,
    placement,
)
from ravl_engine.models import load_clip
from ravl_engine.shards import read_run


def test_gray16_png_is_scaled_by_its_bit_depth_not_clipped(tmp_path):
    values = np.tile(np.arange(256, dtype=np.uint16), (4, 1))
    Image.fromarray(values * 257).save(tmp_path / "g16.png")  # 16-bit grey: v * 257 is v in 8 bits
    Image.fromarray(values.astype(np.uint8)).save(tmp_path / "g8.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    g16, g8 = decode_rgb(tmp_path / "g16.png"), decode_rgb(tmp_path / "g8.png")
    assert g16.dtype == np.uint8 and g16.shape == (4, 256, 3)
    assert np.array_equal(g16, g8)
    assert np.array_equal(g16[0, :, 0], np.arange(256))  # the old path saturated every value above 255


def test_rgba_palette_cmyk_and_animated_gif_decode_to_rgb(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:, :4] = (200, 30, 60)
    rgb[:, 4:] = (10, 220, 90)
    rgba = np.dstack([rgb, np.full((8, 8), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert np.array_equal(decode_rgb(tmp_path / "a.png"), rgb)  # alpha dropped, as open_clip's convert("RGB")
    Image.fromarray(rgb).quantize(colors=4).save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert np.array_equal(decode_rgb(tmp_path / "p.png"), rgb)
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)  # CMYK red
    cmyk = decode_rgb(tmp_path / "c.jpg").astype(int)
    assert cmyk.shape == (16, 16, 3) and np.abs(cmyk - [255, 0, 0]).max() <= 8
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(tmp_path / "anim.gif").n_frames == 2
    first = decode_rgb(tmp_path / "anim.gif")
    assert np.array_equal(first, np.broadcast_to(np.array([255, 0, 0], np.uint8), (8, 8, 3)))


def test_placement_golden_boxes_map_into_the_letterbox_and_back_exactly():
    # a 256 x 128 image into 64 x 64: pad scales by 1/4 and centres 64 x 32 rows 16..48; squash stretches y by 1/2
    pad, (h, w) = placement(128, 256, 64, "pad")
    assert pad == Placement(0.25, 0.25, 0.0, 16.0) and (h, w) == (32, 64)
    squash, size = placement(128, 256, 64, "squash")
    assert squash == Placement(0.25, 0.5, 0.0, 0.0) and size == (64, 64)
    boxes = torch.tensor([[0.0, 0.0, 256.0, 128.0], [128.0, 64.0, 256.0, 128.0], [10.0, 20.0, 30.0, 44.0]])
    inside = boxes_to_input(boxes, pad.as_tensor())
    assert inside.tolist() == [[0, 16, 64, 48], [32, 32, 64, 48], [2.5, 21, 7.5, 27]]
    assert torch.equal(boxes_to_original(inside, pad.as_tensor()), boxes.double())
    assert boxes_to_input(boxes, squash.as_tensor())[0].tolist() == [0, 0, 64, 64]
    per_box = torch.stack([pad.as_tensor(), squash.as_tensor(), pad.as_tensor()])  # one placement row per box
    assert boxes_to_input(boxes, per_box)[1].tolist() == [32, 32, 64, 64]


def _solid_setting(tmp_path, color=(200, 100, 50)):
    Image.new("RGB", (256, 128), color).save(tmp_path / "wide.png")
    Image.new("RGB", (256, 128), color).save(tmp_path / "wide2.png")  # a manifest lists each image once
    boxes = [[0, 0, 256, 128], [128, 64, 256, 128], [10.5, 20.25, 30, 44]]
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "label", "boxes"])
        writer.writeheader()
        writer.writerow({"image": "wide.png", "label": "a", "boxes": json.dumps(boxes)})
        writer.writerow({"image": "wide2.png", "label": "b", "boxes": json.dumps(boxes)})
    return tmp_path / "m.csv", boxes


def test_pad_feeds_the_tower_a_letterboxed_image_and_stores_original_boxes(tmp_path, monkeypatch):
    data, boxes = _solid_setting(tmp_path)
    seen = []
    real = embed_module.region_embed

    def spy(visual, pixels, scaled, *, mode):
        seen.append((pixels.clone(), [b.clone() for b in scaled]))
        return real(visual, pixels, scaled, mode=mode)

    monkeypatch.setattr(embed_module, "region_embed", spy)
    run_embed(EmbedConfig(data=str(data), out=str(tmp_path / "run"), proposer="manifest", resize="pad"))
    loaded = load_clip("ravl-tiny-rn", None)
    assert loaded.image_size == 64
    expected = torch.zeros(3, 64, 64)  # hand-built letterbox: black bars, the picture in rows 16..48
    expected[:, 16:48, :] = torch.tensor([200, 100, 50]).view(3, 1, 1) / 255.0
    mean, std = torch.tensor(loaded.mean).view(3, 1, 1), torch.tensor(loaded.std).view(3, 1, 1)
    expected = (expected - mean) / std
    pixels, scaled = seen[0]
    assert pixels.shape == (2, 3, 64, 64)
    assert torch.allclose(pixels[0], expected, atol=1e-6) and torch.allclose(pixels[1], expected, atol=1e-6)
    assert scaled[0].tolist() == [[0, 16, 64, 48], [32, 32, 64, 48], [2.625, 21.0625, 7.5, 27]]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["resize"] == "pad"
    with h5py.File(tmp_path / "run" / "shard-00000.h5") as fh:
        stored = fh["regions/box"][:]
    assert stored.tolist() == boxes + boxes  # original-image pixels, untouched by the letterbox


def test_squash_is_the_default_and_resume_with_another_resize_is_refused(tmp_path, monkeypatch):
    data, _ = _solid_setting(tmp_path)
    seen = []
    real = embed_module.region_embed
    monkeypatch.setattr(
        embed_module, "region_embed", lambda v, p, s, *, mode: seen.append(s[0].clone()) or real(v, p, s, mode=mode)
    )
    cfg = EmbedConfig(data=str(data), out=str(tmp_path / "run"), proposer="manifest")
    assert cfg.resize == "squash"
    run_embed(cfg)
    assert seen[0][0].tolist() == [0, 0, 64, 64]
    with pytest.raises(ShardError, match="resize"):
        run_embed(EmbedConfig(data=str(data), out=str(tmp_path / "run"), proposer="manifest", resize="pad"))


def test_load_input_keeps_uint8_at_the_model_size(tmp_path):
    Image.new("RGB", (300, 100), (255, 255, 255)).save(tmp_path / "w.png")
    pixels, where, (h, w) = load_input(tmp_path / "w.png", 60, "pad")
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 60, 60) and (h, w) == (100, 300)
    assert where.offset_y == 20 and int(pixels[:, 20:40].min()) == 255
    assert int(pixels[:, :20].max()) == 0 and int(pixels[:, 40:].max()) == 0


_PEAK = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from ravl_engine.images import ImageDataset

    def peak_mb_after_batch(paths):
        loader = torch.utils.data.DataLoader(
            ImageDataset(paths, size=64, resize="pad", keep_full=False), batch_size=len(paths), collate_fn=list
        )
        batch = next(iter(loader))
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, [list(b.pixels.shape) for b in batch]

    one, _ = peak_mb_after_batch(sys.argv[1:2])
    four, shapes = peak_mb_after_batch(sys.argv[1:5])
    print(json.dumps({"one_mb": one, "four_mb": four, "shapes": shapes}))
    """
)


@pytest.mark.slow  # about 10 s: a subprocess decoding 3000 x 3000 images
def test_a_batch_of_large_images_needs_the_memory_of_one(tmp_path):
    # 4 images of 3000 x 3000 in one batch: the old path held 4 full-size float32 copies (4 x 108 MB) before
    # resizing; now each image is decoded and shrunk on its own, so the peak of a batch of 4 is that of a batch of 1
    side = 3000
    gradient = np.broadcast_to(np.linspace(0, 255, side, dtype=np.uint8)[None, :, None], (side, side, 3))
    Image.fromarray(np.ascontiguousarray(gradient)).save(tmp_path / "big.png", compress_level=1)
    paths = [str(tmp_path / "big.png")] * 4
    proc = subprocess.run([sys.executable, "-c", _PEAK, *paths], capture_output=True, text=True, check=True)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["shapes"] == [[3, 64, 64]] * 4
    one_uint8 = side * side * 3 / 2**20  # 26 MB; the old path grew by ~4 x 130 MB for 3 more images
    assert report["four_mb"] - report["one_mb"] < one_uint8, report


def test_decoding_in_dataloader_workers_gives_the_same_run(tmp_path):
    data, _ = _solid_setting(tmp_path)
    for workers in (0, 1):
        out = tmp_path / f"w{workers}"
        run_embed(EmbedConfig(data=str(data), out=str(out), proposer="quadrants", resize="pad", num_workers=workers))
    a, b = read_run(tmp_path / "w0").data, read_run(tmp_path / "w1").data
    assert np.array_equal(a.boxes, b.boxes) and a.boxes[3].tolist() == [128, 64, 256, 128]
    assert np.allclose(a.region_emb, b.region_emb, atol=1e-5) and np.allclose(a.image_emb, b.image_emb, atol=1e-5)


def test_mitigate_embeds_and_letterboxes_as_the_audit_did(tmp_path, monkeypatch):
    from ravl_engine import mitigate as mitigate_module
    from ravl_engine.mitigate import MitigateConfig, run_mitigate

    data, _ = _solid_setting(tmp_path)
    doc = {
        "format": "ravl-engine-discovery/1",
        "k": 2,
        "classes": ["a", "b"],
        "embedding_dim": 2,
        "audit": {"model": {"name": "ravl-tiny-rn", "pretrained": None}, "resize": "pad"},
        "clusters": [{"rank": 1, "cluster_id": 0, "class": "a", "gap": 1.0, "influence": 1.0, "regions": []}],
        "medoids": [[1.0, 0.0], [0.0, 1.0]],
    }
    (tmp_path / "d.json").write_text(json.dumps(doc))
    train = tmp_path / "train.csv"
    train.write_text("image,caption\nwide.png,a photo of a\n")
    seen = []

    def stop(cfg, disc, rows, work_dir, name, path, resize):
        seen.append(resize)
        raise RuntimeError("stop")

    monkeypatch.setattr(mitigate_module, "_embed_regions", stop)
    for given, expected in ((None, "pad"), ("squash", "squash")):
        cfg = MitigateConfig(train=str(train), discovery=str(tmp_path / "d.json"), out=str(tmp_path / "m.pt"))
        with pytest.raises(RuntimeError, match="stop"):
            run_mitigate(dataclasses.replace(cfg, resize=given))
        assert seen[-1] == expected
