"""Frozen stage configs: validation and strict from_dict."""

from __future__ import annotations

import dataclasses

import pytest

from ravl_engine import ConfigError, DiscoverConfig


def test_defaults_follow_released_code():
    cfg = DiscoverConfig()
    assert cfg.k_values(10) == list(range(20, 50))
    assert cfg.influence_threshold == 0.25 and cfg.two_sign_rule and cfg.skip_single_region_images
    assert not cfg.clip_distance and not cfg.k_max_inclusive
    assert DiscoverConfig(k_max_inclusive=True).k_values(10) == list(range(20, 51))
    assert DiscoverConfig(k=7).k_values(10) == [7]


def test_from_dict_rejects_unknown_keys():
    assert DiscoverConfig.from_dict({"k": 5}).k == 5
    with pytest.raises(ConfigError, match="unknown DiscoverConfig option\\(s\\): kk; valid options are"):
        DiscoverConfig.from_dict({"kk": 5})
    assert DiscoverConfig.from_dict(DiscoverConfig(k=4).to_dict()) == DiscoverConfig(k=4)


def test_frozen_and_keyword_only():
    cfg = DiscoverConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        DiscoverConfig(3)  # type: ignore[misc]
    assert dataclasses.replace(cfg, k=3).k == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 1}, "k must be >= 2"),
        ({"k_min_factor": 3, "k_max_factor": 2}, "need 1 <= k_min_factor <= k_max_factor"),
        ({"k_min_factor": 2, "k_max_factor": 2}, "the K sweep is empty"),
        ({"max_iter": 0}, "max_iter must be >= 1"),
        ({"backend": "annoy"}, "backend must be one of auto, torch, faiss"),
        ({"strategy": "fast"}, "strategy must be one of auto, cached, search"),
        ({"strategy": "search", "clip_distance": True}, "clip_distance=True needs strategy"),
        ({"normalize": "silent"}, "normalize must be one of warn, error"),
        ({"norm_tolerance": 0}, "norm_tolerance must be > 0"),
        ({"block_size": 0}, "block_size must be >= 1"),
        ({"memory_budget_mb": 0}, "memory_budget_mb must be >= 1"),
        ({"init_trials": 0}, "init_trials must be >= 1"),
    ],
)
def test_invalid_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DiscoverConfig(**kwargs)
