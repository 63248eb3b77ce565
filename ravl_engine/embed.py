"""Stage ``embed``: images -> region proposals -> image and region embeddings -> a resumable run directory.

One backbone pass per image batch (kernels/roi.py); shards are planned up front (``plan_shards``) and each is
written by an idempotent worker that skips complete shards, so a killed or interrupted run resumes where it stopped
and never duplicates an image.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ravl_engine import __version__
from ravl_engine.config import config_from_dict
from ravl_engine.distributed import barrier, local_device, rank_world
from ravl_engine.documents import ModelRecord, ProposerRecord, RunRecord
from ravl_engine.errors import ConfigError, ShardError
from ravl_engine.images import ImageDataset, boxes_to_input, check_resize, normalize
from ravl_engine.kernels.roi import region_embed, supported_modes, tower_kind
from ravl_engine.manifest import ManifestRow, read_manifest, resolve_classes
from ravl_engine.models import DEFAULT_MODEL, load_clip
from ravl_engine.runlock import directory_lock
from ravl_engine.shards import (
    FAILURES_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    TEXT_NAME,
    ShardData,
    ShardSpec,
    load_run_manifest,
    plan_shards,
    sha256_file,
    write_atomic,
    write_json_atomic,
    write_shard,
    write_text,
)
from ravl_engine.zeroshot import DEFAULT_TEMPLATES, class_text_embeddings

logger = logging.getLogger(__name__)

REGION_MODES = ("auto", "roi", "roi-mean", "crop")


@dataclass(frozen=True, slots=True, kw_only=True)
class EmbedConfig:
    """Options of ``ravl-engine embed``.

    Attributes:
        data: input manifest (CSV, JSONL or Parquet).
        out: run directory to create or resume.
        model: open_clip architecture or a shipped tiny config (default ``ravl-tiny-rn``).
        pretrained: open_clip pretrained tag or local checkpoint file; None = random init.
        proposer: registered proposer name (``quadrants``, ``grid``, ``manifest``, ``rpn``, ``yolo``, plugins).
        proposer_options: keyword options of the proposer (``rows``/``cols`` for grid, ``weights`` for rpn/yolo...).
        max_boxes, min_box_size, score_threshold, whole_image: box clean-up applied to every proposer.
        region_mode: "auto" (roi where the tower supports it, else crop), "roi", "roi-mean" or "crop".
        classes: class names (default: the classes file, else the sorted labels of the manifest).
        classes_file: one class name per line.
        templates: zero-shot prompt templates.
        batch_size: images per backbone pass.
        shard_size: images per shard file.
        device: torch device.
        num_workers: DataLoader worker processes for image decoding (and resizing, image by image).
        resize: how each image fits the model's square input: "squash" (default; stretch) or "pad" (letterbox,
            keeps the aspect ratio); never a crop. Boxes are stored in original-image pixels either way.
    """

    data: str
    out: str
    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    proposer: str = "quadrants"
    proposer_options: Mapping[str, Any] = field(default_factory=dict)
    max_boxes: int | None = None
    min_box_size: float = 1.0
    score_threshold: float | None = None
    whole_image: bool = False
    region_mode: str = "auto"
    classes: tuple[str, ...] | None = None
    classes_file: str | None = None
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    batch_size: int = 64
    shard_size: int = 4096
    device: str = "cpu"
    num_workers: int = 0
    resize: str = "squash"

    def __post_init__(self) -> None:
        check_resize(self.resize)
        if self.region_mode not in REGION_MODES:
            raise ConfigError(f"region_mode must be one of {', '.join(REGION_MODES)}, got {self.region_mode!r}")
        if self.batch_size < 1 or self.shard_size < 1:
            raise ConfigError(f"batch_size and shard_size must be >= 1, got {self.batch_size}, {self.shard_size}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.score_threshold is not None and not 0.0 <= self.score_threshold <= 1.0:
            # a threshold above 1 drops every box: proposal scores are probabilities, manifest and grid boxes score 1
            raise ConfigError(
                f"score_threshold (--score-threshold) must be in [0, 1], got {self.score_threshold}; proposal scores "
                "are probabilities"
            )
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ConfigError("every prompt template needs one '{}' where the class name goes")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EmbedConfig:
        return config_from_dict(cls, data)


@dataclass(frozen=True)
class EmbedResult:
    """Summary of an embed run (also what the CLI prints)."""

    run_dir: str
    n_images: int
    n_regions: int
    n_failed: int
    shards_written: int
    shards_skipped: int
    clipped_boxes: int
    dropped_boxes: int
    region_mode: str
    seconds: dict[str, float]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _record(cfg: EmbedConfig, classes: list[str], mode: str, checkpoint_sha: str | None, data_sha: str) -> RunRecord:
    """What a resumed run must share with the run that started the directory."""
    return RunRecord(
        model=ModelRecord(name=cfg.model, pretrained=cfg.pretrained, checkpoint_sha256=checkpoint_sha),
        proposer=ProposerRecord(
            name=cfg.proposer,
            options=dict(cfg.proposer_options),
            max_boxes=cfg.max_boxes,
            min_box_size=cfg.min_box_size,
            score_threshold=cfg.score_threshold,
            whole_image=cfg.whole_image,
        ),
        region_mode=mode,
        resize=cfg.resize,
        classes=tuple(classes),
        templates=tuple(cfg.templates),
        shard_size=cfg.shard_size,
        data_path=str(Path(cfg.data).resolve()),
        data_sha256=data_sha,
    )


def _check_compatible(run_dir: Path, existing: Mapping[str, Any], wanted: RunRecord) -> None:
    """Refuse to resume ``run_dir`` (whose manifest.json is ``existing``) with settings other than ``wanted``."""
    found = RunRecord.from_dict(existing, source=str(run_dir / "manifest.json"))
    if found.data_sha256 != wanted.data_sha256:
        raise ShardError(f"{run_dir} was embedded from another manifest (sha256 differs); use a new --out directory")
    if wanted.model.checkpoint_sha256 is not None:
        # a checkpoint file is the same model under any path spelling: compare contents, not path strings
        wanted = replace(wanted, model=replace(wanted.model, pretrained=found.model.pretrained))
    old, new = found.to_dict(), wanted.to_dict()
    for key in new.keys() - {"data"}:
        if old[key] != new[key]:
            raise ShardError(
                f"{run_dir} was written with {key} = {json.dumps(old[key])}, not {json.dumps(new[key])}; "
                "use a new --out directory or the original settings"
            )


def _region_labels_for(row: ManifestRow, boxes: Tensor, source: Tensor | None, proposer: str) -> list[str]:
    """Ground-truth labels of the kept boxes: by index for the manifest proposer, else by IoU >= 0.5."""
    if row.region_labels is None or row.boxes is None:
        return [""] * boxes.shape[0]
    if proposer == "manifest" and source is not None:
        return [row.region_labels[int(s)] if s >= 0 else "" for s in source]
    from torchvision.ops import box_iou  # noqa: PLC0415

    if boxes.shape[0] == 0:
        return []
    iou = box_iou(boxes, torch.tensor(row.boxes, dtype=torch.float32))
    best, idx = iou.max(dim=1)
    return [row.region_labels[int(j)] if float(b) >= 0.5 else "" for b, j in zip(best, idx, strict=True)]


def _record_name(spec: ShardSpec) -> str:
    return spec.name.removesuffix(".h5") + ".json"


def _shard_records(run_dir: Path, plan: Sequence[ShardSpec]) -> dict[str, dict[str, Any]]:
    """The completion records written next to each shard (readable ones only)."""
    out = {}
    for spec in plan:
        path = run_dir / _record_name(spec)
        if path.exists():
            try:
                out[spec.name] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
    return out


def run_embed(
    cfg: EmbedConfig,
    *,
    on_shard: Callable[[dict[str, Any]], None] | None = None,
    on_images: Callable[[int], None] | None = None,
) -> EmbedResult:
    """Embed every image and region of ``cfg.data`` into the run directory ``cfg.out`` (resuming if present).

    Args:
        cfg: options.
        on_shard: called after each shard is committed with its manifest entry (progress, tests).
        on_images: called with the number of images handled after each batch (progress bars).

    Returns:
        EmbedResult.

    Raises:
        ConfigError: bad manifest, labels outside the classes, unknown model/proposer/mode, weights unavailable.
        ShardError: ``cfg.out`` holds a run written with other settings or another format version.
    """
    from ravl_engine.proposers import BoxFilter, build_proposer  # noqa: PLC0415

    t_start = time.perf_counter()
    cfg = dataclasses.replace(cfg, device=local_device(cfg.device))
    seconds = {"read": 0.0, "propose": 0.0, "embed": 0.0, "write": 0.0}
    rows = read_manifest(cfg.data)
    classes = resolve_classes(rows, classes=cfg.classes, classes_file=cfg.classes_file)
    run_dir = Path(cfg.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file; give a directory")
    existing = load_run_manifest(run_dir) if run_dir.exists() else None

    try:
        box_filter = BoxFilter(
            max_boxes=cfg.max_boxes,
            min_size=cfg.min_box_size,
            score_threshold=cfg.score_threshold,
            whole_image=cfg.whole_image,
        )
        proposer = build_proposer(cfg.proposer, box_filter=box_filter, **dict(cfg.proposer_options))
    except (ValueError, TypeError, FileNotFoundError, ImportError, RuntimeError) as err:
        raise ConfigError(f"proposer {cfg.proposer!r}: {err}") from err
    if cfg.proposer == "manifest" and any(r.boxes is None for r in rows):
        missing = next(i for i, r in enumerate(rows) if r.boxes is None)
        raise ConfigError(f"proposer 'manifest' needs a 'boxes' value in every row; row {missing + 1} has none")

    loaded = load_clip(cfg.model, cfg.pretrained, device=cfg.device)
    visual = loaded.model.visual
    if tower_kind(visual) == "resnet":
        visual.to(memory_format=torch.channels_last)  # faster convolutions on CPU
    modes = supported_modes(visual)
    mode = modes[0] if cfg.region_mode == "auto" else cfg.region_mode
    if mode not in modes:
        raise ConfigError(f"region mode {mode!r} is not supported by {cfg.model}; use one of {', '.join(modes)}")
    record = _record(cfg, classes, mode, loaded.checkpoint_sha256, sha256_file(cfg.data))
    if existing is not None:
        _check_compatible(run_dir, existing, record)  # fail before taking the lock; checked again under it
    with directory_lock(run_dir, command="embed"):
        return _write_run(
            cfg,
            run_dir,
            rows=rows,
            classes=classes,
            loaded=loaded,
            proposer=proposer,
            mode=mode,
            record=record,
            seconds=seconds,
            t_start=t_start,
            on_shard=on_shard,
            on_images=on_images,
        )


def _intact(path: Path, entry: Mapping[str, Any]) -> bool:
    """``path`` exists and has the sha256 its manifest entry records (a shard, text.h5)."""
    return path.exists() and sha256_file(path) == entry.get("sha256")


def _write_run(
    cfg: EmbedConfig,
    run_dir: Path,
    *,
    rows: Sequence[ManifestRow],
    classes: list[str],
    loaded: Any,
    proposer: Any,
    mode: str,
    record: RunRecord,
    seconds: dict[str, float],
    t_start: float,
    on_shard: Callable[[dict[str, Any]], None] | None,
    on_images: Callable[[int], None] | None,
) -> EmbedResult:
    """The part of :func:`run_embed` that runs while this process holds the run directory's lock."""
    existing = load_run_manifest(run_dir)  # again: another process may have written it before we held the lock
    if existing is not None:
        _check_compatible(run_dir, existing, record)
    visual = loaded.model.visual
    rank, world = rank_world()
    plan = plan_shards(len(rows), cfg.shard_size)
    text_entry = (existing or {}).get("text")
    if rank == 0:
        for stale in run_dir.glob("*.tmp"):  # left by a killed writer: nobody else can be writing here now
            stale.unlink()
        # the same settings give the same text: keep a verified file
        if text_entry is None or not _intact(run_dir / TEXT_NAME, text_entry):
            text = class_text_embeddings(loaded.model, loaded.tokenizer, classes, cfg.templates)
            sha = write_text(run_dir / TEXT_NAME, classes, text.numpy(), cfg.templates)
            text_entry = {"file": TEXT_NAME, "sha256": sha}
    barrier()  # the stale files are gone before any rank writes its own
    # what is already complete: the manifest's entries (a single-process run) and the per-shard records
    done = {e["file"]: e for e in (existing or {}).get("shards", [])}
    done.update(_shard_records(run_dir, plan))
    manifest = {
        "format_version": FORMAT_VERSION,
        "engine_version": __version__,
        **record.to_dict(),
        "text": text_entry,
        "embedding_dim": int(visual.output_dim),
        "dtype": "float32",
        "image_size": loaded.image_size,
        "n_images_planned": len(rows),
        "batch_size": cfg.batch_size,  # informational: a resumed run may use another batch size
        "shards": [],
        "complete": False,
    }
    job = ShardJob(
        rows=rows,
        proposer=proposer,
        proposer_name=cfg.proposer,
        embedder=RegionEmbedder(
            visual=visual,
            mode=mode,
            mean=torch.tensor(loaded.mean).view(1, 3, 1, 1),
            std=torch.tensor(loaded.std).view(1, 3, 1, 1),
            device=torch.device(cfg.device),
        ),
        dim=int(visual.output_dim),
        size=loaded.image_size,
        resize=cfg.resize,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        label_index={c: i for i, c in enumerate(classes)},
        pin_memory=torch.device(cfg.device).type == "cuda",
    )
    written = skipped = 0
    entries: dict[str, dict[str, Any]] = {}
    for spec in plan[rank::world]:  # ranks take disjoint shards of the one plan
        entry = done.get(spec.name)
        path = run_dir / spec.name
        if entry is not None and _intact(path, entry):
            entries[spec.name] = entry
            skipped += 1
            if on_images is not None:
                on_images(spec.stop - spec.start)
            continue
        entry = embed_shard(job, spec, path, seconds=seconds, on_images=on_images)
        write_json_atomic(run_dir / _record_name(spec), entry)  # the shard is complete once this record exists
        entries[spec.name] = entry
        if world == 1:  # progress for readers of a running single-process job
            manifest["shards"] = [entries[s.name] for s in plan if s.name in entries]
            write_json_atomic(run_dir / MANIFEST_NAME, manifest)
        written += 1
        if on_shard is not None:
            on_shard(entry)
    barrier()
    if rank == 0:
        records = {**done, **_shard_records(run_dir, plan), **entries}
        unrecorded = [s.name for s in plan if s.name not in records]
        if unrecorded:
            raise ShardError(f"{run_dir}: shard(s) {', '.join(unrecorded)} have no completion record; rerun embed")
        manifest["shards"] = [records[s.name] for s in plan]
        manifest["complete"] = True
        failures = [f for e in manifest["shards"] for f in e.get("failures", [])]
        lines = "".join(json.dumps(f) + "\n" for f in failures)
        write_atomic(run_dir / FAILURES_NAME, lambda tmp: tmp.write_text(lines, encoding="utf-8"))
        manifest["counts"] = {
            "images": sum(e["n_images"] for e in manifest["shards"]),
            "regions": sum(e["n_regions"] for e in manifest["shards"]),
            "failed_images": len(failures),
            "clipped_boxes": sum(e["clipped_boxes"] for e in manifest["shards"]),
            "dropped_boxes": sum(e["dropped_boxes"] for e in manifest["shards"]),
        }
        write_json_atomic(run_dir / MANIFEST_NAME, manifest)
    barrier()
    if rank != 0:
        manifest = load_run_manifest(run_dir) or manifest
    seconds["total"] = time.perf_counter() - t_start
    counts = manifest["counts"]
    warnings = []
    if counts["images"] and not counts["regions"]:
        warnings.append(
            f"no region was kept: all {counts['dropped_boxes']} box(es) of the {counts['images']} image(s) were "
            "dropped; lower --score-threshold / --min-box-size or pick another --proposer"
        )
        logger.info("%s", warnings[-1])  # the CLI prints result.warnings on stderr
    return EmbedResult(
        run_dir=str(run_dir),
        n_images=counts["images"],
        n_regions=counts["regions"],
        n_failed=counts["failed_images"],
        shards_written=written,
        shards_skipped=skipped,
        clipped_boxes=counts["clipped_boxes"],
        dropped_boxes=counts["dropped_boxes"],
        region_mode=mode,
        seconds=seconds,
        warnings=warnings,
    )


