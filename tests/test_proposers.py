"""Region proposers: registry, box clean-up, and valid boxes on real images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ravl_engine.proposers.base
from ravl_engine.data import load_mnist
from ravl_engine.proposers import BoxFilter, build_proposer, finalize_boxes, list_proposers, register_proposer

MNIST = Path(__file__).resolve().parent / "assets" / "mnist"


@pytest.fixture(scope="module")
def digit_images() -> torch.Tensor:
    """Four 112 x 112 RGB images: an MNIST test digit in one quadrant, a red square in another."""
    digits, _ = load_mnist(MNIST)
    digits = digits[:4]
    images = torch.zeros(4, 3, 112, 112)
    for i, d in enumerate(digits):
        t = torch.nn.functional.interpolate(torch.as_tensor(d, dtype=torch.float32)[None, None] / 255, size=56)
        images[i, :, :56, :56] = t[0]
        images[i, 0, 56:, 56:] = 1.0  # red square in the bottom-right quadrant
    return images


def _assert_valid(props, height, width):
    for p in props:
        b = p.boxes
        assert b.dtype == torch.float32 and b.ndim == 2 and b.shape[1] == 4
        assert p.scores.shape == (b.shape[0],)
        assert torch.all(b[:, 0] >= 0) and torch.all(b[:, 1] >= 0)
        assert torch.all(b[:, 2] <= width) and torch.all(b[:, 3] <= height)
        assert torch.all(b[:, 2] > b[:, 0]) and torch.all(b[:, 3] > b[:, 1])


def test_registry_lists_builtins_and_rejects_duplicates_and_unknown_names():
    names = list_proposers()
    assert names == sorted(names)
    assert {"grid", "manifest", "quadrants", "rpn", "yolo"} <= set(names)
    with pytest.raises(ValueError, match="already registered"):
        register_proposer("grid")(lambda **_: None)
    with pytest.raises(ValueError, match="unknown proposer 'nope'; choose one of .*grid.*quadrants"):
        build_proposer("nope")


def test_entry_point_plugins_are_found(monkeypatch):
    class FakeEntryPoint:
        name, value = "fake-plugin", "pkg:factory"

        def load(self):
            return lambda **cfg: ("built", cfg)

    monkeypatch.setattr(ravl_engine.proposers.base, "entry_points", lambda group: [FakeEntryPoint()])
    monkeypatch.setattr(ravl_engine.proposers.base, "_REGISTRY", dict(ravl_engine.proposers.base._REGISTRY))
    assert "fake-plugin" in list_proposers()
    assert build_proposer("fake-plugin", size=3) == ("built", {"size": 3})


def test_quadrants_and_grid_tile_the_image(digit_images):
    quads = build_proposer("quadrants")(digit_images)
    assert len(quads) == 4
    expected = torch.tensor(
        [[0, 0, 56, 56], [56, 0, 112, 56], [0, 56, 56, 112], [56, 56, 112, 112]], dtype=torch.float32
    )
    assert torch.equal(quads[0].boxes, expected)
    grid = build_proposer("grid", rows=3, cols=4)(digit_images[:1])[0]
    assert grid.boxes.shape == (12, 4)
    area = ((grid.boxes[:, 2] - grid.boxes[:, 0]) * (grid.boxes[:, 3] - grid.boxes[:, 1])).sum()
    assert float(area) == pytest.approx(112 * 112)
    whole = build_proposer("quadrants", box_filter=BoxFilter(whole_image=True))(digit_images[:1])[0]
    assert whole.boxes.shape == (5, 4) and torch.equal(whole.boxes[-1], torch.tensor([0.0, 0.0, 112.0, 112.0]))
    with pytest.raises(ValueError, match="rows >= 1"):
        build_proposer("grid", rows=0)


def test_finalize_clips_drops_and_counts():
    boxes = torch.tensor([[-5, -5, 10, 10], [5, 5, 5, 20], [50, 50, 80, 90], [90, 90, 120, 130], [1, 1, 2, 2]])
    scores = torch.tensor([0.9, 0.8, 0.1, 0.7, 0.6])
    p = finalize_boxes(boxes, scores, height=100, width=100, filt=BoxFilter(min_size=2.0))
    assert p.boxes.tolist() == [[0, 0, 10, 10], [50, 50, 80, 90], [90, 90, 100, 100]]
    assert p.stats == {"clipped": 2, "dropped": 2}
    capped = finalize_boxes(boxes, scores, height=100, width=100, filt=BoxFilter(max_boxes=2, score_threshold=0.5))
    assert capped.scores.tolist() == pytest.approx([0.9, 0.7])
    empty = finalize_boxes(torch.zeros(0, 4), torch.zeros(0), height=10, width=10, filt=BoxFilter())
    assert empty.boxes.shape == (0, 4)


def test_manifest_proposer_uses_given_boxes(digit_images):
    given = [torch.tensor([[0.0, 0.0, 56.0, 56.0], [100.0, 100.0, 200.0, 200.0]]), None, torch.zeros(0, 4), None]
    props = build_proposer("manifest")(digit_images, boxes=given)
    assert props[0].boxes.tolist() == [[0, 0, 56, 56], [100, 100, 112, 112]]
    assert props[0].stats["clipped"] == 1
    assert props[1].boxes.shape == (0, 4)
    with pytest.raises(ValueError, match="needs the manifest's boxes"):
        build_proposer("manifest")(digit_images)


def test_rpn_random_init_gives_valid_boxes(digit_images):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random-init weights: seeded, or some draws decode every proposal to a sliver
        rpn = build_proposer("rpn", weights=None, min_size=112, max_size=112, post_nms_top_n=20)
    props = rpn(digit_images[:2])
    _assert_valid(props, 112, 112)
    assert all(p.boxes.shape[0] > 0 for p in props)
    assert all(float(p.scores.min()) >= 0 and float(p.scores.max()) <= 1 for p in props)


def test_rpn_unreachable_weights_fail_fast_with_the_fix(monkeypatch):
    import torchvision.models.detection.faster_rcnn as frcnn

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(frcnn, "fasterrcnn_resnet50_fpn", offline)
    import torchvision.models.detection as det

    monkeypatch.setattr(det, "fasterrcnn_resnet50_fpn", offline)
    with pytest.raises(RuntimeError, match="pass a local state-dict file"):
        build_proposer("rpn", weights="DEFAULT")


def test_yolo_random_init_gives_valid_boxes(digit_images, tmp_path, monkeypatch):
    import ultralytics  # noqa: F401 (a declared dependency: missing means a broken install, not a skip)

    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random-init weights: seeded so the test sees the same network every run
        yolo = build_proposer("yolo", weights="yolov8n.yaml", conf=0.0, imgsz=128, max_det=30)
    props = yolo(digit_images[:2])
    _assert_valid(props, 112, 112)
    assert all(p.boxes.shape[0] > 0 for p in props)
    with pytest.raises(FileNotFoundError, match="pass a local .pt file"):
        build_proposer("yolo", weights=str(tmp_path / "missing.pt"))
