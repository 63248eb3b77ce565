"""Stage ``mitigate``: fine-tune with RaVL's region-aware loss, or with one of the paper's baselines.

Four parts: caption parsing (ravl_engine/captions.py), discovery reading and preparation (ravl_engine/mitigate_prep.py:
the fine-tuning regions embedded with the audited model and assigned to the medoids), the methods' losses and
samplers (ravl_engine/mitigate_methods.py) and the one training loop shared with ``finetune``
(ravl_engine/training.py). This module holds the options and the run.

Selection (``--select``, the same rule for every method): ``pseudo-group`` (default) keeps the epoch with the best
worst pseudo-group zero-shot accuracy on the selection half of the audit set, ties broken by the mean pseudo-group
accuracy (ravl_engine/selection.py: class x image listed in the chosen discovery cluster, no ground-truth feature
labels); ``accuracy`` / ``worst-group`` use the share of the fine-tuning set held out (``--val-fraction``); ``last``
keeps the last epoch.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ravl_engine.captions import caption_classes  # noqa: F401 (re-exported)
from ravl_engine.config import config_from_dict
from ravl_engine.distributed import local_device, wrap_ddp
from ravl_engine.errors import ConfigError
from ravl_engine.finetune import holdout_split, make_optimizer, schedule_defaults
from ravl_engine.images import check_resize
from ravl_engine.kernels.loss import clip_loss
from ravl_engine.mitigate_methods import (  # noqa: F401 (StepBatch, GroupDRO, mitigation_loss: re-exported)
    BALANCED,
    IMAGE_TERM_CHOICES,
    IMAGE_TERMS,
    METHODS,
    SAMPLERS,
    WITH_CLASSES,
    GroupDRO,
    StepBatch,
    class_embeddings,
    method_loss,
    method_sampler,
    mitigation_loss,
    resolved_image_term,
    resolved_sampler,
    zero_shot,
)
from ravl_engine.mitigate_prep import Target, prepare, read_target
from ravl_engine.models import LoadedModel, load_clip
from ravl_engine.outputs import check_not_input, check_out
from ravl_engine.selection import group_accuracy, pseudo_group_set
from ravl_engine.training import ClipWithRegions, LoopConfig, train_loop, write_checkpoint
from ravl_engine.zeroshot import DEFAULT_TEMPLATES, TEMPERATURE, class_text_embeddings

SELECT = ("pseudo-group", "accuracy", "worst-group", "last")
_GroupDRO = GroupDRO  # the former private names, for callers that still use them
_class_embeddings = class_embeddings


@dataclass(frozen=True, slots=True, kw_only=True)
class MitigateConfig:
    """Options of ``ravl-engine mitigate``.

    Attributes:
        train: captioned manifest of the fine-tuning images (CSV, JSONL or Parquet).
        discovery: discovery.json of the audited model (``ravl-engine cluster``).
        out: checkpoint file to write (loadable by ``embed --pretrained``).
        method: one of METHODS.
        sampler: "method" (default: the method's own, group-balanced for upsampled / vl-erm / vl-gdro, a plain
            shuffle for ravl and standard), "balanced" or "shuffle" (e.g. ravl's loss with the balanced sampler).
        model: architecture of the starting weights (default: the audited model's).
        pretrained: starting weights, a checkpoint file or open_clip tag; None = random init (the offline
            controlled experiments, where "pretrained" means from scratch).
        region_model: the audited checkpoint, when discovery.json's recorded path moved; must have the recorded
            sha256.
        clusters: ranks of the spurious clusters in discovery.json (1 = the top one).
        work_dir: run directory for the fine-tuning regions (default ``OUT.regions``); resumed, shared by methods.
        proposer: override the audit's proposer (e.g. when the audit used manifest boxes).
        clip_weight: lambda, the CLIP loss's share (0.8).
        image_term: "method" (default: "counterfactual" for ``ravl``, "none" for the other methods), "none" (the
            paper's RaVL: L_CL + L_R + L_A only), "masked" or "counterfactual" (an extension of the paper's loss;
            ``ravl``, and ``vl-erm`` / ``vl-gdro`` for ablations). With a term, L_M joins the method's class term,
            over pairs of an image with and without the discovered feature
            (:func:`ravl_engine.mitigate_methods.counterfactual_pairs`): "masked" pairs each labelled image that has
            a spurious region with its copy where those regions are set to the mean colour; "counterfactual" adds
            an image of another class with those pixels pasted in, paired with that image. The feature-free image
            must be classified as its caption's class, and the image with the feature as the feature-free one is
            (its class distribution, detached, is the target). The region terms alone train the region embeddings;
            this term reaches the image path (README, "Mitigation on controlled MNIST settings").
        temperature: tau of the region and zero-shot terms (0.07).
        reduction: "mean" over images (default) or "sum" (the paper's formula as written). At batch 128 the sum
            weighs the region terms about 100x against L_CL; measured on the controlled MNIST setting (README), it
            cost the image embedding its accuracy (image worst-group 0.0 vs 0.71 with the mean).
        distinct_labels: L_R counts each batch label once (default) or once per image.
        gdro_step: group DRO's exponentiated-gradient step (eta).
        epochs, batch_size, lr, weight_decay: AdamW schedule; ``lr`` None = 1e-3 from scratch, 5e-5 from weights.
        freeze_text: None = freeze the text tower when starting from weights (the paper), train both from scratch.
        val_fraction, patience: held-out share of the fine-tuning set and early stopping.
        select: which epoch's weights to keep. "pseudo-group" (default): the best worst pseudo-group zero-shot
            accuracy on the selection half of the audit set, ties broken by the mean pseudo-group accuracy
            (ravl_engine/selection.py; pseudo-groups from discovery.json, never from feature labels). "accuracy" /
            "worst-group": the best zero-shot accuracy / worst-group accuracy (ties: the group mean) on the
            held-out fine-tuning images (these come from the biased distribution, so they cannot see the shortcut).
            "last": the last epoch (the validation value is still reported).
        keep_start: the starting weights (epoch 0) may be the kept epoch (default). False = only fine-tuned epochs
            compete: where the start was trained on the same domain without the bias (the controlled benchmarks),
            every method would otherwise keep epoch 0 and the comparison would measure the start, not the method.
        freeze_bn: BatchNorm on the starting running statistics and affine weights in both the image and the
            region path (``LoopConfig.freeze_bn``); default off (the image path trains on batch statistics).
        audit_data: the labelled audit manifest (the one embedded for discovery) for "pseudo-group"; None = the
            one discovery.json records.
        split_seed: seed of the audit set's selection / test halves (hash of the image id).
        templates: class prompt templates (default: the audit's).
        seed, device: as everywhere.
        resize: how images fit the model input, "squash" or "pad" (letterbox); None (default) = the audit's, else
            squash.
        overwrite: replace an existing ``out`` (default: refuse). ``out`` may never be an input: the starting
            weights, the audited checkpoint, the manifest or discovery.json.
    """

    train: str
    discovery: str
    out: str
    method: str = "ravl"
    sampler: str = "method"
    model: str | None = None
    pretrained: str | None = None
    region_model: str | None = None
    clusters: tuple[int, ...] = (1,)
    work_dir: str | None = None
    proposer: str | None = None
    clip_weight: float = 0.8
    image_term: str = "method"
    temperature: float = TEMPERATURE
    reduction: str = "mean"
    distinct_labels: bool = True
    gdro_step: float = 0.01
    epochs: int = 6
    batch_size: int = 128
    lr: float | None = None
    weight_decay: float = 0.1
    freeze_text: bool | None = None
    val_fraction: float = 0.1
    patience: int = 6
    select: str = "pseudo-group"
    keep_start: bool = True
    freeze_bn: bool = False
    audit_data: str | None = None
    split_seed: int = 0
    templates: tuple[str, ...] | None = None
    seed: int = 0
    device: str = "cpu"
    resize: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.resize is not None:
            check_resize(self.resize)
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.image_term not in IMAGE_TERM_CHOICES:
            raise ConfigError(f"--image-term must be one of {', '.join(IMAGE_TERM_CHOICES)}, got {self.image_term!r}")
        if resolved_image_term(self.method, self.image_term) != "none" and self.method not in WITH_CLASSES:
            raise ConfigError(
                f"--image-term {self.image_term} needs a method with class embeddings ({', '.join(WITH_CLASSES)}), "
                f"not {self.method!r}"
            )
        if not 0 <= self.clip_weight <= 1:
            raise ConfigError(f"--clip-weight must be in [0, 1], got {self.clip_weight}")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature must be > 0, got {self.temperature}")
        if self.reduction not in ("sum", "mean"):
            raise ConfigError(f"--reduction must be 'sum' or 'mean', got {self.reduction!r}")
        if not self.clusters or any(r < 1 for r in self.clusters):
            raise ConfigError(f"--cluster ranks start at 1, got {list(self.clusters)}")
        if self.epochs < 1 or self.batch_size < 2 or self.patience < 1:
            raise ConfigError("need epochs >= 1, batch_size >= 2 and patience >= 1")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if not self.gdro_step > 0:
            raise ConfigError(f"--gdro-step must be > 0, got {self.gdro_step}")
        if self.select not in SELECT:
            raise ConfigError(f"--select must be one of {', '.join(SELECT)}, got {self.select!r}")
        if self.templates is not None and (not self.templates or any("{}" not in t for t in self.templates)):
            raise ConfigError("every prompt template needs one '{}' where the class name goes")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MitigateConfig:
        return config_from_dict(cls, data)


@dataclass(frozen=True)
class MitigateResult:
    """Summary of a mitigation run (also what the CLI prints)."""

    checkpoint: str
    method: str
    best_epoch: int
    best_val: float
    val_metric: str
    history: list[dict[str, float]]
    n_train: int
    n_val: int
    n_regions: int
    n_spurious_regions: int
    images_with_feature: int
    captions: dict[str, int]
    groups: list[dict[str, Any]]
    step_seconds: float
    seconds: dict[str, float]
    select: str = "pseudo-group"
    n_select: int = 0  # images the selection rule scores (audit selection half, or the held-out share)
    region_mode: str = "roi"  # how the training step embedded the regions (the audit's mode)
    sampler: str = "shuffle"  # the sampler the loop drew batches with: "balanced" or "shuffle"
    image_term: str = "none"  # the image term of the method's class loss: "none", "masked" or "counterfactual"
    start_val: float = float("nan")  # the selection value of the starting weights (epoch 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _audit_data(cfg: MitigateConfig, disc: Target) -> str:
    """The audit manifest of ``--select pseudo-group``: --audit-data, else the one discovery.json records."""
    path = cfg.audit_data or disc.audit.run_dir_data
    if not path or not Path(path).is_file():
        raise ConfigError(
            f"--select pseudo-group needs the audit images: {disc.path} records {path!r}, which is not there; pass "
            "--audit-data AUDIT.csv (the manifest embedded for the audit) or --select last"
        )
    return str(path)


def run_mitigate(cfg: MitigateConfig, *, on_epoch: Callable[[dict[str, float]], None] | None = None) -> MitigateResult:
    """Fine-tune with the chosen method through the one training loop and write the selected checkpoint atomically.

    Raises:
        ConfigError: bad options; an unreadable, outdated or empty discovery.json; a region model other than the
            audited one (sha256 or embedding dim); no fine-tuning region in the spurious cluster; no caption naming a
            class (except for ``standard``); no audit manifest for ``--select pseudo-group``.
    """
    t0 = time.perf_counter()
    cfg = dataclasses.replace(cfg, device=local_device(cfg.device))
    inputs = {"--pretrained": cfg.pretrained, "--region-model": cfg.region_model}
    check_not_input(cfg.out, {**inputs, "--train": cfg.train, "--discovery": cfg.discovery})
    check_out(cfg.out, overwrite=cfg.overwrite)
    disc = read_target(cfg.discovery, cfg.clusters)
    check_not_input(cfg.out, {"audited checkpoint": disc.audit.model.pretrained})
    audit_data = _audit_data(cfg, disc) if cfg.select == "pseudo-group" else None
    arch = cfg.model or disc.audit.model.name
    if not arch:
        raise ConfigError("pass --model: discovery.json names no architecture to start from")
    loaded: LoadedModel = load_clip(arch, cfg.pretrained, device=cfg.device, init_seed=cfg.seed)
    arch = loaded.name  # canonical: an hf: folder is recorded by its absolute path
    ts = prepare(cfg, disc, loaded.image_size, loaded.mean, loaded.std)
    resize = cfg.resize or disc.audit.resize
    audit = (
        pseudo_group_set(
            audit_data,
            disc.classes,
            disc.spurious_images,
            size=loaded.image_size,
            mean=loaded.mean,
            std=loaded.std,
            resize=resize,
            seed=cfg.split_seed,
        )
        if audit_data is not None
        else None
    )
    t_prep = time.perf_counter() - t0

    model, tokenizer = loaded.model, loaded.tokenizer
    c = len(disc.classes)
    templates = cfg.templates or disc.audit.templates or DEFAULT_TEMPLATES
    class_tokens = tokenizer([t.format(name) for name in disc.classes for t in templates]).to(cfg.device)
    caption_tokens = tokenizer(ts.captions)
    lr, freeze_text = schedule_defaults(loaded.weights, cfg.lr, cfg.freeze_text)
    val_idx, train_idx = holdout_split(ts.images.shape[0], cfg.val_fraction, cfg.seed, source=cfg.train)
    val_labelled = val_idx[ts.labels[val_idx] >= 0]

    @torch.no_grad()
    def validate() -> float | tuple[float, float]:
        model.eval()
        text = class_text_embeddings(model, tokenizer, disc.classes, templates)  # as finetune scores
        if audit is not None:
            ok = zero_shot(model, audit.images, text, cfg.device) == audit.labels
            return group_accuracy(ok, audit.groups, audit.n_groups)
        if val_labelled.numel() == 0:
            img = model.encode_image(ts.images[val_idx].to(cfg.device))
            txt = model.encode_text(caption_tokens[val_idx].to(cfg.device))
            return -float(clip_loss(img, txt, model.logit_scale.exp()))
        ok = zero_shot(model, ts.images[val_labelled], text, cfg.device) == ts.labels[val_labelled]
        if cfg.select != "worst-group":
            return float(ok.float().mean())
        return group_accuracy(ok, ts.groups[val_labelled], 2 * c + 2)

    tiebreak = None
    if audit is not None:
        metric, tiebreak = "pseudo_group_worst_accuracy", "pseudo_group_mean_accuracy"
    elif val_labelled.numel():
        metric = "worst_group_accuracy" if cfg.select == "worst-group" else "zero_shot_accuracy"
        tiebreak = "group_mean_accuracy" if cfg.select == "worst-group" else None
    else:
        metric = "neg_clip_loss"
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    optimizer = make_optimizer(model, lr=lr, weight_decay=cfg.weight_decay, freeze_text=freeze_text)
    frozen_text = class_embeddings(model, class_tokens, c).detach() if freeze_text else None

    def step_class_emb() -> torch.Tensor:
        return frozen_text if frozen_text is not None else class_embeddings(model, class_tokens, c)

    towers = wrap_ddp(ClipWithRegions(model, ts.region_mode), cfg.device)
    loss_fn = method_loss(
        model,
        ts,
        caption_tokens,
        cfg,
        n_classes=c,
        class_emb=step_class_emb if cfg.method in WITH_CLASSES else None,
        towers=towers,
        device=cfg.device,
    )
    loop = LoopConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        patience=cfg.patience,
        keep_last=cfg.select == "last",
        keep_start=cfg.keep_start,
        freeze_bn=cfg.freeze_bn,
        seed=cfg.seed,
        metric=metric,
        tiebreak=tiebreak,
    )
    result = train_loop(
        model,
        optimizer,
        train_idx,
        loss_fn,
        loop,
        sampler=method_sampler(cfg.method, ts.groups, cfg.sampler),
        validate=validate,
        on_epoch=on_epoch,
    )
    blob = {"arch": arch, "state_dict": result.best_state, "epoch": result.best_epoch, metric: result.best_val}
    write_checkpoint(out, {**blob, "method": cfg.method})
    group_rows = []
    for g in range(2 * c + 2):
        members = ts.groups[train_idx] == g
        if bool(members.any()):
            group_rows.append(
                {
                    "class": disc.classes[g // 2] if g < 2 * c else None,
                    "feature_present": bool(g % 2),
                    "n_images": int(members.sum()),
                }
            )
    return MitigateResult(
        checkpoint=str(out),
        method=cfg.method,
        best_epoch=result.best_epoch,
        best_val=result.best_val,
        val_metric=metric,
        history=result.history,
        n_train=int(train_idx.numel()),
        n_val=int(val_idx.numel()),
        n_regions=int(ts.boxes.shape[0]),
        n_spurious_regions=int(ts.spurious.sum()),
        images_with_feature=int(ts.present.sum()),
        captions=ts.caption_counts,
        groups=group_rows,
        step_seconds=result.step_seconds,
        seconds={"prepare": t_prep, "train": time.perf_counter() - t0 - t_prep, "total": time.perf_counter() - t0},
        select=cfg.select,
        n_select=int(audit.labels.numel()) if audit is not None else int(val_labelled.numel()),
        region_mode=ts.region_mode,
        sampler=resolved_sampler(cfg.method, cfg.sampler),
        image_term=resolved_image_term(cfg.method, cfg.image_term),
        start_val=float(result.extra["start_val"]),
    )