@dataclass(frozen=True, slots=True)
class RegionEmbedder:
    """The embedder part: fitted uint8 images [B, 3, S, S] and their boxes in input pixels -> unit-norm image
    embeddings [B, D] and region embeddings [sum K_i, D], float32 on the CPU (one backbone pass, ``mode``)."""

    visual: Any
    mode: str
    mean: Tensor  # [1, 3, 1, 1]
    std: Tensor  # [1, 3, 1, 1]
    device: torch.device

    @torch.no_grad()
    def __call__(self, pixels: Tensor, boxes: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        x = normalize(pixels, self.mean, self.std).to(self.device, non_blocking=True)
        if tower_kind(self.visual) == "resnet":
            x = x.contiguous(memory_format=torch.channels_last)
        rois = [b.to(self.device) for b in boxes]
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            img_emb, reg_emb = region_embed(self.visual, x, rois, mode=self.mode)
        return F.normalize(img_emb.float(), dim=-1).cpu(), F.normalize(reg_emb.float(), dim=-1).cpu()


@dataclass(frozen=True, slots=True)
class ShardJob:
    """What the per-shard worker needs besides the shard: the manifest rows, the proposer, the embedder, and how
    images are read (fitted to ``size`` with ``resize``, ``batch_size`` per batch, ``num_workers`` decoders)."""

    rows: Sequence[ManifestRow]
    proposer: Any
    proposer_name: str
    embedder: Callable[[Tensor, Sequence[Tensor]], tuple[Tensor, Tensor]]  # a RegionEmbedder
    dim: int  # the embedding width (of an empty shard's arrays)
    size: int
    resize: str
    batch_size: int
    num_workers: int
    label_index: Mapping[str, int]
    pin_memory: bool = False

    def reader(self, spec: ShardSpec) -> torch.utils.data.DataLoader:
        """The reader part: batches of decoded images of one shard (lists of ``ImageDataset`` items)."""
        paths = [r.path for r in self.rows[spec.start : spec.stop]]
        keep_full = bool(getattr(self.proposer, "needs_pixels", True))
        return torch.utils.data.DataLoader(
            ImageDataset(paths, size=self.size, resize=self.resize, keep_full=keep_full),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=list,
            pin_memory=self.pin_memory,
        )

    def propose(self, row: ManifestRow, item: Any) -> Any:
        """The proposer part, one image at a time (images differ in size; fixed layouts cost nothing)."""
        given = [torch.tensor(row.boxes, dtype=torch.float32).reshape(-1, 4)] if row.boxes is not None else None
        # fixed layouts read only the size: a zero-stride stand-in, no full-size image at all
        image = (
            item.full[None].float().div_(255.0)
            if item.full is not None
            else torch.zeros(()).expand(1, 3, item.height, item.width)
        )
        return self.proposer(image, boxes=given)[0]


@dataclass
class _ShardParts:
    """The arrays of one shard as its batches are embedded (the writer part turns them into a ShardData)."""

    ids: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    image_embs: list[Tensor] = field(default_factory=list)
    region_embs: list[Tensor] = field(default_factory=list)
    boxes: list[Tensor] = field(default_factory=list)
    scores: list[Tensor] = field(default_factory=list)
    region_labels: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    clipped: int = 0
    dropped: int = 0

    def data(self, dim: int, *, with_region_labels: bool) -> ShardData:
        def cat(parts: list[Tensor], empty: tuple[int, ...]) -> np.ndarray:
            return torch.cat(parts).numpy() if parts else np.zeros(empty, np.float32)

        return ShardData(
            ids=self.ids,
            labels=np.asarray(self.labels, dtype=np.int64),
            image_emb=cat(self.image_embs, (0, dim)),
            offsets=np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64),
            boxes=cat(self.boxes, (0, 4)),
            region_emb=cat(self.region_embs, (0, dim)),
            scores=cat(self.scores, (0,)),
            region_labels=self.region_labels if with_region_labels else None,
        )


