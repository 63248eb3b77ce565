"""Stage ``mitigate``: fine-tune with RaVL's region-aware loss, or with one of the paper's baselines.

Preparation (../shared/docs/RAVL_METHOD.md, "Stage 2"): the fine-tuning images are proposed and embedded with the
audited model (the one discovery.json was computed from, same proposer and region mode) into a resumable run
directory; every region goes to its nearest discovery medoid, and the regions of the chosen spurious cluster(s)
are marked. Each caption is parsed for a class name. Training then runs one of five methods from the same
starting weights:

- ``ravl``: lambda L_CL + (1 - lambda) (L_R + L_A), regions embedded from the same backbone pass as the image;
- ``standard``: L_CL;
- ``upsampled``: L_CL with a group-balanced sampler;
- ``vl-erm``: lambda L_CL + (1 - lambda) cross-entropy of the zero-shot logits, group-balanced sampler;
- ``vl-gdro``: lambda L_CL + (1 - lambda) group DRO over the zero-shot cross-entropy, group-balanced sampler.

Groups are class x feature present (an image has a region in the spurious cluster); images whose caption names
no class form one more group per feature flag and only get the CLIP loss.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ravl_engine.config import config_from_dict
from ravl_engine.distributed import (
    barrier,
    gather,
    gather_with_grad,
    is_distributed,
    local_device,
    local_share,
    rank_world,
    sync_buffers,
    wrap_ddp,
)
from ravl_engine.errors import ConfigError, ShardError
from ravl_engine.finetune import (
    Towers,
    holdout_split,
    load_images,
    make_optimizer,
    optimizer_step,
    save_checkpoint,
    schedule_defaults,
    snapshot,
)
from ravl_engine.images import boxes_to_input, check_resize
from ravl_engine.kernels.loss import clip_loss, pad_regions, region_aware_loss
from ravl_engine.manifest import ManifestRow, read_manifest
from ravl_engine.models import LoadedModel, load_clip
from ravl_engine.outputs import check_not_input, check_out
from ravl_engine.shards import read_run, sha256_file
from ravl_engine.zeroshot import DEFAULT_TEMPLATES, TEMPERATURE

logger = logging.getLogger(__name__)

METHODS = ("ravl", "standard", "upsampled", "vl-erm", "vl-gdro")
BALANCED = ("upsampled", "vl-erm", "vl-gdro")
SELECT = ("accuracy", "worst-group", "last")


@dataclass(frozen=True, slots=True, kw_only=True)
class MitigateConfig:
    """Options of ``ravl-engine mitigate``.

    Attributes:
        train: captioned manifest of the fine-tuning images (CSV, JSONL or Parquet).
        discovery: discovery.json of the audited model (``ravl-engine cluster``).
        out: checkpoint file to write (loadable by ``embed --pretrained``).
        method: one of METHODS.
        model: architecture of the starting weights (default: the audited model's).
        pretrained: starting weights, a checkpoint file or open_clip tag; None = random init (the offline
            controlled experiments, where "pretrained" means from scratch).
        region_model: the audited checkpoint, when discovery.json's recorded path moved; must have the recorded
            sha256.
        clusters: ranks of the spurious clusters in discovery.json (1 = the top one).
        work_dir: run directory for the fine-tuning regions (default ``OUT.regions``); resumed, shared by methods.
        proposer: override the audit's proposer (e.g. when the audit used manifest boxes).
        clip_weight: lambda, the CLIP loss's share (0.8).
        temperature: tau of the region and zero-shot terms (0.07).
        reduction: "mean" over images (default) or "sum" (the paper's formula as written). At batch 128 the sum
            weighs the region terms about 100x against L_CL; measured on the controlled MNIST setting (README), it
            cost the image embedding its accuracy (image worst-group 0.0 vs 0.71 with the mean).
        distinct_labels: L_R counts each batch label once (default) or once per image.
        gdro_step: group DRO's exponentiated-gradient step (eta).
        epochs, batch_size, lr, weight_decay: AdamW schedule; ``lr`` None = 1e-3 from scratch, 5e-5 from weights.
        freeze_text: None = freeze the text tower when starting from weights (the paper), train both from scratch.
        val_fraction, patience: held-out share and early stopping.
        select: keep the epoch with the best validation zero-shot "accuracy" or "worst-group" accuracy (groups
            from the discovery, on the held-out images), or the "last" epoch (a fixed schedule; validation accuracy
            is still reported). The held-out images come from the fine-tuning distribution, where the feature
            predicts the class, so "accuracy" tends to favour an epoch before the model leans on it.
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
    model: str | None = None
    pretrained: str | None = None
    region_model: str | None = None
    clusters: tuple[int, ...] = (1,)
    work_dir: str | None = None
    proposer: str | None = None
    clip_weight: float = 0.8
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
    select: str = "accuracy"
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------ captions


def caption_classes(captions: Sequence[str], classes: Sequence[str]) -> tuple[np.ndarray, dict[str, int]]:
    """The class each caption names, by whole-word match of the class names (case-insensitive, plural s/es).

    A longer name wins over a shorter one it contains ("sea lion" over "sea"). A caption naming two different
    classes is ambiguous and, like one naming none, gets -1 (CLIP loss only).

    Returns:
        ([N] int64 class index or -1, counts ``matched`` / ``none`` / ``ambiguous``).
    """
    order = sorted(range(len(classes)), key=lambda c: -len(classes[c]))
    patterns = [
        (c, re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, classes[c].split())) + r"(?:e?s)?(?!\w)", re.I))
        for c in order
        if classes[c].strip()
    ]
    out = np.full(len(captions), -1, dtype=np.int64)
    counts = {"matched": 0, "none": 0, "ambiguous": 0}
    for i, text in enumerate(captions):
        taken: list[tuple[int, int]] = []
        found: set[int] = set()
        for c, pattern in patterns:
            for m in pattern.finditer(text):
                if all(m.end() <= a or m.start() >= b for a, b in taken):
                    taken.append(m.span())
                    found.add(c)
        if len(found) == 1:
            out[i] = found.pop()
            counts["matched"] += 1
        else:
            counts["none" if not found else "ambiguous"] += 1
    return out, counts


