"""Model loading: shipped tiny configs, deterministic random init, local checkpoints, fast offline failure."""

from __future__ import annotations

import socket

import pytest
import torch

from ravl_engine import ConfigError
from ravl_engine.models import TINY_MODELS, load_clip


@pytest.mark.parametrize("name", TINY_MODELS)
def test_tiny_models_build_offline_and_deterministically(name):
    a, b = load_clip(name), load_clip(name)
    assert a.image_size == 64 and a.model.visual.output_dim == 64
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    state = torch.get_rng_state()
    load_clip(name, init_seed=3)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched


def test_local_checkpoint_round_trip_and_arch_check(tmp_path):
    model = load_clip("ravl-tiny-rn", init_seed=7)
    path = tmp_path / "tiny.pt"
    torch.save(model.model.state_dict(), path)
    again = load_clip("ravl-tiny-rn", str(path))
    assert again.checkpoint_sha256 is not None and len(again.checkpoint_sha256) == 64
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again.model.encode_image(x), model.model.encode_image(x))
    tagged = tmp_path / "tagged.pt"
    torch.save({"arch": "ravl-tiny-vit", "state_dict": model.model.state_dict()}, tagged)
    with pytest.raises(ConfigError, match="was trained as 'ravl-tiny-vit', not 'ravl-tiny-rn'"):
        load_clip("ravl-tiny-rn", str(tagged))
    with pytest.raises(ConfigError, match="does not exist"):
        load_clip("ravl-tiny-rn", str(tmp_path / "missing.pt"))


def test_unknown_model_and_offline_tag_fail_fast_with_the_fix(monkeypatch):
    with pytest.raises(ConfigError, match="unknown model 'not-a-model'"):
        load_clip("not-a-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    connects: list = []
    real_connect = socket.socket.connect

    def refuse(self, address):  # "fails fast" = it does not try the network at all, whatever this machine can reach
        connects.append(address)
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(ConfigError, match="pass a local checkpoint file"):
        load_clip("RN50", "openai")
    assert connects == [], f"an offline load tried the network: {connects}"