@torch.no_grad()
def embed_shard(
    job: ShardJob,
    spec: ShardSpec,
    path: Path,
    *,
    seconds: dict[str, float] | None = None,
    on_images: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """The per-shard worker: read, propose, embed and write the images of one shard, then return its manifest entry.

    Idempotent: the shard file is written atomically, so a rerun overwrites a partial one. ``seconds`` (keys
    ``read``, ``propose``, ``embed``, ``write``) accumulates the time of each part.
    """
    seconds = seconds if seconds is not None else {}
    for key in ("read", "propose", "embed", "write"):
        seconds.setdefault(key, 0.0)
    shard_rows = job.rows[spec.start : spec.stop]
    out = _ShardParts()
    t0 = time.perf_counter()
    for batch in job.reader(spec):
        seconds["read"] += time.perf_counter() - t0
        ok = []
        for item in batch:
            row = shard_rows[item.index]
            if item.pixels is None:
                out.failures.append({"image": row.image, "error": str(item.error)})
            else:
                ok.append((row, item))
        if ok:
            t0 = time.perf_counter()
            proposals = [job.propose(row, item) for row, item in ok]
            seconds["propose"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            # RoIAlign sees the boxes in input pixels; the shard keeps them in original-image pixels
            scaled = [
                boxes_to_input(prop.boxes, item.placement.as_tensor())
                for (_, item), prop in zip(ok, proposals, strict=True)
            ]
            img_emb, reg_emb = job.embedder(torch.stack([item.pixels for _, item in ok]), scaled)
            out.image_embs.append(img_emb)
            out.region_embs.append(reg_emb)
            seconds["embed"] += time.perf_counter() - t0
            for (row, _), prop in zip(ok, proposals, strict=True):
                out.ids.append(row.image)
                out.labels.append(job.label_index[row.label] if row.label is not None else -1)
                out.boxes.append(prop.boxes)
                out.scores.append(prop.scores)
                out.counts.append(int(prop.boxes.shape[0]))
                out.region_labels.extend(_region_labels_for(row, prop.boxes, prop.source, job.proposer_name))
                out.clipped += prop.stats.get("clipped", 0)
                out.dropped += prop.stats.get("dropped", 0)
        if on_images is not None:
            on_images(len(batch))
        t0 = time.perf_counter()
    t0 = time.perf_counter()
    data = out.data(job.dim, with_region_labels=any(r.region_labels is not None for r in shard_rows))
    sha = write_shard(path, spec, data)
    seconds["write"] += time.perf_counter() - t0
    return {
        "file": spec.name,
        "index": spec.index,
        "first_image": spec.start,
        "n_planned": spec.stop - spec.start,
        "n_images": len(out.ids),
        "n_regions": int(sum(out.counts)),
        "clipped_boxes": out.clipped,
        "dropped_boxes": out.dropped,
        "failures": out.failures,
        "sha256": sha,
    }