# ------------------------------------------------------------------------------------------------ discovery.json


@dataclass(frozen=True)
class _Discovery:
    classes: list[str]
    medoids: Tensor  # [K, D] float32, unit rows
    spurious_ids: list[int]
    audit: dict[str, Any]
    path: str


def read_discovery(path: str | Path, ranks: Sequence[int]) -> _Discovery:
    """Load and check discovery.json; pick the cluster ids of the given ranks.

    Raises:
        ConfigError: unreadable, from an older ravl-engine (no medoids), no spurious cluster, a rank beyond the
            clusters found, or medoids that are not finite unit vectors.
    """
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not a readable discovery.json ({err})") from err
    if not isinstance(doc, dict) or "clusters" not in doc or "classes" not in doc:
        raise ConfigError(
            f"{path} is not a discovery.json; pass the file 'ravl-engine cluster' wrote (OUT/discovery.json)"
        )
    if "medoids" not in doc or "audit" not in doc:
        raise ConfigError(f"{path}: no medoids / audit record; it was written by an older ravl-engine, rerun cluster")
    clusters = doc.get("clusters") or []
    if not clusters:
        raise ConfigError(
            f"{path}: discovery found no spurious cluster, so there is nothing to mitigate; use --method standard "
            "with ravl-engine finetune, or audit a larger validation set"
        )
    if max(ranks) > len(clusters):
        raise ConfigError(f"{path} has {len(clusters)} spurious cluster(s); --cluster {max(ranks)} does not exist")
    medoids = torch.tensor(doc["medoids"], dtype=torch.float32)
    if medoids.ndim != 2 or medoids.shape[0] != doc.get("k") or not torch.isfinite(medoids).all():
        raise ConfigError(f"{path}: medoids must be a finite [k, D] list; the file is damaged, rerun cluster")
    if (medoids.norm(dim=1) - 1).abs().max() > 1e-3:
        raise ConfigError(f"{path}: medoids are not unit vectors; the file is damaged, rerun cluster")
    by_rank = {c["rank"]: c for c in clusters}
    ids = [int(by_rank[r]["cluster_id"]) for r in ranks]
    if any(not 0 <= i < medoids.shape[0] for i in ids):
        raise ConfigError(f"{path}: cluster ids {ids} outside 0..{medoids.shape[0] - 1}; the file is damaged")
    return _Discovery(
        classes=list(doc["classes"]), medoids=medoids, spurious_ids=ids, audit=dict(doc["audit"]), path=str(path)
    )


