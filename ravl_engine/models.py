"""open_clip models: the tiny configs shipped with ravl-engine, pretrained tags, local checkpoints.

``load_clip("ravl-tiny-rn")`` builds the default tiny ResNet CLIP (random init, trains on a CPU in minutes);
``load_clip("RN50", pretrained="openai")`` fetches open_clip weights (needs the network once);
``load_clip("RN50", pretrained="/path/to/weights.pt")`` loads a local file. With no network a tag fails within
seconds with a message that says how to pass a local file. ``load_clip("hf:/path/to/folder")`` converts a Hugging
Face transformers CLIP folder into the matching open_clip model (:mod:`ravl_engine.hf`).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from ravl_engine.errors import ConfigError
from ravl_engine.hf import is_hf, load_hf_clip
from ravl_engine.shards import sha256_file

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).with_name("model_configs")
TINY_MODELS = ("ravl-tiny-rn", "ravl-tiny-vit")
DEFAULT_MODEL = "ravl-tiny-rn"
# how long to wait for the model hub's name to resolve before treating the machine as offline
HUB_PROBE_TIMEOUT_S = 3.0

_registered = False


def register_configs() -> None:
    """Make the shipped tiny configs known to open_clip (idempotent)."""
    global _registered
    if _registered:
        return
    import open_clip  # noqa: PLC0415  (heavy import kept lazy)

    for path in sorted(CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(path)
    _registered = True


@dataclass(frozen=True)
class LoadedModel:
    """A CLIP model with what is needed to use it.

    Attributes:
        model: the open_clip model, in eval mode.
        preprocess: the image transform for PIL images (resize, crop, normalise).
        tokenizer: text tokenizer.
        name: architecture name.
        pretrained: tag, file path, or None (random init).
        checkpoint_sha256: sha256 of the checkpoint file when ``pretrained`` is a file.
        image_size: input side in pixels.
        mean, std: the normalisation of the image tower.
    """

    model: Any
    preprocess: Any
    tokenizer: Any
    name: str
    pretrained: str | None
    checkpoint_sha256: str | None
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def weights(self) -> str | None:
        """Where the weights came from: the checkpoint or tag, the ``hf:`` folder, or None (random init)."""
        return self.pretrained if self.pretrained is not None or not is_hf(self.name) else self.name


def _host_resolves(url: str, timeout: float) -> bool:
    """Whether the host of ``url`` resolves within ``timeout`` seconds (run in a thread: resolvers can hang)."""
    host = urlparse(url).hostname
    if not host:
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.getaddrinfo(host, 443)
            result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result and result[0])


@contextmanager
def _hub_offline_when_unreachable():
    """Without network, make the hub client use its local cache only, so a missing tag fails at once instead of
    retrying for minutes."""
    try:
        from huggingface_hub import constants  # noqa: PLC0415
    except ImportError:
        yield
        return
    if constants.HF_HUB_OFFLINE or _host_resolves(constants.ENDPOINT, HUB_PROBE_TIMEOUT_S):
        yield
        return
    logger.info("the model hub is unreachable; using the local cache only")
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def _checkpoint_arch(path: Path) -> str | None:
    """The architecture recorded in a ravl-engine checkpoint (``{"arch": name, "state_dict": ...}``), if any."""
    try:
        # memory-mapped: only the small dict is read here; open_clip reads the weights once, afterwards
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch file we can read with weights_only: let open_clip try
        return None
    return blob.get("arch") if isinstance(blob, dict) else None


def _load_failure(name: str, pretrained: str | None, *, file: str | None, err: Exception) -> str:
    """One line saying why ``name`` could not be built from ``pretrained`` (torch's own texts run to kilobytes)."""
    text = str(err)
    first = (text.splitlines() or [type(err).__name__])[0][:200]
    if file is not None and isinstance(err, RuntimeError) and "loading state_dict" in text:
        counts = []
        for kind in ("Missing", "Unexpected"):
            found = re.search(kind + r' key\(s\) in state_dict: ((?:"[^"]*"(?:, )?)*)', text)
            if found:
                n_keys = found.group(1).count('"') // 2  # each key is quoted
                counts.append(f"{n_keys} {kind.lower()} keys")
        if "size mismatch" in text:
            counts.append(f"{text.count('size mismatch for')} tensors of another shape")
        return f"{file}: its weights do not fit {name} ({', '.join(counts)}); pass the --model it was trained as"
    if file is not None:
        return (
            f"{file}: not a checkpoint that can be loaded ({type(err).__name__}: {first}); pass a file written by "
            "ravl-engine finetune / mitigate or an open_clip state dict"
        )
    if pretrained is None:
        return f"could not build {name} ({type(err).__name__}: {first})"
    return (
        f"could not load weights for {name} from tag {pretrained!r} ({type(err).__name__}: {first}); without network "
        "access pass a local checkpoint file, e.g. --pretrained /path/to/weights.pt"
    )


def load_clip(
    name: str = DEFAULT_MODEL, pretrained: str | None = None, *, device: str = "cpu", init_seed: int = 0
) -> LoadedModel:
    """Build an open_clip model.

    Args:
        name: open_clip architecture ("RN50", "ViT-B-32", ...), a shipped tiny config ("ravl-tiny-rn",
            "ravl-tiny-vit"), or ``hf:`` + a transformers CLIP folder or hub id
            (:func:`ravl_engine.hf.load_hf_clip`).
        pretrained: None (random init), an open_clip pretrained tag ("openai", "laion2b_s34b_b79k", ...) or a local
            checkpoint file. A ravl-engine checkpoint records its architecture and must match ``name``.
        device: torch device.
        init_seed: seed of the random initialisation (so that a random-init model is the same in every process,
            which resumed runs and tests rely on); the global torch RNG is left as it was.

    Returns:
        LoadedModel.

    Raises:
        ConfigError: unknown architecture, unreadable file, architecture mismatch, or weights that could not be
            fetched (the message says how to pass a local file).
    """
    if is_hf(name):  # converted into open_clip; transformers is imported there, as an optional extra
        return load_hf_clip(name, pretrained, device=device, init_seed=init_seed)
    import open_clip  # noqa: PLC0415

    register_configs()
    if name not in open_clip.list_models():
        raise ConfigError(
            f"unknown model {name!r}; use an open_clip architecture (open_clip.list_models()), one of "
            f"{', '.join(TINY_MODELS)}, or hf:PATH_OR_ID for a transformers CLIP folder"
        )
    sha = None
    weights: str | None = pretrained
    if pretrained is not None and Path(pretrained).is_file():
        path = Path(pretrained)
        sha = sha256_file(path)
        arch = _checkpoint_arch(path)
        if arch is not None and arch != name:
            raise ConfigError(f"{path} was trained as {arch!r}, not {name!r}; pass --model {arch}")
        weights = str(path)
    elif pretrained is not None and (os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin"))):
        raise ConfigError(f"checkpoint file {pretrained} does not exist")
    try:
        with _hub_offline_when_unreachable(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights, device=device)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(_load_failure(name, pretrained, file=weights if sha else None, err=err)) from err
    return loaded_model(
        model, preprocess=preprocess, tokenizer=open_clip.get_tokenizer(name), name=name, pretrained=pretrained, sha=sha
    )


def loaded_model(
    model: Any, *, preprocess: Any, tokenizer: Any, name: str, pretrained: str | None, sha: str | None
) -> LoadedModel:
    """The :class:`LoadedModel` of an open_clip model, put in eval mode; input size and normalisation are read from
    its visual tower (``image_mean`` / ``image_std``, OpenAI's constants when unset)."""
    import open_clip  # noqa: PLC0415

    model.eval()
    visual = model.visual
    size = visual.image_size
    image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = tuple(float(v) for v in getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(float(v) for v in getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
    return LoadedModel(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        name=name,
        pretrained=pretrained,
        checkpoint_sha256=sha,
        image_size=image_size,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
    )
