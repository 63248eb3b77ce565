"""--model hf:PATH: a tiny random transformers CLIPModel saved with save_pretrained, converted into open_clip and
checked against transformers itself; finetune / mitigate on it; the folders that are refused."""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from ravl_engine import BackendError, ConfigError
from ravl_engine.cli import main
from ravl_engine.finetune import schedule_defaults
from ravl_engine.hf import convert_state_dict
from ravl_engine.models import load_clip
from ravl_engine.shards import read_run
from tests.conftest import write_digit_dataset
from tests.test_mitigate import _discovery

transformers = pytest.importorskip("transformers")

# the first merges of open_clip's BPE vocabulary: a small vocabulary (512 byte tokens + merges + 2 specials) keeps
# the tokenizer files quick to load; the common words of the prompts are single tokens already
N_MERGES = 4000
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # not open_clip's defaults: they must come from the folder
TINY = {
    "projection_dim": 16,
    "text_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
        "vocab_size": 512 + N_MERGES + 2,
        "bos_token_id": 512 + N_MERGES,  # <|startoftext|>, <|endoftext|>: the last two tokens of the vocabulary
        "eos_token_id": 512 + N_MERGES + 1,
    },
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
    },
}


def _tokenizer(folder: Path):
    """A CLIPTokenizer written from (the first merges of) the BPE vocabulary shipped inside open_clip."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 1 + N_MERGES]
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def write_processor(folder: Path, *, size: int = 32) -> Path:
    """Tokenizer and image processor files (CLIPProcessor.save_pretrained) for ``size`` px inputs."""
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=MEAN, image_std=STD
    )
    tokenizer = _tokenizer(folder)
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def processor_files(tmp_path_factory):
    return write_processor(tmp_path_factory.mktemp("hf") / "processor")


def write_hf_clip(folder: Path, processor_files: Path | None, *, seed: int = 0, **overrides) -> Path:
    """A random tiny transformers CLIPModel saved with save_pretrained, beside a copy of ``processor_files`` (none
    when None); returns the folder."""
    cfg = {**TINY, **overrides}
    cfg["text_config"] = {**TINY["text_config"], **overrides.get("text_config", {})}
    cfg["vision_config"] = {**TINY["vision_config"], **overrides.get("vision_config", {})}
    torch.manual_seed(seed)
    model = transformers.CLIPModel(transformers.CLIPConfig(**cfg))
    # larger than transformers' 0.02 initialisation, so the embeddings of different inputs are far apart
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    if processor_files is not None:
        shutil.copytree(processor_files, folder, dirs_exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, processor_files):
    return write_hf_clip(tmp_path_factory.mktemp("hf") / "tiny-clip", processor_files)


def _features(out):
    """get_*_features returns a tensor in transformers 4 and an output with pooler_output in 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _reference(folder: Path):
    model = transformers.CLIPModel.from_pretrained(str(folder)).eval()
    return model, transformers.CLIPProcessor.from_pretrained(str(folder))


TEXTS = ["a photo of the number 3", "the digit 7", "an image of a zero", "a much longer caption " * 6]