def _audited_model(disc: _Discovery, override: str | None) -> tuple[str, str | None]:
    """(architecture, checkpoint) of the audited model, checked against discovery.json's sha256."""
    model = disc.audit.get("model") or {}
    name, recorded, sha = model.get("name"), model.get("pretrained"), model.get("checkpoint_sha256")
    if not name:
        raise ConfigError(f"{disc.path}: the audit record names no model; rerun cluster with this ravl-engine")
    path = override if override is not None else recorded
    if sha is not None:
        if path is None or not Path(path).is_file():
            raise ConfigError(
                f"{disc.path} was computed with checkpoint {recorded}, which is not there; pass --region-model PATH"
            )
        if sha256_file(path) != sha:
            raise ConfigError(
                f"{path} is not the model {disc.path} was computed with (sha256 differs from {sha[:12]}...); pass "
                "the audited checkpoint as --region-model, or rerun embed + cluster with this model"
            )
    elif override is not None and override != recorded:
        raise ConfigError(f"{disc.path} was computed with {name} / {recorded!r}, not {override!r}")
    return name, path


# ------------------------------------------------------------------------------------------------ preparation


@dataclass
class _TrainSet:
    images: Tensor  # [N, 3, S, S] normalised
    captions: list[str]
    labels: Tensor  # [N] int64, -1 = no class in the caption
    boxes: Tensor  # [R, 4] tower pixels
    offsets: Tensor  # [N + 1]
    spurious: Tensor  # [R] bool
    present: Tensor  # [N] bool: a region in the spurious cluster
    groups: Tensor  # [N] int64: 2 * class + present, 2 * C + present for no class
    caption_counts: dict[str, int]


def _embed_regions(
    cfg: MitigateConfig,
    disc: _Discovery,
    rows: Sequence[ManifestRow],
    work_dir: str,
    name: str,
    path: str | None,
    resize: str,
) -> None:
    """Propose and embed the fine-tuning images with the audited model, as the audit did (resumable run dir)."""
    from ravl_engine.embed import EmbedConfig, run_embed  # noqa: PLC0415

    audit = disc.audit
    proposer = audit.get("proposer") or {}
    proposer_name = cfg.proposer or proposer.get("name") or "quadrants"
    same = proposer_name == proposer.get("name")
    embed_cfg = EmbedConfig(
        data=cfg.train,
        out=work_dir,
        model=name,
        pretrained=path,
        proposer=proposer_name,
        proposer_options=dict(proposer.get("options") or {}) if same else {},
        max_boxes=proposer.get("max_boxes"),
        min_box_size=proposer.get("min_box_size", 1.0),
        score_threshold=proposer.get("score_threshold"),
        whole_image=bool(proposer.get("whole_image", False)),
        region_mode=audit.get("region_mode") or "auto",
        resize=resize,
        classes=tuple(disc.classes),
        templates=tuple(audit.get("templates") or DEFAULT_TEMPLATES),
        device=cfg.device,
    )
    if proposer_name == "manifest" and any(r.boxes is None for r in rows):
        raise ConfigError(
            f"the audit used the manifest's boxes but {cfg.train} has rows without a 'boxes' value; add them or pass "
            "--proposer quadrants (or another proposer)"
        )
    try:
        run_embed(embed_cfg)
    except ShardError as err:
        raise ConfigError(f"{err} (for mitigate: pass another --work-dir)") from err


