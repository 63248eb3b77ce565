"""The 112 px tiny towers and the proposers on scene images: they build, embed the manifest's boxes and grid / rpn
proposals, and the embedded regions carry the objects' labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ravl_engine.controlled import SynthConfig, run_synth
from ravl_engine.embed import EmbedConfig, run_embed
from ravl_engine.manifest import read_manifest
from ravl_engine.models import TINY_MODELS_112, load_clip
from ravl_engine.shards import read_run


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    out = tmp_path_factory.mktemp("scene") / "set"
    cfg = SynthConfig(out=str(out), layout="scene", classes=(0, 1, 2), spurious_class=1, n_train=6, n_eval=8, seed=1)
    return run_synth(cfg)


@pytest.mark.parametrize("name", TINY_MODELS_112)
def test_112_towers_build_and_see_more_than_a_2x2_grid(name):
    loaded = load_clip(name)
    assert loaded.image_size == 112 and loaded.model.visual.output_dim == 64
    x = torch.randn(1, 3, 112, 112)
    visual = loaded.model.visual
    with torch.no_grad():
        assert loaded.model.encode_image(x).shape == (1, 64)
        if name.endswith("rn-112"):
            h = visual.stem(x) if hasattr(visual, "stem") else _stem(visual, x)
            for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
                h = layer(h)
            assert h.shape[-1] > 2 and h.shape[-2] > 2  # 3 x 3 at 112 px, 2 x 2 at 64
        else:
            assert visual.grid_size[0] * visual.grid_size[1] > 4


def _stem(visual, x):
    x = visual.act1(visual.bn1(visual.conv1(x)))
    x = visual.act2(visual.bn2(visual.conv2(x)))
    x = visual.act3(visual.bn3(visual.conv3(x)))
    return visual.avgpool(x)


@pytest.mark.parametrize("name", TINY_MODELS_112)
def test_112_towers_embed_the_scene_boxes(tmp_path, scene, name):
    run_embed(EmbedConfig(data=scene.eval_manifest, out=str(tmp_path / "run"), model=name, proposer="manifest"))
    run = read_run(tmp_path / "run")
    rows = read_manifest(scene.eval_manifest)
    assert run.data.num_regions.tolist() == [len(r.boxes) for r in rows]
    assert list(run.data.region_labels) == [lab for r in rows for lab in r.region_labels]
    emb = run.data.region_emb
    assert emb.shape == (sum(len(r.boxes) for r in rows), 64) and np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    # different objects of one image embed differently
    assert not np.allclose(emb[0], emb[1], atol=1e-3)


def test_grid_and_rpn_proposers_on_scene_images(tmp_path, scene):
    rows = read_manifest(scene.eval_manifest)
    run_embed(
        EmbedConfig(
            data=scene.eval_manifest,
            out=str(tmp_path / "grid"),
            model="ravl-tiny-rn-112",
            proposer="grid",
            proposer_options={"rows": 3, "cols": 3},
        )
    )
    run = read_run(tmp_path / "grid")
    assert run.data.num_regions.tolist() == [9] * len(rows)
    labels = set(run.data.region_labels)
    assert labels <= {""} | {lab for r in rows for lab in r.region_labels}  # matched by IoU >= 0.5, or unlabelled
    from ravl_engine.proposers import build_proposer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        rpn = build_proposer("rpn", weights=None, min_size=112, max_size=112, post_nms_top_n=20)
    from PIL import Image

    images = torch.stack(
        [torch.from_numpy(np.array(Image.open(r.path).convert("RGB"))).permute(2, 0, 1).float() / 255 for r in rows[:2]]
    )
    props = rpn(images)
    for p in props:
        b = p.boxes
        assert b.shape[0] > 0 and (b[:, 0] >= 0).all() and (b[:, 2] <= 112).all() and (b[:, 2] > b[:, 0]).all()
