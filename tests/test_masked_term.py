"""RaVL's optional image term: the masking kernel, the counterfactual pairs of a batch, the loss, the method."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from ravl_engine import ConfigError
from ravl_engine.cli import main
from ravl_engine.kernels.loss import box_mask, counterfactual_loss
from ravl_engine.mitigate import MitigateConfig, StepBatch, mitigation_loss, run_mitigate
from ravl_engine.mitigate_methods import class_embeddings, counterfactual_pairs
from ravl_engine.models import load_clip
from tests.test_mitigate import _cfg, setting  # noqa: F401 (the module fixture)


def _mask_oracle(images, boxes, owner, fill):
    out = images.clone()
    for (x1, y1, x2, y2), o in zip(boxes.tolist(), owner.tolist(), strict=True):
        for i in range(images.shape[2]):
            for j in range(images.shape[3]):
                if y1 <= i + 0.5 <= y2 and x1 <= j + 0.5 <= x2:
                    out[o, :, i, j] = fill
    return out


def _mask_boxes(images, boxes, owner, fill=0.0):
    return images.masked_fill(box_mask(images, boxes, owner)[:, None], fill)


def test_box_mask_holds_the_pixels_whose_centre_is_inside_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 2, 9, 11, generator=g)
    before = images.clone()
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [2.3, 5.6, 7.5, 9.0], [10.2, 0.0, 30.0, 2.0], [3.0, 3.0, 3.2, 3.2]])
    owner = torch.tensor([0, 0, 2, 1])  # box 3 holds no pixel centre
    got = _mask_boxes(images, boxes, owner, fill=-7.0)
    assert torch.equal(got, _mask_oracle(images, boxes, owner, -7.0))
    assert torch.equal(images, before)  # a copy
    assert torch.equal(got[1], images[1])
    assert int((got[0, 0] == -7.0).sum()) == 16 + 6 * 3  # 4x4 corner; x centres 2.5..7.5, y centres 6.5..8.5
    assert torch.equal(_mask_boxes(images, boxes[:0], owner[:0]), images)


def test_counterfactual_pairs_mask_donors_and_paste_into_other_classes():
    images = torch.arange(5, dtype=torch.float32)[:, None, None, None].expand(5, 3, 8, 8).clone() + 1
    quads = torch.tensor([[0.0, 0, 4, 4], [4, 0, 8, 4], [0, 4, 4, 8], [4, 4, 8, 8]])
    boxes = [quads[:2], quads, quads[:3], quads, quads]
    spurious = torch.zeros(17, dtype=torch.bool)
    spurious[[1, 7, 10]] = True  # box 1 (top right) of images 0, 2 and 3 (offsets 0, 2, 6, 9, 13)
    labels = torch.tensor([2, 2, 1, -1, 0])  # image 3 names no class
    masked = counterfactual_pairs(images, boxes, spurious, labels, paste=False)
    assert masked.with_feature.tolist() == [0, 2] and masked.without.tolist() == [5, 6]
    assert masked.labels.tolist() == [2, 1]
    want = images[[0, 2]].clone()
    want[:, :, 0:4, 4:8] = 0.0  # the top-right quadrant of both
    assert torch.equal(masked.copies, want)
    both = counterfactual_pairs(images, boxes, spurious, labels, paste=True)
    # donor 0 (class 2): the next free image of another class is 4 (1 shares the class, 2 and 3 are not free);
    # donor 2 (class 1): 4 again (3 names no class)
    assert both.with_feature.tolist() == [0, 2, 7, 8] and both.without.tolist() == [5, 6, 4, 4]
    assert both.labels.tolist() == [2, 1, 0, 0]
    for copy, donor in zip(both.copies[2:], (0, 2), strict=True):
        want = images[4].clone()
        want[:, 0:4, 4:8] = images[donor, :, 0:4, 4:8]
        assert torch.equal(copy, want)
    alone = counterfactual_pairs(images[:1], boxes[:1], spurious[:2], labels[:1], paste=True)  # no recipient
    assert alone.with_feature.tolist() == [0] and alone.without.tolist() == [1]


def test_counterfactual_loss_matches_a_float64_oracle_and_is_zero_without_pairs():
    g = torch.Generator().manual_seed(1)
    full, masked = (
        torch.randn(5, 4, generator=g, dtype=torch.float64),
        torch.randn(5, 4, generator=g, dtype=torch.float64),
    )
    labels = torch.tensor([0, 3, 1, 1, 2])
    want = 0.0
    for i in range(5):
        p_m = torch.exp(masked[i]) / torch.exp(masked[i]).sum()
        want += -torch.log(p_m[labels[i]]) / 5
        want += -(p_m * torch.log(torch.exp(full[i]) / torch.exp(full[i]).sum())).sum() / 5
    full.requires_grad_(True)
    masked.requires_grad_(True)
    got = counterfactual_loss(full, masked, labels)
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-12)
    got.backward()
    # the masked copies' distribution is the full image's target, not pulled toward it: their gradient is the CE's
    assert torch.allclose(masked.grad, (F.softmax(masked, 1) - F.one_hot(labels, 4)).detach() / 5)
    empty = counterfactual_loss(full[:0], masked[:0], labels[:0])
    assert float(empty.detach()) == 0.0 and empty.requires_grad


def test_the_step_adds_the_masked_term_to_ravls_region_terms():
    torch.manual_seed(0)
    loaded = load_clip("ravl-tiny-rn", init_seed=0)
    model = loaded.model
    quads = torch.tensor([[0.0, 0, 32, 32], [32, 0, 64, 32], [0, 32, 32, 64], [32, 32, 64, 64]])
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    spurious = torch.zeros(6, 4, dtype=torch.bool)
    spurious[[0, 3], 1] = True
    batch = StepBatch(
        images=torch.randn(6, 3, 64, 64),
        tokens=loaded.tokenizer([f"the digit {int(y)}" for y in labels]),
        labels=labels,
        groups=2 * labels + spurious.any(1).long(),
        boxes=[quads] * 6,
        spurious=spurious.flatten(),
    )
    with torch.no_grad():
        class_emb = class_embeddings(model, loaded.tokenizer([str(c) for c in range(3)]), 3)
    base = MitigateConfig(train="-", discovery="-", out="-", method="ravl", image_term="none")  # the paper's loss
    masked = MitigateConfig(train="-", discovery="-", out="-", method="ravl", image_term="masked")
    model.eval()  # fixed statistics: the extra copies in the pass change nothing else
    with torch.no_grad():
        _, clip0, aux0 = mitigation_loss(model, batch, class_emb, base)
        total, clip1, aux1 = mitigation_loss(model, batch, class_emb, masked)
        image_emb = model.encode_image(batch.images[[0, 3]])
        copies = batch.images[[0, 3]].clone()
        copies[:, :, 0:32, 32:64] = 0.0
        copy_emb = model.encode_image(copies)

        def logits(e):
            return F.normalize(e, dim=-1) @ class_emb.T / masked.temperature

        want = counterfactual_loss(logits(image_emb), logits(copy_emb), labels[[0, 3]])
    assert float(clip1) == pytest.approx(float(clip0), rel=1e-5)
    assert float(aux1 - aux0) == pytest.approx(float(want), rel=1e-4, abs=1e-5)
    assert float(total) == pytest.approx(float(0.8 * clip1 + 0.2 * aux1), rel=1e-6)
    counter = MitigateConfig(train="-", discovery="-", out="-", method="ravl", image_term="counterfactual")
    with torch.no_grad():
        _, _, aux2 = mitigation_loss(model, batch, class_emb, counter)
        pasted = batch.images[[1, 4]].clone()  # donors 0 and 3 paste into the next image of another class
        pasted[:, :, 0:32, 32:64] = batch.images[[0, 3], :, 0:32, 32:64]
        pairs_with = torch.cat([image_emb, model.encode_image(pasted)])
        pairs_without = torch.cat([copy_emb, model.encode_image(batch.images[[1, 4]])])
        want2 = counterfactual_loss(logits(pairs_with), logits(pairs_without), labels[[0, 3, 1, 4]])
    assert float(aux2 - aux0) == pytest.approx(float(want2), rel=1e-4, abs=1e-5)
    # ravl's default image term is the counterfactual one
    default = MitigateConfig(train="-", discovery="-", out="-", method="ravl")
    with torch.no_grad():
        _, _, aux_default = mitigation_loss(model, batch, class_emb, default)
    assert float(aux_default) == pytest.approx(float(aux2), rel=1e-5)
    # the same pairs on top of VL-ERM's image cross-entropy (the ablation without region terms)
    erm = MitigateConfig(train="-", discovery="-", out="-", method="vl-erm")  # default: no term for the baselines
    erm_cf = MitigateConfig(train="-", discovery="-", out="-", method="vl-erm", image_term="counterfactual")
    with torch.no_grad():
        _, _, aux3 = mitigation_loss(model, batch, class_emb, erm)
        _, _, aux4 = mitigation_loss(model, batch, class_emb, erm_cf)
    assert float(aux4 - aux3) == pytest.approx(float(want2), rel=1e-4, abs=1e-5)


def test_mitigate_with_the_masked_term_trains_and_reports_it(setting, tmp_path):  # noqa: F811
    for method, term, used in (
        ("ravl", "masked", "masked"),
        ("ravl", "method", "counterfactual"),  # the default
        ("vl-erm", "counterfactual", "counterfactual"),
    ):
        cfg = _cfg(setting, tmp_path, method=method, image_term=term, out=str(tmp_path / f"{method}-{term}.pt"))
        result = run_mitigate(cfg)
        assert result.image_term == used and result.method == method and result.history[0]["aux"] > 0
    with pytest.raises(ConfigError, match="--image-term masked needs a method with class embeddings"):
        _cfg(setting, tmp_path, method="upsampled", image_term="masked")
    with pytest.raises(ConfigError, match="--image-term must be one of"):
        _cfg(setting, tmp_path, image_term="blur")
    root, train_set, discovery = setting
    args = ["mitigate", "--train", str(train_set), "--discovery", str(discovery), "--epochs", "1", "--batch-size", "16"]
    res = CliRunner().invoke(
        main,
        [*args, "--out", str(tmp_path / "cli.pt"), "--work-dir", str(root / "train-regions")],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["image_term"] == "counterfactual"  # ravl's default