def _prepare(
    cfg: MitigateConfig, disc: _Discovery, size: int, mean: Sequence[float], std: Sequence[float]
) -> _TrainSet:
    """Propose + embed the fine-tuning regions with the audited model, assign them to the medoids, parse captions."""

    rows = read_manifest(cfg.train)
    missing = [i for i, r in enumerate(rows) if r.caption is None]
    if missing:
        raise ConfigError(f"{cfg.train}: row {missing[0] + 1} has no caption; mitigation needs a 'caption' column")
    name, path = _audited_model(disc, cfg.region_model)
    work_dir = cfg.work_dir or cfg.out + ".regions"
    resize = cfg.resize or disc.audit.get("resize") or "squash"
    _embed_regions(cfg, disc, rows, work_dir, name, path, resize)
    run = read_run(work_dir)
    data = run.data
    if data.region_emb.shape[1] != disc.medoids.shape[1]:
        raise ConfigError(
            f"{disc.path} has {disc.medoids.shape[1]}-dim medoids but {name} embeds in {data.region_emb.shape[1]} "
            "dims: the discovery comes from another model"
        )
    assign = (torch.from_numpy(data.region_emb) @ disc.medoids.T).argmax(dim=1)
    spurious = torch.isin(assign, torch.tensor(disc.spurious_ids))
    if not bool(spurious.any()) and cfg.method != "standard":
        raise ConfigError(
            f"no region of {cfg.train} falls in spurious cluster(s) {list(cfg.clusters)} of {disc.path}: the feature "
            "does not occur in the fine-tuning set; choose another --cluster or fine-tune with --method standard"
        )
    by_image = {r.image: r for r in rows}
    kept = [by_image[i] for i in data.ids]
    captions = [r.caption or "" for r in kept]
    labels, caption_counts = caption_classes(captions, disc.classes)
    if caption_counts["matched"] == 0 and cfg.method != "standard":
        raise ConfigError(
            f"no caption of {cfg.train} names a class of {disc.path} ({', '.join(disc.classes)}); method "
            f"{cfg.method!r} needs class mentions (or use --method standard)"
        )
    paths = [r.path for r in kept]
    images, placements = load_images(paths, size=size, mean=mean, std=std, resize=resize)
    counts = torch.from_numpy(data.num_regions.astype(np.int64))
    owner = torch.repeat_interleave(torch.arange(len(kept)), counts)
    boxes = boxes_to_input(torch.from_numpy(data.boxes), placements[owner])  # stored in original pixels
    present = torch.zeros(len(kept), dtype=torch.bool).index_put_((owner[spurious],), torch.tensor(True))
    lab = torch.from_numpy(labels)
    c = len(disc.classes)
    groups = torch.where(lab >= 0, 2 * lab, 2 * c) + present.long()
    return _TrainSet(
        images=images,
        captions=captions,
        labels=lab,
        boxes=boxes,
        offsets=torch.from_numpy(data.offsets.astype(np.int64)),
        spurious=spurious,
        present=present,
        groups=groups,
        caption_counts=caption_counts,
    )


# ------------------------------------------------------------------------------------------------ training


def _class_embeddings(model: Any, tokens: Tensor, n_classes: int) -> Tensor:
    """Class embeddings g(y) inside the graph: template embeddings normalised, averaged, renormalised. [C, D]."""
    emb = F.normalize(model.encode_text(tokens).float(), dim=-1)
    return F.normalize(emb.view(n_classes, -1, emb.shape[-1]).mean(dim=1), dim=-1)


class _GroupDRO:
    """Group DRO (Sagawa et al. 2020): weights q over groups, q_g <- q_g exp(eta loss_g), loss = sum q_g loss_g."""

    def __init__(self, n_groups: int, step: float) -> None:
        self.q = torch.full((n_groups,), 1.0 / n_groups)
        self.step = step

    def __call__(self, losses: Tensor, groups: Tensor) -> Tensor:
        n = self.q.shape[0]
        total = torch.zeros(n, dtype=losses.dtype, device=losses.device).index_add(0, groups, losses)
        count = torch.bincount(groups, minlength=n).to(losses.dtype)
        mean = total / count.clamp(min=1)
        seen = (count > 0).cpu()
        q = self.q * torch.exp(self.step * mean.detach().cpu() * seen)
        self.q = q / q.sum()
        return (self.q.to(losses.device, losses.dtype) * mean).sum()


