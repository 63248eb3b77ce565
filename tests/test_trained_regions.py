"""A tiny CLIP trained from scratch on quadrant digits: its region embeddings classify digit quadrants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ravl_engine.embed import EmbedConfig, run_embed
from ravl_engine.finetune import train_clip
from ravl_engine.kernels.loss import clip_loss
from ravl_engine.models import load_clip
from ravl_engine.shards import read_run
from ravl_engine.zeroshot import zero_shot_probs
from tests.conftest import write_digit_dataset


def test_clip_loss_matches_a_plain_computation():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    an, bn = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    logits = 10.0 * an @ bn.T
    expected = 0.0
    for i in range(5):
        expected -= torch.log_softmax(logits[i], 0)[i] / 10 + torch.log_softmax(logits[:, i], 0)[i] / 10
    torch.testing.assert_close(clip_loss(a, b, 10.0), expected)


@pytest.mark.slow
def test_trained_tiny_model_classifies_digit_quadrants(tmp_path):
    classes = tuple(str(d) for d in range(10))
    train_manifest = write_digit_dataset(tmp_path / "train", n_images=3000, seed=1, classes=classes)
    eval_manifest = write_digit_dataset(tmp_path / "eval", n_images=300, seed=2, classes=classes)
    loaded = load_clip("ravl-tiny-rn")
    from PIL import Image

    rows = [line.split(",")[0] for line in train_manifest.read_text().splitlines()[1:]]
    pixels = (
        torch.stack(
            [
                torch.from_numpy(np.array(Image.open(train_manifest.parent / r).convert("RGB"))).permute(2, 0, 1)
                for r in rows
            ]
        )
        .float()
        .div(255)
    )
    pixels = F.interpolate(pixels, size=64, mode="bilinear", antialias=True, align_corners=False)
    mean, std = torch.tensor(loaded.mean).view(1, 3, 1, 1), torch.tensor(loaded.std).view(1, 3, 1, 1)
    labels = [classes[i % 10] for i in range(3000)]
    history = train_clip(
        loaded.model,
        loaded.tokenizer,
        (pixels - mean) / std,
        [f"the digit {y}" for y in labels],
        epochs=5,
        batch_size=128,
        lr=1e-3,
    )
    assert history[-1]["loss"] < history[0]["loss"]
    checkpoint = tmp_path / "tiny.pt"
    torch.save(loaded.model.state_dict(), checkpoint)

    run_embed(
        EmbedConfig(
            data=str(eval_manifest),
            out=str(tmp_path / "run"),
            pretrained=str(checkpoint),
            classes=classes,
            shard_size=1000,
        )
    )
    run = read_run(tmp_path / "run")
    region_labels = np.array(run.data.region_labels)
    digit = np.isin(region_labels, classes)
    probs = zero_shot_probs(torch.from_numpy(run.data.region_emb), torch.from_numpy(run.text_emb))
    accuracy = float((probs.argmax(1).numpy()[digit] == region_labels[digit].astype(int)).mean())
    image_accuracy = float(
        (
            zero_shot_probs(torch.from_numpy(run.data.image_emb), torch.from_numpy(run.text_emb)).argmax(1).numpy()
            == run.data.labels
        ).mean()
    )
    print(f"image accuracy {image_accuracy:.3f}, digit-region accuracy {accuracy:.3f}")
    # chance is 0.1 for both. The trajectory depends on the CPU's float kernels: measured image 0.473, digit regions
    # 0.343 on a 2-core Intel Xeon with AVX-512 (2026-12-04), image above 0.5 on a 2-core AMD EPYC; a broken path
    # sits at chance
    assert image_accuracy > 0.3 and accuracy > 0.2, (image_accuracy, accuracy)
