"""Mitigation's preparation: read discovery.json, then embed the fine-tuning regions with the audited model.

The fine-tuning images are proposed and embedded with the audited model (the one discovery.json was computed from,
same proposer and region mode) into a resumable run directory; every region goes to its nearest discovery medoid,
and the regions of the chosen spurious cluster(s) are marked. Each caption is parsed for a class name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ravl_engine.captions import caption_classes
from ravl_engine.documents import Audit, Discovery, read_discovery
from ravl_engine.errors import ConfigError, ShardError
from ravl_engine.finetune import load_images
from ravl_engine.images import boxes_to_input
from ravl_engine.manifest import ManifestRow, read_manifest
from ravl_engine.shards import read_run, sha256_file
from ravl_engine.zeroshot import DEFAULT_TEMPLATES

if TYPE_CHECKING:
    from ravl_engine.mitigate import MitigateConfig


@dataclass(frozen=True)
class Target:
    """What mitigation takes from a discovery: the chosen spurious clusters, every medoid, the audit record."""

    discovery: Discovery
    medoids: Tensor  # [K, D] float32, unit rows, by cluster id
    spurious_ids: list[int]  # cluster ids of the chosen ranks
    path: str
    spurious_images: frozenset[str]  # the audit images with a region in the chosen cluster(s)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.discovery.classes

    @property
    def audit(self) -> Audit:
        return self.discovery.audit


def read_target(path: str | Path, ranks: Sequence[int]) -> Target:
    """Read discovery.json (:func:`ravl_engine.documents.read_discovery`) and pick the clusters of ``ranks``.

    Raises:
        ConfigError: not a discovery.json of this format (one line, from documents), no spurious cluster, a rank
            beyond the clusters found, or medoids that are not finite unit vectors.
    """
    disc = read_discovery(path)
    if not disc.clusters:
        raise ConfigError(
            f"{path}: discovery found no spurious cluster, so there is nothing to mitigate; use --method standard "
            "with ravl-engine finetune, or audit a larger validation set"
        )
    if max(ranks) > len(disc.clusters):
        raise ConfigError(f"{path} has {len(disc.clusters)} spurious cluster(s); --cluster {max(ranks)} does not exist")
    try:
        medoids = torch.from_numpy(disc.medoid_array())
    except ValueError as err:
        raise ConfigError(f"{path}: medoids must be a [k, D] list ({err}); the file is damaged, rerun cluster") from err
    if medoids.shape[0] != disc.k or not torch.isfinite(medoids).all():
        raise ConfigError(f"{path}: medoids must be a finite [k, D] list; the file is damaged, rerun cluster")
    if (medoids.norm(dim=1) - 1).abs().max() > 1e-3:
        raise ConfigError(f"{path}: medoids are not unit vectors; the file is damaged, rerun cluster")
    chosen = [disc.by_rank(r) for r in ranks]
    ids = [c.cluster_id for c in chosen]
    if any(not 0 <= i < medoids.shape[0] for i in ids):
        raise ConfigError(f"{path}: cluster ids {ids} outside 0..{medoids.shape[0] - 1}; the file is damaged")
    images = frozenset(r.image for c in chosen for r in c.regions)
    return Target(discovery=disc, medoids=medoids, spurious_ids=ids, path=str(path), spurious_images=images)


def audited_model(disc: Target, override: str | None) -> tuple[str, str | None]:
    """(architecture, checkpoint) of the audited model, checked against discovery.json's sha256."""
    model = disc.audit.model
    name, recorded, sha = model.name, model.pretrained, model.checkpoint_sha256
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
    disc: Target,
    rows: Sequence[ManifestRow],
    work_dir: str,
    name: str,
    path: str | None,
    resize: str,
) -> None:
    """Propose and embed the fine-tuning images with the audited model, as the audit did (resumable run dir)."""
    from ravl_engine.embed import EmbedConfig, run_embed  # noqa: PLC0415

    audit = disc.audit
    proposer = audit.proposer
    proposer_name = cfg.proposer or proposer.name
    same = proposer_name == proposer.name
    embed_cfg = EmbedConfig(
        data=cfg.train,
        out=work_dir,
        model=name,
        pretrained=path,
        proposer=proposer_name,
        proposer_options=dict(proposer.options) if same else {},
        max_boxes=proposer.max_boxes,
        min_box_size=proposer.min_box_size,
        score_threshold=proposer.score_threshold,
        whole_image=proposer.whole_image,
        region_mode=audit.region_mode,
        resize=resize,
        classes=tuple(disc.classes),
        templates=audit.templates or DEFAULT_TEMPLATES,
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


def prepare(cfg: MitigateConfig, disc: Target, size: int, mean: Sequence[float], std: Sequence[float]) -> TrainSet:
    """Propose + embed the fine-tuning regions with the audited model, assign them to the medoids, parse captions."""

    rows = read_manifest(cfg.train)
    missing = [i for i, r in enumerate(rows) if r.caption is None]
    if missing:
        raise ConfigError(f"{cfg.train}: row {missing[0] + 1} has no caption; mitigation needs a 'caption' column")
    name, path = audited_model(disc, cfg.region_model)
    work_dir = cfg.work_dir or cfg.out + ".regions"
    resize = cfg.resize or disc.audit.resize
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
