"""Hugging Face transformers CLIP checkpoints (``--model hf:PATH_OR_ID``), converted once into open_clip.

A folder written by ``CLIPModel.save_pretrained`` (plus its processor: tokenizer files and image processor config),
or a hub id such as ``hf:openai/clip-vit-base-patch32`` where a network exists, becomes the open_clip ``CLIP`` with
the same widths, depths, heads, patch size, input size, context length and activation, and the transformers weights
are mapped into it (:func:`convert_state_dict`). Every region path (masked-attention CLS, roi-mean, crop) and the
fused mitigation step then run on it unchanged. The tokenizer, context length, normalisation constants and input
size come from the folder. transformers is the optional extra ``hf`` (``pip install 'ravl-engine[hf]'``).

Only ViT towers convert: transformers has no ResNet CLIP, and ResNet image models from the hub have no open_clip
twin (OpenAI's ResNet CLIP is ``--model RN50 --pretrained openai``).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ravl_engine.errors import BackendError, ConfigError

if TYPE_CHECKING:
    from ravl_engine.models import LoadedModel

logger = logging.getLogger(__name__)

HF_PREFIX = "hf:"
# transformers' activation name -> open_clip's quick_gelu flag (open_clip's default GELU is the exact, erf one)
ACTIVATIONS = {"quick_gelu": True, "gelu": False}
# the files a hub snapshot needs: config, tokenizer and processor (json/txt), weights (safetensors only)
HUB_FILES = ("*.json", "*.txt", "*.safetensors")

# one transformer block: transformers' module names -> open_clip's (q/k/v are fused separately)
_BLOCK = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
# everything outside the blocks: transformers' key -> (open_clip key, transpose: Linear [out, in] -> x @ [in, out])
_TOP = {
    "logit_scale": ("logit_scale", False),
    "text_model.embeddings.token_embedding.weight": ("token_embedding.weight", False),
    "text_model.embeddings.position_embedding.weight": ("positional_embedding", False),
    "text_model.final_layer_norm.weight": ("ln_final.weight", False),
    "text_model.final_layer_norm.bias": ("ln_final.bias", False),
    "text_projection.weight": ("text_projection", True),
    "vision_model.embeddings.class_embedding": ("visual.class_embedding", False),
    "vision_model.embeddings.patch_embedding.weight": ("visual.conv1.weight", False),
    "vision_model.embeddings.position_embedding.weight": ("visual.positional_embedding", False),
    "vision_model.pre_layrnorm.weight": ("visual.ln_pre.weight", False),
    "vision_model.pre_layrnorm.bias": ("visual.ln_pre.bias", False),
    "vision_model.post_layernorm.weight": ("visual.ln_post.weight", False),
    "vision_model.post_layernorm.bias": ("visual.ln_post.bias", False),
    "visual_projection.weight": ("visual.proj", True),
}
_LAYER = re.compile(r"(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def is_hf(name: str | None) -> bool:
    """Whether a ``--model`` value names a transformers checkpoint (``hf:PATH_OR_ID``)."""
    return bool(name) and str(name).startswith(HF_PREFIX)


def _transformers() -> Any:
    try:
        import transformers  # noqa: PLC0415  (optional, heavy)
    except ImportError as err:
        raise BackendError(
            f"--model hf:... needs transformers ({err}); install the extra: pip install 'ravl-engine[hf]'"
        ) from err
    return transformers


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [""])[0]


def resolve(name: str) -> tuple[str, Path]:
    """(canonical name, local folder) of ``hf:PATH_OR_ID``.

    A local folder's canonical name is ``hf:`` + its absolute path, so a checkpoint trained from it records where it
    came from whatever the working directory was; a hub id is fetched once into the Hugging Face cache (needs the
    network; without it this fails within seconds, saying how to pass a local folder).

    Raises:
        ConfigError: empty name, missing local folder, or a hub id that could not be fetched.
    """
    from ravl_engine.models import _hub_offline_when_unreachable  # noqa: PLC0415  (models imports this module)

    source = name[len(HF_PREFIX) :]
    if not source:
        raise ConfigError("--model hf: needs a folder or hub id, e.g. --model hf:/path/to/clip-folder")
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"--model {name}: {path} is a file; pass the folder written by save_pretrained")
        return HF_PREFIX + str(path.resolve()), path
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ConfigError(f"--model {name}: folder {path} does not exist")
    try:
        from huggingface_hub import snapshot_download  # noqa: PLC0415

        with _hub_offline_when_unreachable():
            folder = snapshot_download(source, allow_patterns=list(HUB_FILES))
    except Exception as err:
        raise ConfigError(
            f"could not fetch {source!r} from the Hugging Face hub ({type(err).__name__}: {_first_line(err)});"
            " without network access pass a local folder written by CLIPModel.save_pretrained (with its processor),"
            " e.g. --model hf:/path/to/clip-folder"
        ) from err
    return name, Path(folder)


def _read_model_type(path: Path) -> str:
    config = path / "config.json"
    if not config.is_file():
        raise ConfigError(
            f"{path} has no config.json, so it is not a transformers model folder; pass a folder written by "
            "CLIPModel.save_pretrained (with processor.save_pretrained into the same folder)"
        )
    try:
        doc = json.loads(config.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{config} is not readable JSON ({err}); save the model again with save_pretrained") from err
    return str(doc.get("model_type", "")) if isinstance(doc, dict) else ""


def _check_model_type(path: Path, model_type: str) -> None:
    """One-line refusals for the transformers folders that are not a two-tower CLIP with ViT towers."""
    if model_type == "clip":
        return
    if model_type in ("clip_text_model", "clip_vision_model"):
        tower = "text" if model_type == "clip_text_model" else "vision"
        raise ConfigError(
            f"{path} is a {tower}-only CLIP checkpoint ({model_type}); ravl-engine needs both towers: save the full "
            "CLIPModel with save_pretrained"
        )
    if "resnet" in model_type:
        raise ConfigError(
            f"{path} holds a transformers {model_type!r} model, which has no open_clip twin (only CLIPModel with "
            "ViT towers converts); for OpenAI's ResNet CLIP use --model RN50 --pretrained openai"
        )
    raise ConfigError(
        f"{path} holds a transformers {model_type or 'unknown'!r} model, not a CLIP model (model_type 'clip'); "
        "pass a folder written by CLIPModel.save_pretrained"
    )


def open_clip_config(config: Any, *, where: str) -> dict[str, Any]:
    """Keyword arguments of ``open_clip.model.CLIP`` matching a transformers ``CLIPConfig``.

    Raises:
        ConfigError: a setting open_clip's CLIP cannot reproduce (activation, channels, head split).
    """
    text, vision = config.text_config, config.vision_config
    acts = {text.hidden_act, vision.hidden_act}
    if len(acts) != 1 or not acts <= ACTIVATIONS.keys():
        raise ConfigError(
            f"{where}: hidden_act {sorted(acts)} is not convertible; open_clip's CLIP takes one of "
            f"{', '.join(ACTIVATIONS)} for both towers"
        )
    if getattr(vision, "num_channels", 3) != 3:
        raise ConfigError(f"{where}: the vision tower takes {vision.num_channels} channels; ravl-engine needs RGB (3)")
    for tower, cfg in (("text", text), ("vision", vision)):
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ConfigError(f"{where}: {tower} hidden_size is not a multiple of num_attention_heads")
    if text.eos_token_id == 2:  # transformers' legacy configs pool at the largest token id, as open_clip's argmax
        pool: dict[str, Any] = {"pool_type": "argmax"}
    else:  # the first eos token, as transformers does
        pool = {"pool_type": "eos", "eos_id": int(text.eos_token_id)}
    return {
        "embed_dim": int(config.projection_dim),
        "quick_gelu": ACTIVATIONS[text.hidden_act],
        "vision_cfg": {
            "image_size": int(vision.image_size),
            "patch_size": int(vision.patch_size),
            "width": int(vision.hidden_size),
            "layers": int(vision.num_hidden_layers),
            "head_width": vision.hidden_size // vision.num_attention_heads,
            "mlp_ratio": vision.intermediate_size / vision.hidden_size,
            "norm_kwargs": {"eps": float(vision.layer_norm_eps)},
        },
        "text_cfg": {
            "context_length": int(text.max_position_embeddings),
            "vocab_size": int(text.vocab_size),
            "width": int(text.hidden_size),
            "heads": int(text.num_attention_heads),
            "layers": int(text.num_hidden_layers),
            "mlp_ratio": text.intermediate_size / text.hidden_size,
            "norm_kwargs": {"eps": float(text.layer_norm_eps)},
            **pool,
        },
    }


def convert_state_dict(state: dict[str, Tensor], *, where: str = "the checkpoint") -> dict[str, Tensor]:
    """Map a transformers ``CLIPModel`` state dict onto open_clip's ``CLIP`` keys.

    Separate q/k/v Linear layers become the fused ``in_proj_weight`` [3 W, W] / ``in_proj_bias`` [3 W] of
    ``nn.MultiheadAttention``; the bias-free projection Linear layers [D, W] become open_clip's ``x @ proj`` matrices
    [W, D]; ``position_ids`` buffers are dropped.

    Raises:
        ConfigError: a key this mapping does not know (a CLIP variant open_clip's CLIP cannot hold).
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key in _TOP:
            target, transpose = _TOP[key]
            out[target] = value.T.contiguous() if transpose else value
            continue
        match = _LAYER.fullmatch(key)
        if match is None or (match[3] not in _BLOCK and match[3] not in _QKV):
            raise ConfigError(f"{where}: weight {key!r} has no place in open_clip's CLIP; it is not a plain CLIPModel")
        tower, layer, module, kind = match.groups()
        prefix = f"{'visual.' if tower == 'vision' else ''}transformer.resblocks.{layer}"
        if module in _QKV:
            qkv.setdefault((prefix, kind), {})[module] = value
        else:
            out[f"{prefix}.{_BLOCK[module]}.{kind}"] = value
    for (prefix, kind), parts in qkv.items():
        if len(parts) != 3:
            raise ConfigError(f"{where}: {prefix} lacks some of the q/k/v {kind}s; the checkpoint is incomplete")
        out[f"{prefix}.attn.in_proj_{kind}"] = torch.cat([parts[m] for m in _QKV])
    return out


@dataclass(frozen=True)
class HFTokenizer:
    """A transformers tokenizer with open_clip's interface: texts -> LongTensor [N, context_length] of token ids,
    padded and truncated (keeping the end-of-text token) to the text tower's context length."""

    tokenizer: Any
    context_length: int

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> Tensor:
        batch = [texts] if isinstance(texts, str) else list(texts)
        encoded = self.tokenizer(
            batch,
            padding="max_length",
            truncation=True,
            max_length=context_length or self.context_length,
            return_tensors="pt",
        )
        return encoded["input_ids"]


def _processor_parts(transformers: Any, path: Path) -> tuple[Any, tuple[float, ...], tuple[float, ...]]:
    """(tokenizer, mean, std) saved with the model; a folder without them is refused with the fix."""
    fix = "save the CLIPProcessor into the model folder too (processor.save_pretrained(folder))"
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    except Exception as err:
        raise ConfigError(f"{path}: no readable tokenizer ({type(err).__name__}); {fix}") from err
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(str(path))
    except Exception as err:
        raise ConfigError(f"{path}: no readable image processor config ({type(err).__name__}); {fix}") from err
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        raise ConfigError(f"{path}: the image processor has no 3-channel image_mean / image_std; {fix}")
    return tokenizer, tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _hf_weights(transformers: Any, path: Path) -> dict[str, Tensor]:
    """The state dict of the folder's ``CLIPModel``, refusing folders whose weights miss part of the model."""
    hf_logging = transformers.utils.logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the library never prints: no "Loading weights" bar on stderr
    try:
        hf_model, info = transformers.CLIPModel.from_pretrained(str(path), output_loading_info=True)
    except Exception as err:
        raise ConfigError(
            f"{path}: could not read the CLIPModel weights ({type(err).__name__}: {_first_line(err)}); "
            "save the model again with CLIPModel.save_pretrained"
        ) from err
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing:
        raise ConfigError(
            f"{path}: the weights lack {len(missing)} CLIPModel tensors (e.g. {missing[0]}); it is not a complete "
            "two-tower CLIP checkpoint, save the full CLIPModel"
        )
    return hf_model.state_dict()


def load_hf_clip(name: str, pretrained: str | None = None, *, device: str = "cpu", init_seed: int = 0) -> LoadedModel:
    """Load ``hf:PATH_OR_ID`` as an open_clip model (:func:`ravl_engine.models.load_clip` delegates here).

    Args:
        name: ``hf:`` + a folder written by ``CLIPModel.save_pretrained`` with its processor, or a hub id.
        pretrained: None (the folder's weights) or a checkpoint file written by ``finetune`` / ``mitigate`` from this
            model (it records ``hf:`` + the folder's absolute path as its architecture).
        device: torch device.
        init_seed: unused for the folder's weights (every tensor is replaced); kept for the common signature.

    Returns:
        ravl_engine.models.LoadedModel whose ``name`` is the canonical ``hf:`` name.

    Raises:
        ConfigError: not a CLIP folder, one tower only, a ResNet or other model open_clip has no twin for, missing
            tokenizer / processor files, an unreachable hub id, a checkpoint of another model.
        BackendError: transformers is not installed (names the ``hf`` extra).
    """
    import open_clip  # noqa: PLC0415

    from ravl_engine.models import _checkpoint_arch, loaded_model  # noqa: PLC0415
    from ravl_engine.shards import sha256_file  # noqa: PLC0415

    transformers = _transformers()
    canonical, path = resolve(name)
    _check_model_type(path, _read_model_type(path))
    sha = None
    if pretrained is not None:
        ckpt = Path(pretrained)
        if not ckpt.is_file():
            raise ConfigError(
                f"--pretrained {pretrained}: an hf: model takes its weights from the folder; --pretrained must be a "
                "checkpoint file written by finetune or mitigate from it"
            )
        arch = _checkpoint_arch(ckpt)
        if arch is not None and arch != canonical:
            raise ConfigError(f"{ckpt} was trained as {arch!r}, not {canonical!r}; pass --model {arch}")
        sha = sha256_file(ckpt)
    config = transformers.CLIPConfig.from_pretrained(str(path))
    cfg = open_clip_config(config, where=str(path))
    tokenizer, mean, std = _processor_parts(transformers, path)
    eos = cfg["text_cfg"].get("eos_id")
    if eos is not None and eos != tokenizer.eos_token_id:  # transformers would pool the first token, silently
        raise ConfigError(
            f"{path}/config.json: text_config eos_token_id {eos} is not the tokenizer's end-of-text token "
            f"{tokenizer.eos_token_id}; set eos_token_id to {tokenizer.eos_token_id} in config.json"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = open_clip.model.CLIP(**cfg)
    try:
        if pretrained is None:
            model.load_state_dict(convert_state_dict(_hf_weights(transformers, path), where=str(path)), strict=True)
        else:
            open_clip.load_checkpoint(model, str(pretrained), strict=True)
    except RuntimeError as err:  # shapes or keys that do not fit the converted architecture
        source = pretrained or str(path)
        raise ConfigError(
            f"{source}: the weights do not fit the open_clip model built from {path}/config.json "
            f"({_first_line(err)}); save the CLIPModel again, or pass the model the checkpoint was trained as"
        ) from err
    model.to(device)
    size = int(cfg["vision_cfg"]["image_size"])
    model.visual.image_mean, model.visual.image_std = mean, std
    logger.info("converted %s into open_clip (%d px, context %d)", path, size, cfg["text_cfg"]["context_length"])
    return loaded_model(
        model,
        preprocess=open_clip.image_transform(size, is_train=False, mean=mean, std=std),
        tokenizer=HFTokenizer(tokenizer, int(cfg["text_cfg"]["context_length"])),
        name=canonical,
        pretrained=pretrained,
        sha=sha,
    )
