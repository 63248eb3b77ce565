"""The run directory: the contract between ``embed`` and ``cluster`` (../shared/docs/DESIGN.md, "Run directory").

Layout::

    RUN_DIR/manifest.json      format version, model, proposer, classes, templates, shards with counts and sha256
    RUN_DIR/text.h5            classes/name [C] utf-8, classes/emb [C, D] float32
    RUN_DIR/shard-00000.h5     images/id, images/label, images/emb, images/region_offset,
                               regions/box, regions/emb, regions/proposer_score, optional regions/label
    RUN_DIR/failures.jsonl     images that could not be read, one JSON object per line

Every file is written under a temporary name and renamed when complete; manifest.json is rewritten atomically after
each shard, so a killed run leaves only complete shards behind and a rerun resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ravl_engine.errors import ShardError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TEXT_NAME = "text.h5"
FAILURES_NAME = "failures.jsonl"


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """Images [start, stop) of the input manifest go to shard ``index``."""

    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}.h5"


def plan_shards(n_images: int, shard_size: int) -> list[ShardSpec]:
    """Split ``n_images`` into consecutive shards of ``shard_size`` images (the last may be shorter)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [
        ShardSpec(index=i, start=start, stop=min(n_images, start + shard_size))
        for i, start in enumerate(range(0, n_images, shard_size))
    ]


@dataclass(frozen=True)
class ShardData:
    """Arrays of one shard (or of a whole run, concatenated).

    Attributes:
        ids: N image ids (the manifest's ``image`` strings).
        labels: [N] int64 class index, -1 if none.
        image_emb: [N, D] float32, unit rows.
        offsets: [N + 1] int64 CSR offsets into the region arrays.
        boxes: [R, 4] float32 xyxy original-image pixels.
        region_emb: [R, D] float32, unit rows.
        scores: [R] float32 proposer scores.
        region_labels: R strings ("" where unknown) or None.
    """

    ids: list[str]
    labels: np.ndarray
    image_emb: np.ndarray
    offsets: np.ndarray
    boxes: np.ndarray
    region_emb: np.ndarray
    scores: np.ndarray
    region_labels: list[str] | None = None

    @property
    def num_regions(self) -> np.ndarray:
        return np.diff(self.offsets)


def sha256_file(path: str | Path, *, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to ``path.tmp``, then rename it to ``path``: the file is absent, the old one, or complete.

    On any failure (full disk, a directory in the way, Ctrl-C) the ``.tmp`` is removed before the error goes on.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, default=float), encoding="utf-8"))


def write_shard(path: Path, spec: ShardSpec, data: ShardData) -> str:
    """Write a shard under ``path.tmp``, rename it to ``path``, return its sha256."""
    import h5py  # noqa: PLC0415

    text = h5py.string_dtype("utf-8")

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as fh:
            fh.attrs["format_version"] = FORMAT_VERSION
            fh.attrs["shard_index"] = spec.index
            fh.attrs["first_image"] = spec.start
            images = fh.create_group("images")
            images.create_dataset("id", data=np.array(data.ids, dtype=object), dtype=text)
            images.create_dataset("label", data=data.labels.astype(np.int64))
            images.create_dataset("emb", data=data.image_emb.astype(np.float32))
            images.create_dataset("region_offset", data=data.offsets.astype(np.int64))
            regions = fh.create_group("regions")
            regions.create_dataset("box", data=data.boxes.astype(np.float32).reshape(-1, 4))
            dim = data.image_emb.shape[1]
            regions.create_dataset("emb", data=data.region_emb.astype(np.float32).reshape(-1, dim))
            regions.create_dataset("proposer_score", data=data.scores.astype(np.float32))
            if data.region_labels is not None:
                regions.create_dataset("label", data=np.array(data.region_labels, dtype=object), dtype=text)

    write_atomic(path, write)
    return sha256_file(path)


def read_shard(path: Path, *, region_emb: bool = True) -> ShardData:
    """Read one shard (without its region embeddings when ``region_emb`` is False: a [0, D] array then); schema
    problems raise ShardError naming the file."""
    import h5py  # noqa: PLC0415

    try:
        with h5py.File(path, "r") as fh:
            if int(fh.attrs.get("format_version", -1)) != FORMAT_VERSION:
                raise ShardError(
                    f"{path}: shard format {fh.attrs.get('format_version')} is not {FORMAT_VERSION}; re-run embed"
                )
            region_labels = None
            if "label" in fh["regions"]:
                region_labels = [v.decode() if isinstance(v, bytes) else str(v) for v in fh["regions/label"][()]]
            return ShardData(
                ids=[v.decode() if isinstance(v, bytes) else str(v) for v in fh["images/id"][()]],
                labels=fh["images/label"][()],
                image_emb=fh["images/emb"][()],
                offsets=fh["images/region_offset"][()],
                boxes=fh["regions/box"][()],
                region_emb=fh["regions/emb"][()]
                if region_emb
                else np.zeros((0, fh["regions/emb"].shape[1]), np.float32),
                scores=fh["regions/proposer_score"][()],
                region_labels=region_labels,
            )
    except ShardError:
        raise
    except (OSError, KeyError) as err:
        raise ShardError(f"{path}: unreadable or incomplete shard ({err}); delete it and re-run embed") from err


def write_text(path: Path, classes: Sequence[str], emb: np.ndarray, templates: Sequence[str]) -> str:
    """Write the class text embeddings under ``path.tmp``, rename it to ``path``, return its sha256."""
    import h5py  # noqa: PLC0415

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as fh:
            fh.attrs["format_version"] = FORMAT_VERSION
            group = fh.create_group("classes")
            group.create_dataset("name", data=np.array(list(classes), dtype=object), dtype=h5py.string_dtype("utf-8"))
            group.create_dataset("emb", data=emb.astype(np.float32))
            fh.attrs["templates"] = json.dumps(list(templates))

    write_atomic(path, write)
    return sha256_file(path)