def _batch_boxes(ts: _TrainSet, idx: Tensor) -> tuple[list[Tensor], Tensor]:
    """Per-image box tensors of a batch and the matching [R_b] spurious flags."""
    starts, stops = ts.offsets[idx].tolist(), ts.offsets[idx + 1].tolist()
    boxes = [ts.boxes[a:b] for a, b in zip(starts, stops, strict=True)]
    flags = torch.cat([ts.spurious[a:b] for a, b in zip(starts, stops, strict=True)])
    return boxes, flags


def _epoch_order(ts: _TrainSet, train_idx: Tensor, balanced: bool, generator: torch.Generator) -> Tensor:
    if not balanced:
        return train_idx[torch.randperm(train_idx.numel(), generator=generator)]
    g = ts.groups[train_idx]
    weight = 1.0 / torch.bincount(g).double()[g]
    return train_idx[torch.multinomial(weight, train_idx.numel(), replacement=True, generator=generator)]


def _zero_shot(model: Any, images: Tensor, text: Tensor, device: str, batch: int = 256) -> Tensor:
    preds = []
    for start in range(0, images.shape[0], batch):
        emb = F.normalize(model.encode_image(images[start : start + batch].to(device)).float(), dim=-1)
        preds.append((emb @ text.to(device).T).argmax(1).cpu())
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


@dataclass(frozen=True)
class StepBatch:
    """One training batch.

    Attributes:
        images: [B, 3, S, S] normalised images.
        tokens: [B, L] caption tokens.
        labels: [B] int64 class named by each caption, -1 = none.
        groups: [B] int64 group (2 * class + feature present; 2 * C + present without a class).
        boxes: (ravl) B tensors [K_i, 4], xyxy, tower input pixels.
        spurious: (ravl) [sum K_i] bool, regions in the spurious cluster.
    """

    images: Tensor
    tokens: Tensor
    labels: Tensor
    groups: Tensor
    boxes: list[Tensor] | None = None
    spurious: Tensor | None = None

    def to(self, device: str | torch.device) -> StepBatch:
        return StepBatch(
            images=self.images.to(device),
            tokens=self.tokens.to(device),
            labels=self.labels.to(device),
            groups=self.groups.to(device),
            boxes=[b.to(device) for b in self.boxes] if self.boxes is not None else None,
            spurious=self.spurious.to(device) if self.spurious is not None else None,
        )