# OpenAI's checkpoints: quick_gelu, eos pooling at the first eos token; the other variant: exact GELU and a legacy
# config (eos_token_id 2), where transformers pools at the largest token id
@pytest.mark.parametrize("variant", ["quick_gelu", "gelu_legacy_eos"])
def test_converted_model_equals_transformers_on_the_same_inputs(tmp_path, processor_files, variant):
    legacy = variant == "gelu_legacy_eos"
    text = {"hidden_act": "gelu", "eos_token_id": 2} if legacy else {}
    vision = {"hidden_act": "gelu"} if legacy else {}
    folder = write_hf_clip(tmp_path / variant, processor_files, seed=1, text_config=text, vision_config=vision)
    loaded = load_clip(f"hf:{folder}")
    ref, processor = _reference(folder)
    assert loaded.name == f"hf:{folder.resolve()}" and loaded.image_size == 32
    assert loaded.mean == pytest.approx(MEAN) and loaded.std == pytest.approx(STD)
    tokens = loaded.tokenizer(TEXTS)
    encoded = processor.tokenizer(TEXTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    assert tokens.shape == (4, 16) and torch.equal(tokens, encoded["input_ids"])
    assert int(tokens[3, -1]) == processor.tokenizer.eos_token_id  # truncated, still ending in the eos token
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text_ours, text_ref = loaded.model.encode_text(tokens), _features(ref.get_text_features(**encoded))
        image_ours, image_ref = loaded.model.encode_image(pixels), _features(ref.get_image_features(pixels))
    torch.testing.assert_close(text_ours, text_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(image_ours, image_ref, rtol=1e-4, atol=1e-5)
    # the comparison is not vacuous: different inputs give clearly different embeddings
    assert F.cosine_similarity(image_ref[0], image_ref[1], dim=0) < 0.97
    assert F.cosine_similarity(text_ref[0], text_ref[1], dim=0) < 0.97
    torch.testing.assert_close(loaded.model.logit_scale.detach(), ref.logit_scale.detach())


def test_state_dict_mapping_fuses_qkv_and_transposes_projections():
    hf = {
        "text_model.encoder.layers.0.self_attn.q_proj.weight": torch.full((2, 2), 1.0),
        "text_model.encoder.layers.0.self_attn.k_proj.weight": torch.full((2, 2), 2.0),
        "text_model.encoder.layers.0.self_attn.v_proj.weight": torch.full((2, 2), 3.0),
        "vision_model.encoder.layers.1.mlp.fc1.bias": torch.ones(4),
        "visual_projection.weight": torch.arange(6.0).view(3, 2),
        "text_model.embeddings.position_ids": torch.arange(2),
    }
    out = convert_state_dict(hf)
    fused, fc1 = "transformer.resblocks.0.attn.in_proj_weight", "visual.transformer.resblocks.1.mlp.c_fc.bias"
    assert set(out) == {fused, fc1, "visual.proj"}
    assert out[fused][:, 0].tolist() == [1, 1, 2, 2, 3, 3]
    assert torch.equal(out["visual.proj"], torch.arange(6.0).view(3, 2).T)
    with pytest.raises(ConfigError, match="'vision_model.head.weight' has no place"):
        convert_state_dict({"vision_model.head.weight": torch.ones(1)})
    with pytest.raises(ConfigError, match="lacks some of the q/k/v"):
        convert_state_dict({"text_model.encoder.layers.0.self_attn.q_proj.bias": torch.ones(2)})


def test_embed_matches_transformers_text_and_image_features(hf_folder, tmp_path):
    data = write_digit_dataset(tmp_path / "set", n_images=6, seed=0)
    templates = "a photo of the number {}|the digit {}"
    args = ["embed", "--data", str(data), "--out", str(tmp_path / "run"), "--model", f"hf:{hf_folder}"]
    res = CliRunner().invoke(main, [*args, "--proposer", "manifest", "--whole-image", "--templates", templates])
    assert res.exit_code == 0, res.output
    run = read_run(tmp_path / "run")
    ref, processor = _reference(hf_folder)
    # class text embeddings: transformers' text features, averaged over the run's templates as in zero-shot CLIP
    prompts = [t.format(c) for c in run.classes for t in templates.split("|")]
    encoded = processor.tokenizer(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        text = F.normalize(_features(ref.get_text_features(**encoded)), dim=-1).view(len(run.classes), 2, -1)
    expected = F.normalize(text.mean(1), dim=-1)
    np.testing.assert_allclose(run.text_emb, expected.numpy(), atol=1e-5)
    # image embeddings: transformers' image features on the processor's pixels (square images: resize only)
    images = [Image.open(data.parent / f"img/{i:04d}.png").convert("RGB") for i in range(6)]
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        image_ref = F.normalize(_features(ref.get_image_features(pixels)), dim=-1)
    ours = torch.from_numpy(run.data.image_emb).float()
    cos = (ours * image_ref).sum(1)
    assert cos.min() >= 0.99, cos
    assert (ours @ image_ref.T).fill_diagonal_(-1).max() < cos.min()  # each image is nearest to its own reference
    # masked-attention CLS of the whole-image box (the last box of each image) is the image embedding
    offsets = run.data.offsets
    whole = run.data.region_emb[offsets[1:] - 1]
    np.testing.assert_allclose(whole, run.data.image_emb, atol=1e-5)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["region_mode"] == "roi"


def test_finetune_checkpoint_records_the_folder_and_loads_back(hf_folder, tmp_path):
    name = f"hf:{hf_folder}"
    train = write_digit_dataset(tmp_path / "train", n_images=10, seed=1)
    ckpt = tmp_path / "tuned.pt"
    args = ["finetune", "--train", str(train), "--out", str(ckpt), "--model", name, "--epochs", "1"]
    res = CliRunner().invoke(main, [*args, "--batch-size", "8", "--no-progress"])
    assert res.exit_code == 0, res.output
    blob = torch.load(ckpt, weights_only=True)
    assert blob["arch"] == f"hf:{hf_folder.resolve()}"  # where it came from, whatever the working directory
    again = load_clip(name, str(ckpt))
    assert again.checkpoint_sha256 is not None and again.weights == str(ckpt)
    assert all(torch.equal(again.model.state_dict()[k], v) for k, v in blob["state_dict"].items())
    # the folder's weights are pretrained weights: the paper's schedule (lr 5e-5, text tower frozen) by default
    start = load_clip(name)
    assert start.weights == name and schedule_defaults(start.weights, None, None) == (5e-5, True)
    assert torch.equal(blob["state_dict"]["token_embedding.weight"], start.model.state_dict()["token_embedding.weight"])
    with pytest.raises(ConfigError, match="was trained as 'hf:"):
        load_clip("ravl-tiny-vit", str(ckpt))
    with pytest.raises(ConfigError, match="was trained as 'hf:"):
        load_clip(f"hf:{shutil.copytree(hf_folder, tmp_path / 'elsewhere')}", str(ckpt))


@pytest.mark.slow
def test_mitigate_ravl_on_an_hf_model(hf_folder, tmp_path):
    name = f"hf:{hf_folder}"
    audit = write_digit_dataset(tmp_path / "audit", n_images=20, seed=0)
    train = write_digit_dataset(tmp_path / "train", n_images=30, seed=1)
    args = ["embed", "--data", str(audit), "--out", str(tmp_path / "run"), "--model", name, "--proposer", "manifest"]
    res = CliRunner().invoke(main, [*args, "--no-progress"])
    assert res.exit_code == 0, res.output
    discovery = _discovery(tmp_path / "run", tmp_path / "discovery.json")
    fixed = tmp_path / "fixed.pt"
    res = CliRunner().invoke(
        main,
        ["mitigate", "--train", str(train), "--discovery", str(discovery), "--out", str(fixed), "--method", "ravl"]
        + ["--epochs", "1", "--batch-size", "8", "--no-progress"],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["n_spurious_regions"] > 0 and summary["history"][0]["aux"] > 0  # the region-aware terms ran
    blob = torch.load(fixed, weights_only=True)
    assert blob["arch"] == f"hf:{hf_folder.resolve()}" and blob["method"] == "ravl"
    again = load_clip(name, str(fixed))
    assert all(torch.equal(again.model.state_dict()[k], v) for k, v in blob["state_dict"].items())


def _one_line_error(args) -> str:
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0 and not isinstance(res.exception, (AssertionError, TypeError, KeyError))
    message = res.output.strip()
    assert message.startswith("Error: ") and "\n" not in message, res.output
    return message


def test_folders_that_are_not_two_tower_vit_clip_are_refused(hf_folder, processor_files, tmp_path):
    cfg = transformers.CLIPConfig(**TINY)
    text_only = tmp_path / "text-only"
    transformers.CLIPTextModelWithProjection(cfg.text_config).save_pretrained(text_only)
    vision_only = tmp_path / "vision-only"
    transformers.CLIPVisionModelWithProjection(cfg.vision_config).save_pretrained(vision_only)
    resnet = tmp_path / "resnet"
    transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1])).save_pretrained(
        resnet
    )
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    empty = tmp_path / "empty"
    empty.mkdir()
    data = write_digit_dataset(tmp_path / "set", n_images=2)
    cases = {
        text_only: "is a text-only CLIP checkpoint",
        vision_only: "is a vision-only CLIP checkpoint",
        resnet: "'resnet' model, which has no open_clip twin",
        bert: "'bert' model, not a CLIP model",
        empty: "has no config.json",
        tmp_path / "missing": "does not exist",
        write_hf_clip(tmp_path / "no-processor", None): "save the CLIPProcessor into the model folder",
        write_hf_clip(tmp_path / "eos", processor_files, text_config={"eos_token_id": 7}): "eos_token_id 7 is not",
    }
    for folder, expected in cases.items():
        message = _one_line_error(
            ["embed", "--data", str(data), "--out", str(tmp_path / "r"), "--model", f"hf:{folder}"]
        )
        assert expected in message and str(folder) in message, message
    with pytest.raises(ConfigError, match="--pretrained must be a checkpoint file"):
        load_clip(f"hf:{hf_folder}", "openai")


def test_hub_id_offline_and_missing_transformers_fail_with_the_fix(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="pass a local folder written by CLIPModel.save_pretrained"):
        load_clip("hf:nobody-here/no-such-clip")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if the extra were not installed
    with pytest.raises(BackendError, match=r"pip install 'ravl-engine\[hf\]'"):
        load_clip("hf:nobody-here/no-such-clip")


@pytest.mark.slow
def test_reduced_demo_on_an_hf_model(hf_folder, tmp_path):
    args = ["demo", "--out", str(tmp_path / "demo"), "--model", f"hf:{hf_folder}", "--n-train", "300"]
    res = CliRunner().invoke(main, [*args, "--n-eval", "100", "--epochs", "1"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["config"]["model"] == f"hf:{hf_folder}"
    manifest = json.loads((tmp_path / "demo" / "run" / "manifest.json").read_text())
    assert manifest["model"]["name"] == f"hf:{hf_folder}" and manifest["model"]["checkpoint_sha256"]
    assert torch.load(tmp_path / "demo" / "model.pt", weights_only=True)["arch"] == f"hf:{hf_folder.resolve()}"