def read_text(path: Path) -> tuple[list[str], np.ndarray]:
    import h5py  # noqa: PLC0415

    try:
        with h5py.File(path, "r") as fh:
            names = [v.decode() if isinstance(v, bytes) else str(v) for v in fh["classes/name"][()]]
            return names, fh["classes/emb"][()]
    except (OSError, KeyError) as err:
        raise ShardError(f"{path}: unreadable class text embeddings ({err}); re-run embed") from err


def _read_verified_text(run_dir: Path, manifest: dict[str, Any], dim: int) -> tuple[list[str], np.ndarray]:
    """text.h5 checked like a shard (sha256 recorded in the manifest), then its class names and dimension."""
    path = run_dir / TEXT_NAME
    recorded = (manifest.get("text") or {}).get("sha256")
    if recorded is None:
        raise ShardError(
            f"{run_dir / MANIFEST_NAME}: records no sha256 of {TEXT_NAME} (an older ravl-engine wrote it); re-run the "
            "same embed command to record it"
        )
    if not path.exists():
        raise ShardError(f"{path}: listed in {MANIFEST_NAME} but missing; re-run embed to rebuild it")
    if sha256_file(path) != recorded:
        raise ShardError(f"{path}: contents do not match {MANIFEST_NAME} (sha256); re-run embed to rebuild it")
    classes, emb = read_text(path)
    if classes != list(manifest.get("classes", [])):
        raise ShardError(
            f"{path}: classes {classes} but {MANIFEST_NAME} lists {manifest.get('classes')}; re-run embed into a new "
            "directory"
        )
    if emb.shape != (len(classes), dim):
        raise ShardError(
            f"{path}: class embeddings of shape {list(emb.shape)}, the run says [{len(classes)}, {dim}]; re-run embed "
            "into a new directory"
        )
    return classes, emb


def load_run_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The run's manifest.json, or None when the directory has none. Wrong format versions raise ShardError."""
    path = run_dir / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ShardError(f"{path}: not valid JSON ({err.msg}); delete the run directory and re-run embed") from err
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ShardError(
            f"{path}: run directory format {version!r}, this engine reads format {FORMAT_VERSION}; "
            "re-run embed into a new directory"
        )
    return manifest


@dataclass(frozen=True)
class RunData:
    """A whole run directory in memory."""

    manifest: dict[str, Any]
    data: ShardData
    classes: list[str]
    text_emb: np.ndarray
    region_offset: int = 0  # global index of data.region_emb[0] (a rank's share of a multi-process read)


def read_run(run_dir: str | Path, *, region_shards: range | None = None) -> RunData:
    """Read every shard of a complete run directory, in order, and the class text embeddings.

    With ``region_shards`` only those shards' region embeddings are read (and their sha256 checked): a rank's share
    of a multi-process discovery; ``data.region_emb`` then holds rows ``region_offset ..`` of the run's regions and
    every other array is whole.

    Raises:
        ShardError: no manifest, an incomplete run (shards missing), a shard whose sha256 or dimension does not
            match the manifest; each message names the file and the fix.
    """
    run_dir = Path(run_dir)
    manifest = load_run_manifest(run_dir)
    if manifest is None:
        raise ShardError(f"{run_dir}: no {MANIFEST_NAME}; is this a run directory written by 'ravl-engine embed'?")
    if not manifest.get("complete"):
        raise ShardError(f"{run_dir}: the embed run is incomplete; re-run the same embed command to finish it")
    dim = int(manifest["embedding_dim"])
    parts = []
    region_offset = 0
    for index, entry in enumerate(manifest["shards"]):
        path = run_dir / entry["file"]
        if not path.exists():
            raise ShardError(f"{path}: listed in {MANIFEST_NAME} but missing; re-run embed to rebuild it")
        mine = region_shards is None or index in region_shards
        if region_shards is not None and index < region_shards.start:
            region_offset += int(entry["n_regions"])
        # each shard is hashed by the one rank that reads its embeddings
        if mine and sha256_file(path) != entry["sha256"]:
            raise ShardError(f"{path}: contents do not match {MANIFEST_NAME} (sha256); re-run embed to rebuild it")
        shard = read_shard(path, region_emb=mine)
        if shard.image_emb.shape[1] != dim or shard.region_emb.shape[1] != dim:
            raise ShardError(f"{path}: embedding dim {shard.image_emb.shape[1]} but the run says {dim}")
        parts.append(shard)
    classes, text_emb = _read_verified_text(run_dir, manifest, dim)
    offsets = [np.zeros(1, dtype=np.int64)]
    total = 0
    for p in parts:
        offsets.append(p.offsets[1:] + total)
        total += int(p.offsets[-1])
    labels_present = all(p.region_labels is not None for p in parts)
    data = ShardData(
        ids=[i for p in parts for i in p.ids],
        labels=np.concatenate([p.labels for p in parts]) if parts else np.zeros(0, np.int64),
        image_emb=np.concatenate([p.image_emb for p in parts]) if parts else np.zeros((0, dim), np.float32),
        offsets=np.concatenate(offsets),
        boxes=np.concatenate([p.boxes for p in parts]) if parts else np.zeros((0, 4), np.float32),
        region_emb=np.concatenate([p.region_emb for p in parts]) if parts else np.zeros((0, dim), np.float32),
        scores=np.concatenate([p.scores for p in parts]) if parts else np.zeros(0, np.float32),
        region_labels=[x for p in parts for x in (p.region_labels or [])] if labels_present and parts else None,
    )
    return RunData(manifest=manifest, data=data, classes=classes, text_emb=text_emb, region_offset=region_offset)
