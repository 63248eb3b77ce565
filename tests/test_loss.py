"""The region-aware loss against a float64 loop written from RaVL's formulas; gradients; degenerate batches."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ravl_engine.kernels.loss import clip_loss, pad_regions, region_aware_loss
from tests.oracles import loop_region_aware_loss


def _batch(seed: int, b: int = 6, m: int = 5, d: int = 8, c: int = 4, p_region: float = 0.8, p_spur: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(b, m, d, generator=g, dtype=torch.float64)
    mask = torch.rand(b, m, generator=g) < p_region
    spurious = (torch.rand(b, m, generator=g) < p_spur) & mask
    labels = torch.randint(-1, c, (b,), generator=g)
    text = torch.randn(c, d, generator=g, dtype=torch.float64)
    return emb, mask, spurious, labels, text


def _oracle(emb, mask, spurious, labels, text, **kw):
    regions = [
        [(emb[i, j].tolist(), bool(spurious[i, j])) for j in range(emb.shape[1]) if mask[i, j]]
        for i in range(emb.shape[0])
    ]
    return loop_region_aware_loss(regions, labels.tolist(), text.tolist(), **kw)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("distinct", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_matches_the_loop_oracle(seed, reduction, distinct):
    batch = _batch(seed)
    got = region_aware_loss(*batch, temperature=0.07, reduction=reduction, distinct_labels=distinct)
    want = _oracle(*batch, temperature=0.07, reduction=reduction, distinct_labels=distinct)
    assert got[0].item() == pytest.approx(want[0], rel=1e-10)
    assert got[1].item() == pytest.approx(want[1], rel=1e-10)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    b=st.integers(1, 7),
    m=st.integers(1, 5),
    c=st.integers(1, 5),
    p_spur=st.sampled_from([0.0, 0.3, 0.9]),
    temperature=st.sampled_from([0.07, 1.0]),
)
def test_matches_the_loop_oracle_on_any_batch(seed, b, m, c, p_spur, temperature):
    batch = _batch(seed, b=b, m=m, c=c, p_spur=p_spur)
    got = region_aware_loss(*batch, temperature=temperature)
    want = _oracle(*batch, temperature=temperature)
    assert all(torch.isfinite(v) for v in got)
    assert got[0].item() == pytest.approx(want[0], rel=1e-9, abs=1e-12)
    assert got[1].item() == pytest.approx(want[1], rel=1e-9, abs=1e-12)


def test_float32_agrees_with_float64():
    emb, mask, spurious, labels, text = _batch(3, b=32, m=6, d=16, c=10)
    hi = region_aware_loss(emb, mask, spurious, labels, text)
    lo = region_aware_loss(emb.float(), mask, spurious, labels, text.float())
    assert torch.allclose(torch.stack(lo).double(), torch.stack(hi), rtol=1e-5)


@pytest.mark.parametrize("distinct", [True, False])
def test_gradcheck(distinct):
    emb, mask, spurious, labels, text = _batch(1, b=5, m=4, d=6, c=3)
    emb.requires_grad_(True)
    text.requires_grad_(True)

    def f(e, t):
        l_r, l_a = region_aware_loss(e, mask, spurious, labels, t, temperature=0.5, distinct_labels=distinct)
        return l_r + 2 * l_a

    assert torch.autograd.gradcheck(f, (emb, text))


def test_finite_without_non_spurious_regions_or_labels():
    emb, mask, spurious, labels, text = _batch(2, b=6, m=4, c=3)
    mask[:] = True
    spurious[:] = False
    spurious[0] = True  # image 0: every region spurious
    labels[1] = -1  # image 1: no class in the caption
    mask[2] = False  # image 2: no region at all
    emb.requires_grad_(True)
    text.requires_grad_(True)
    l_r, l_a = region_aware_loss(emb, mask, spurious, labels, text)
    (l_r + l_a).backward()
    assert torch.isfinite(l_r) and torch.isfinite(l_a)
    assert torch.isfinite(emb.grad).all() and torch.isfinite(text.grad).all()
    assert emb.grad[2].abs().sum() == 0  # padding gets no gradient
    want = _oracle(emb.detach(), mask, spurious, labels, text.detach())
    assert l_r.item() == pytest.approx(want[0], rel=1e-10) and l_a.item() == pytest.approx(want[1], rel=1e-10)


def test_a_batch_without_anchors_gives_zero_and_backpropagates():
    emb, mask, spurious, labels, text = _batch(5, b=4, m=3, c=3)
    emb.requires_grad_(True)
    for labels_, spurious_ in ((torch.full_like(labels, -1), spurious), (labels, mask.clone())):
        l_r, l_a = region_aware_loss(emb, mask, spurious_, labels_, text)
        assert l_r.item() == 0.0 and l_a.item() == 0.0
        (l_r + l_a).backward()
        assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() == 0


def test_padding_does_not_change_the_loss():
    emb, mask, spurious, labels, text = _batch(7, b=5, m=3)
    wide = torch.cat([emb, torch.randn(5, 4, emb.shape[2], dtype=emb.dtype) * 100], dim=1)
    pad = torch.zeros(5, 4, dtype=torch.bool)
    a = region_aware_loss(emb, mask, spurious, labels, text)
    b = region_aware_loss(wide, torch.cat([mask, pad], 1), torch.cat([spurious, ~pad], 1), labels, text)
    assert torch.allclose(torch.stack(a), torch.stack(b), rtol=1e-12)


def test_spurious_regions_raise_the_loss():
    """Moving a spurious region onto a class's text direction makes both terms larger (they push it away)."""
    emb, mask, spurious, labels, text = _batch(11, b=6, m=4, c=3)
    labels[:] = torch.tensor([0, 1, 2, 0, 1, 2])
    mask[:] = True
    spurious[:] = False
    spurious[0, 0] = True
    base = torch.stack(region_aware_loss(emb, mask, spurious, labels, text))
    emb2 = emb.clone()
    emb2[0, 0] = text[1] * 10
    moved = torch.stack(region_aware_loss(emb2, mask, spurious, labels, text))
    assert (moved > base).all()


def test_bad_shapes_and_options_are_refused():
    emb, mask, spurious, labels, text = _batch(0)
    with pytest.raises(ValueError, match=r"\[B, M, D\]"):
        region_aware_loss(emb[0], mask, spurious, labels, text)
    with pytest.raises(ValueError, match="class_emb"):
        region_aware_loss(emb, mask, spurious, labels, text[:, :3])
    with pytest.raises(ValueError, match="reduction"):
        region_aware_loss(emb, mask, spurious, labels, text, reduction="max")


def test_pad_regions_round_trip():
    counts = torch.tensor([2, 0, 3, 1])
    flat = torch.arange(6 * 2, dtype=torch.float64).view(6, 2)
    padded, mask = pad_regions(flat, counts, fill=-1.0)
    assert padded.shape == (4, 3, 2) and mask.sum() == 6
    assert torch.equal(padded[mask], flat)
    assert (padded[~mask] == -1).all()
    assert mask.tolist() == [[True, True, False], [False, False, False], [True, True, True], [True, False, False]]


def test_clip_loss_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    logits = 10 * torch.nn.functional.normalize(img, dim=1) @ torch.nn.functional.normalize(txt, dim=1).T
    want = 0.0
    for i in range(5):
        want -= (logits[i, i] - torch.logsumexp(logits[i], 0)) / 10
        want -= (logits[i, i] - torch.logsumexp(logits[:, i], 0)) / 10
    assert clip_loss(img, txt, 10.0).item() == pytest.approx(want.item(), rel=1e-12)