def mitigation_loss(
    model: Any,
    batch: StepBatch,
    class_emb: Tensor | None,
    cfg: MitigateConfig,
    *,
    gdro: _GroupDRO | None = None,
    towers: nn.Module | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The training loss of ``cfg.method`` for one batch: (total, L_CL, auxiliary term).

    ``ravl`` embeds the image and all its regions in one backbone pass and adds L_R + L_A; ``vl-erm`` / ``vl-gdro``
    add the (group-robust) cross-entropy of the zero-shot logits of the images whose caption names a class.
    ``class_emb`` [C, D] (unit rows) is needed by those three methods.

    Under torch.distributed each rank passes its equal share of the global batch and ``towers`` (a
    DistributedDataParallel-wrapped :class:`Towers`); the embeddings are gathered with their gradients and every
    rank computes the loss of the whole global batch, so the averaged gradients equal one process's on that batch.
    """
    towers = towers if towers is not None else Towers(model)
    if cfg.method == "ravl" and (batch.boxes is None or batch.spurious is None):
        raise ValueError("method 'ravl' needs boxes and spurious flags")
    if cfg.method in ("ravl", "vl-erm", "vl-gdro") and class_emb is None:
        raise ValueError(f"method {cfg.method!r} needs class embeddings")
    image_emb, region_emb, text_emb = towers(batch.images, batch.tokens, batch.boxes if cfg.method == "ravl" else None)
    labels, groups = gather(batch.labels), gather(batch.groups)
    image_emb = gather_with_grad(image_emb)
    loss_cl = clip_loss(image_emb, gather_with_grad(text_emb), model.logit_scale.exp())
    aux = loss_cl.new_zeros(())
    if cfg.method in ("standard", "upsampled"):
        return loss_cl, loss_cl, aux
    assert class_emb is not None
    if region_emb is not None and batch.boxes is not None and batch.spurious is not None:
        counts = torch.tensor([b.shape[0] for b in batch.boxes], device=region_emb.device)
        width = int(counts.max()) if counts.numel() else 0
        if is_distributed():  # the same padded width on every rank, so the gathered shapes agree
            import torch.distributed as dist  # noqa: PLC0415

            w = torch.tensor([width], device=region_emb.device)
            dist.all_reduce(w, op=dist.ReduceOp.MAX)
            width = int(w)
        padded, mask = pad_regions(region_emb.float(), counts, width=width)
        spurious, _ = pad_regions(batch.spurious, counts, fill=False, width=width)
        l_r, l_a = region_aware_loss(
            gather_with_grad(padded),
            gather(mask),
            gather(spurious),
            labels,
            class_emb,
            temperature=cfg.temperature,
            reduction=cfg.reduction,
            distinct_labels=cfg.distinct_labels,
        )
        aux = l_r + l_a
    else:
        has = labels >= 0
        if bool(has.any()):
            logits = F.normalize(image_emb[has].float(), dim=-1) @ class_emb.T / cfg.temperature
            ce = F.cross_entropy(logits, labels[has], reduction="none")
            aux = ce.mean() if gdro is None else gdro(ce, groups[has])
    lam = cfg.clip_weight
    return lam * loss_cl + (1 - lam) * aux, loss_cl, aux


def run_mitigate(cfg: MitigateConfig, *, on_epoch: Callable[[dict[str, float]], None] | None = None) -> MitigateResult:
    """Fine-tune with the chosen method and write the best checkpoint atomically.

    Raises:
        ConfigError: bad options; an unreadable, outdated or empty discovery.json; a region model other than the
            audited one (sha256 or embedding dim); no fine-tuning region in the spurious cluster; no caption naming a
            class (except for ``standard``).
    """
    t0 = time.perf_counter()
    rank, world = rank_world()
    cfg = dataclasses.replace(cfg, device=local_device(cfg.device))
    inputs = {"--pretrained": cfg.pretrained, "--region-model": cfg.region_model}
    check_not_input(cfg.out, {**inputs, "--train": cfg.train, "--discovery": cfg.discovery})
    check_out(cfg.out, overwrite=cfg.overwrite)
    disc = read_discovery(cfg.discovery, cfg.clusters)
    check_not_input(cfg.out, {"audited checkpoint": (disc.audit.get("model") or {}).get("pretrained")})
    arch = cfg.model or (disc.audit.get("model") or {}).get("name")
    if not arch:
        raise ConfigError("pass --model: discovery.json names no architecture to start from")
    loaded: LoadedModel = load_clip(arch, cfg.pretrained, device=cfg.device, init_seed=cfg.seed)
    arch = loaded.name  # canonical: an hf: folder is recorded by its absolute path
    ts = _prepare(cfg, disc, loaded.image_size, loaded.mean, loaded.std)
    t_prep = time.perf_counter() - t0

    model, tokenizer = loaded.model, loaded.tokenizer
    c = len(disc.classes)
    templates = cfg.templates or tuple(disc.audit.get("templates") or DEFAULT_TEMPLATES)
    class_tokens = tokenizer([t.format(name) for name in disc.classes for t in templates]).to(cfg.device)
    caption_tokens = tokenizer(ts.captions)
    lr, freeze_text = schedule_defaults(loaded.weights, cfg.lr, cfg.freeze_text)
    val_idx, train_idx = holdout_split(ts.images.shape[0], cfg.val_fraction, cfg.seed, source=cfg.train)
    n_val = int(val_idx.numel())
    val_labelled = val_idx[ts.labels[val_idx] >= 0]

    @torch.no_grad()
    def validate() -> float:
        model.eval()
        text = _class_embeddings(model, class_tokens, c)
        if val_labelled.numel() == 0:
            img = model.encode_image(ts.images[val_idx].to(cfg.device))
            txt = model.encode_text(caption_tokens[val_idx].to(cfg.device))
            return -float(clip_loss(img, txt, model.logit_scale.exp()))
        ok = (_zero_shot(model, ts.images[val_labelled], text, cfg.device) == ts.labels[val_labelled]).float()
        if cfg.select != "worst-group":
            return float(ok.mean())
        g = ts.groups[val_labelled]
        per = torch.zeros(2 * c + 2).index_add(0, g, ok) / torch.bincount(g, minlength=2 * c + 2).clamp(min=1)
        return float(per[torch.bincount(g, minlength=2 * c + 2) > 0].min())

    metric = (
        ("worst_group_accuracy" if cfg.select == "worst-group" else "zero_shot_accuracy")
        if val_labelled.numel()
        else "neg_clip_loss"
    )
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    best = (validate(), 0)
    best_state = snapshot(model)
    optimizer = make_optimizer(model, lr=lr, weight_decay=cfg.weight_decay, freeze_text=freeze_text)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    gdro = _GroupDRO(2 * c + 2, cfg.gdro_step) if cfg.method == "vl-gdro" else None
    frozen_text = _class_embeddings(model, class_tokens, c).detach() if freeze_text else None
    towers = wrap_ddp(Towers(model), cfg.device)
    history: list[dict[str, float]] = []
    stale, steps, step_time = 0, 0, 0.0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        epoch_order = _epoch_order(ts, train_idx, cfg.method in BALANCED, generator)
        sums: dict[str, float] = {"loss": 0.0, "clip": 0.0, "aux": 0.0}
        batches = 0
        for start in range(0, epoch_order.numel(), cfg.batch_size):
            idx = epoch_order[start : start + cfg.batch_size]
            # every rank draws the same global order and takes its equal, contiguous share of each batch
            idx = local_share(idx)
            if idx.numel() * world < 2:
                continue
            t_step = time.perf_counter()
            boxes, flags = _batch_boxes(ts, idx) if cfg.method == "ravl" else (None, None)
            batch = StepBatch(
                images=ts.images[idx],
                tokens=caption_tokens[idx],
                labels=ts.labels[idx],
                groups=ts.groups[idx],
                boxes=boxes,
                spurious=flags,
            )
            class_emb = None
            if cfg.method in ("ravl", "vl-erm", "vl-gdro"):
                class_emb = frozen_text if frozen_text is not None else _class_embeddings(model, class_tokens, c)
            loss, loss_cl, aux = mitigation_loss(model, batch.to(cfg.device), class_emb, cfg, gdro=gdro, towers=towers)
            optimizer_step(model, optimizer, loss)
            step_time += time.perf_counter() - t_step
            steps += 1
            sums["loss"] += loss.item()
            sums["clip"] += loss_cl.item()
            sums["aux"] += aux.item()
            batches += 1
        sync_buffers(model)  # BatchNorm statistics: rank 0's everywhere, so every rank validates the same model
        value = validate()
        entry = {"epoch": float(epoch), **{k: v / max(1, batches) for k, v in sums.items()}, metric: value}
        history.append(entry)
        logger.info("epoch %d: %s", epoch, entry)
        if on_epoch is not None:
            on_epoch(entry)
        if value > best[0] or cfg.select == "last":
            best, stale = (value, epoch), 0
            best_state = snapshot(model)
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    model.eval()
    # written once, at the end: an interrupted run leaves no checkpoint that looks finished
    if rank == 0:
        save_checkpoint(
            out, {"arch": arch, "state_dict": best_state, "epoch": best[1], metric: best[0], "method": cfg.method}
        )
    barrier()
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
        best_epoch=best[1],
        best_val=best[0],
        val_metric=metric,
        history=history,
        n_train=int(train_idx.numel()),
        n_val=n_val,
        n_regions=int(ts.boxes.shape[0]),
        n_spurious_regions=int(ts.spurious.sum()),
        images_with_feature=int(ts.present.sum()),
        captions=ts.caption_counts,
        groups=group_rows,
        step_seconds=step_time / max(1, steps),
        seconds={"prepare": t_prep, "train": time.perf_counter() - t0 - t_prep, "total": time.perf_counter() - t0},
    )
