"""The matmul RoIAlign against torchvision's kernel in float64: values and gradients, both forms, every option."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align as torchvision_roi_align

import ravl_engine.kernels.roialign as roialign
from ravl_engine.kernels.roialign import roi_align, roi_align_matmul


def _boxes(g: torch.Generator, n_images: int, side: float) -> list[torch.Tensor]:
    """Boxes of every kind: random ones reaching past the map, the whole map, a point, an inverted box, none."""
    out = []
    for i in range(n_images):
        k = int(torch.randint(0, 7, (1,), generator=g))
        corner = torch.rand(k, 2, generator=g, dtype=torch.float64) * side * 1.3 - 0.15 * side
        size = torch.rand(k, 2, generator=g, dtype=torch.float64) * side * 0.9
        boxes = torch.cat([corner, corner + size], dim=1)
        if i == 0:
            special = [[0, 0, side, side], [3.0, 3.0, 3.0, 3.0], [5.0, 6.0, 2.0, 1.0], [-side, -side, -0.5, -0.5]]
            boxes = torch.cat([boxes, torch.tensor(special, dtype=torch.float64)])
        if i == 1:
            boxes = boxes[:0]
        out.append(boxes)
    return out


CASES = [  # (H, W, output size, spatial scale)
    (4, 4, 4, 4 / 64),  # the 64 px ResNet's layer3 map, RegionCLIP's output
    (7, 7, 6, 7 / 112),  # the 112 px ResNet
    (8, 8, 2, 8 / 64),  # roi-mean on a ViT grid
    (5, 9, (3, 2), 0.5),  # non-square map and output
    (32, 32, (32, 32), 1.0),  # crop-and-resize of an image
]


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize(("h", "w", "out", "scale"), CASES)
def test_matmul_roi_align_matches_torchvision(monkeypatch, dense, h, w, out, scale):
    monkeypatch.setattr(roialign, "DENSE_MAX_WEIGHTS", 1 << 40 if dense else 0)
    g = torch.Generator().manual_seed(h * 100 + w)
    features = torch.randn(4, 3, h, w, generator=g, dtype=torch.float64, requires_grad=True)
    boxes = _boxes(g, 4, max(h, w) / scale)
    for aligned in (True, False):
        for sampling_ratio in (-1, 1, 3):
            args = (out, scale, sampling_ratio, aligned)
            expected = torchvision_roi_align(features, boxes, *args)
            got = roi_align_matmul(features, boxes, *args)
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
            upstream = torch.randn(expected.shape, generator=g, dtype=torch.float64)
            (want,) = torch.autograd.grad((expected * upstream).sum(), features)
            (have,) = torch.autograd.grad((got * upstream).sum(), features)
            torch.testing.assert_close(have, want, rtol=0, atol=1e-10)


def test_no_boxes_and_bad_box_lists():
    features = torch.randn(2, 3, 4, 4)
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)]
    assert roi_align_matmul(features, empty, 2).shape == (0, 3, 2, 2)
    with pytest.raises(ValueError, match="1 box tensors for 2"):
        roi_align_matmul(features, empty[:1], 2)


def test_float32_and_bfloat16_stay_close_to_float64():
    g = torch.Generator().manual_seed(3)
    features = torch.randn(3, 8, 7, 7, generator=g, dtype=torch.float64)
    boxes = [b.abs() for b in _boxes(g, 3, 112.0)]
    expected = torchvision_roi_align(features, boxes, 6, 7 / 112, -1, True)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
        got = roi_align_matmul(features.to(dtype), boxes, 6, 7 / 112, -1, True)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)


def test_the_matmul_form_runs_only_where_a_cpu_backward_follows(monkeypatch):
    calls = []

    def spy(*args):
        calls.append(1)
        return roi_align_matmul(*args)

    monkeypatch.setattr(roialign, "roi_align_matmul", spy)
    features = torch.randn(2, 3, 4, 4)
    boxes = [torch.tensor([[0.0, 0.0, 64.0, 64.0]]), torch.tensor([[0.0, 0.0, 32.0, 32.0]])]
    plain = roi_align(features, boxes, 4, 4 / 64)
    assert not calls
    with torch.no_grad():
        roi_align(features.requires_grad_(True), boxes, 4, 4 / 64)
    assert not calls
    trained = roi_align(features, boxes, 4, 4 / 64)
    assert calls == [1]
    torch.testing.assert_close(trained.detach(), plain, rtol=1e-5, atol=1e-6)
