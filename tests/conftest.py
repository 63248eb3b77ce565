"""Shared fixtures: seeded synthetic embeddings and scores; everything offline and on CPU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


def unit_rows(n: int, d: int, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """n random unit vectors in d dims."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=1).to(dtype)


def clustered_rows(
    n: int, d: int, centers: int, *, spread: float = 0.4, seed: int = 0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """n unit vectors around ``centers`` random directions (a clustering with a clear answer)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.nn.functional.normalize(torch.randn(centers, d, generator=g, dtype=torch.float64), dim=1)
    which = torch.randint(centers, (n,), generator=g)
    x = protos[which] + spread * torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5
    return torch.nn.functional.normalize(x, dim=1).to(dtype)


def random_scores(n: int, c: int, *, seed: int = 0, sharp: float = 2.0) -> np.ndarray:
    """[n, c] softmax probabilities."""
    rng = np.random.default_rng(seed)
    logits = sharp * rng.standard_normal((n, c))
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


@pytest.fixture
def planted_small():
    from ravl_engine.synth import planted_embeddings

    return planted_embeddings(1200, dim=32, num_classes=4, seed=3)


def pytest_configure(config):
    from hypothesis import settings

    # CI runs a fixed example sequence so a red build always reproduces; locally hypothesis explores freely
    settings.register_profile("dev", max_examples=60)
    settings.register_profile("ci", max_examples=60, derandomize=True)
    settings.register_profile("explore", max_examples=2000)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
