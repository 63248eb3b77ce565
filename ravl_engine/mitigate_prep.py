"""Mitigation's preparation: read discovery.json, then embed the fine-tuning regions with the audited model.

The fine-tuning images are proposed and embedded with the audited model (the one discovery.json was computed from,
same proposer and region mode) into a resumable run directory; every region goes to its nearest discovery medoid,
and the regions of the chosen spurious cluster(s) are marked. Each caption is parsed for a class name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ravl_engine.captions import caption_classes
from ravl_engine.errors import ConfigError, ShardError
from ravl_engine.finetune import load_images
from ravl_engine.images import boxes_to_input
from ravl_engine.manifest import ManifestRow, read_manifest
from ravl_engine.shards import read_run, sha256_file
from ravl_engine.zeroshot import DEFAULT_TEMPLATES

if TYPE_CHECKING:
    from ravl_engine.mitigate import MitigateConfig


@dataclass(frozen=True)
class Discovery:
    """What mitigation reads from discovery.json (a later ``documents.Discovery`` replaces it)."""

    classes: list[str]
    medoids: Tensor  # [K, D] float32, unit rows
    spurious_ids: list[int]
    audit: dict[str, Any]
    path: str
    spurious_images: frozenset[str]  # the audit images with a region in the chosen cluster(s)


def read_discovery(path: str | Path, ranks: Sequence[int]) -> Discovery:
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
    images = frozenset(str(r["image"]) for rank in ranks for r in by_rank[rank].get("regions") or [])
    return Discovery(
        classes=list(doc["classes"]),
        medoids=medoids,
        spurious_ids=ids,
        audit=dict(doc["audit"]),
        path=str(path),
        spurious_images=images,
    )


def audited_model(disc: Discovery, override: str | None) -> tuple[str, str | None]:
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


@dataclass(frozen=True)
class TrainSet:
    """The prepared fine-tuning set: images, parsed captions, regions and their spurious flags, groups."""

    images: Tensor  # [N, 3, S, S] normalised
    captions: list[str]
    labels: Tensor  # [N] int64, -1 = no class in the caption
    boxes: Tensor  # [R, 4] tower pixels
    offsets: Tensor  # [N + 1]
    spurious: Tensor  # [R] bool
    present: Tensor  # [N] bool: a region in the spurious cluster
    groups: Tensor  # [N] int64: 2 * class + present, 2 * C + present for no class
    caption_counts: dict[str, int]
    region_mode: str  # the mode the regions were embedded in (the audit's); training embeds them the same way


def embed_regions(
    cfg: MitigateConfig,
    disc: Discovery,
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


def prepare(cfg: MitigateConfig, disc: Discovery, size: int, mean: Sequence[float], std: Sequence[float]) -> TrainSet:
    """Propose + embed the fine-tuning regions with the audited model, assign them to the medoids, parse captions."""

    rows = read_manifest(cfg.train)
    missing = [i for i, r in enumerate(rows) if r.caption is None]
    if missing:
        raise ConfigError(f"{cfg.train}: row {missing[0] + 1} has no caption; mitigation needs a 'caption' column")
    name, path = audited_model(disc, cfg.region_model)
    work_dir = cfg.work_dir or cfg.out + ".regions"
    resize = cfg.resize or disc.audit.get("resize") or "squash"
    embed_regions(cfg, disc, rows, work_dir, name, path, resize)
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
    return TrainSet(
        images=images,
        captions=captions,
        labels=lab,
        boxes=boxes,
        offsets=torch.from_numpy(data.offsets.astype(np.int64)),
        spurious=spurious,
        present=present,
        groups=groups,
        caption_counts=caption_counts,
        region_mode=str(run.manifest.get("region_mode") or "roi"),
    )
