"""The two on-disk documents as typed, frozen values: the run record and discovery.json.

``RunRecord`` is what ``embed`` records in ``RUN_DIR/manifest.json`` about how the embeddings were made (model,
checkpoint sha256, proposer, region mode, resize, classes, templates); ``Audit`` is the part of it that
``cluster`` copies into ``discovery.json`` (``audit``). ``Discovery`` is the whole ``discovery.json`` written by
``cluster``. Each has ``to_dict()`` (the JSON layout, README "discovery.json") and ``from_dict()``, which refuses
another document, another format tag or an older layout with one line that names the file and the fix.

``ravl-engine discover --out`` writes another document (region indices only, no images or boxes), tagged
``DISCOVER_ARRAYS_FORMAT`` so that every discovery.json reader rejects it in one line.

Example:
    >>> disc = read_discovery("audit/discovery.json")  # doctest: +SKIP
    >>> disc.clusters[0].class_name, disc.audit.model.checkpoint_sha256, disc.medoid_array().shape  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ravl_engine.errors import ConfigError, ShardError

DISCOVERY_FORMAT = "ravl-engine-discovery/1"
DISCOVER_ARRAYS_FORMAT = "ravl-engine/discover-arrays-v1"
RERUN_CLUSTER = "rerun `ravl-engine cluster RUN --out DIR`"
DEFAULT_RESIZE = "squash"  # what embed did before --resize existed


# ------------------------------------------------------------------------------------------------- run record


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelRecord:
    """The audited model: architecture, checkpoint (tag, file or None = random init) and the file's sha256."""

    name: str
    pretrained: str | None
    checkpoint_sha256: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "pretrained": self.pretrained, "checkpoint_sha256": self.checkpoint_sha256}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelRecord:
        return cls(name=str(data["name"]), pretrained=data["pretrained"], checkpoint_sha256=data["checkpoint_sha256"])


@dataclass(frozen=True, slots=True, kw_only=True)
class ProposerRecord:
    """The region proposer and the box clean-up applied to it (EmbedConfig's fields of the same names)."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    max_boxes: int | None = None
    min_box_size: float = 1.0
    score_threshold: float | None = None
    whole_image: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "options": dict(self.options),
            "max_boxes": self.max_boxes,
            "min_box_size": self.min_box_size,
            "score_threshold": self.score_threshold,
            "whole_image": self.whole_image,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProposerRecord:
        return cls(
            name=str(data["name"]),
            options=dict(data["options"]),
            max_boxes=data["max_boxes"],
            min_box_size=data["min_box_size"],
            score_threshold=data["score_threshold"],
            whole_image=bool(data["whole_image"]),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Audit:
    """What produced a discovery's embeddings (discovery.json's ``audit``): mitigation embeds its fine-tuning
    regions the same way and refuses another model."""

    model: ModelRecord
    proposer: ProposerRecord
    region_mode: str
    resize: str = DEFAULT_RESIZE
    templates: tuple[str, ...]
    run_dir_data: str | None  # the embedded manifest (absolute path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "proposer": self.proposer.to_dict(),
            "region_mode": self.region_mode,
            "resize": self.resize,
            "templates": list(self.templates),
            "run_dir_data": self.run_dir_data,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Audit:
        return cls(
            model=ModelRecord.from_dict(data["model"]),
            proposer=ProposerRecord.from_dict(data["proposer"]),
            region_mode=str(data["region_mode"]),
            resize=str(data.get("resize", DEFAULT_RESIZE)),
            templates=tuple(str(t) for t in data["templates"]),
            run_dir_data=data["run_dir_data"],
        )

    @classmethod
    def of_run(cls, record: RunRecord) -> Audit:
        """The audit of a run, with a checkpoint path made absolute where it names a file."""
        pretrained = record.model.pretrained
        if pretrained and Path(pretrained).is_file():
            pretrained = str(Path(pretrained).resolve())
        return cls(
            model=ModelRecord(
                name=record.model.name, pretrained=pretrained, checkpoint_sha256=record.model.checkpoint_sha256
            ),
            proposer=record.proposer,
            region_mode=record.region_mode,
            resize=record.resize,
            templates=record.templates,
            run_dir_data=record.data_path,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRecord:
    """How a run directory's embeddings were made: the settings block of ``RUN_DIR/manifest.json`` (a resumed
    embed must match it) that ``cluster`` audits."""

    model: ModelRecord
    proposer: ProposerRecord
    region_mode: str
    resize: str = DEFAULT_RESIZE
    classes: tuple[str, ...]
    templates: tuple[str, ...]
    shard_size: int
    data_path: str  # the embedded manifest, absolute
    data_sha256: str

    def to_dict(self) -> dict[str, Any]:
        """The manifest.json keys, in the order embed writes them."""
        return {
            "model": self.model.to_dict(),
            "proposer": self.proposer.to_dict(),
            "region_mode": self.region_mode,
            "resize": self.resize,
            "classes": list(self.classes),
            "templates": list(self.templates),
            "shard_size": self.shard_size,
            "data": {"path": self.data_path, "sha256": self.data_sha256},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "manifest.json") -> RunRecord:
        """The record of a manifest.json (its other keys are ignored).

        Raises:
            ShardError: a key is missing (an older ravl-engine) or holds a value of the wrong kind.
        """
        try:
            return cls(
                model=ModelRecord.from_dict(data["model"]),
                proposer=ProposerRecord.from_dict(data["proposer"]),
                region_mode=str(data["region_mode"]),
                resize=str(data.get("resize", DEFAULT_RESIZE)),
                classes=tuple(str(c) for c in data["classes"]),
                templates=tuple(str(t) for t in data["templates"]),
                shard_size=int(data["shard_size"]),
                data_path=str(data["data"]["path"]),
                data_sha256=str(data["data"]["sha256"]),
            )
        except KeyError as err:
            raise ShardError(
                f"{source}: the run record has no {err} (written by an older ravl-engine); re-run embed into a new "
                "directory"
            ) from err
        except (TypeError, ValueError, AttributeError) as err:
            raise ShardError(f"{source}: the run record is damaged ({err}); re-run embed into a new directory") from err


# ---------------------------------------------------------------------------------------------- discovery.json


@dataclass(frozen=True, slots=True)
class TableRow:
    """Accuracy of one class on images with / without the cluster's regions, and the image counts."""

    class_name: str  # JSON key "class"
    acc_present: float
    n_present: int
    acc_absent: float
    n_absent: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "class": self.class_name,
            "acc_present": self.acc_present,
            "n_present": self.n_present,
            "acc_absent": self.acc_absent,
            "n_absent": self.n_absent,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TableRow:
        return cls(
            class_name=str(data["class"]),
            acc_present=float(data["acc_present"]),
            n_present=int(data["n_present"]),
            acc_absent=float(data["acc_absent"]),
            n_absent=int(data["n_absent"]),
        )


@dataclass(frozen=True, slots=True)
class Region:
    """One region of a cluster: its image (the manifest's ``image``), box (xyxy, original pixels), similarity to
    the medoid."""

    image: str
    box: tuple[float, float, float, float]
    similarity: float

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "box": list(self.box), "similarity": self.similarity}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Region:
        x1, y1, x2, y2 = (float(v) for v in data["box"])
        return cls(image=str(data["image"]), box=(x1, y1, x2, y2), similarity=float(data["similarity"]))


@dataclass(frozen=True, slots=True, kw_only=True)
class Name:
    """A phrase naming a cluster and its score (naming.py)."""

    phrase: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"phrase": self.phrase, "score": self.score}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Name:
        return cls(phrase=str(data["phrase"]), score=float(data["score"]))


@dataclass(frozen=True, slots=True, kw_only=True)
class Naming:
    """How the clusters were named, or why not (``status`` "named" or "skipped", ``reason`` when skipped).

    ``Naming()`` (every field None, ``{}`` in the file) means naming was switched off; None fields are not written.
    """

    vocabulary: str | None = None
    n_phrases: int | None = None
    score: str | None = None
    text_embeddings: str | None = None
    status: str | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        fields = {
            "vocabulary": self.vocabulary,
            "n_phrases": self.n_phrases,
            "score": self.score,
            "text_embeddings": self.text_embeddings,
            "status": self.status,
            "reason": self.reason,
        }
        return {key: value for key, value in fields.items() if value is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Naming:
        def text(key: str) -> str | None:
            return str(data[key]) if data.get(key) is not None else None

        n_phrases = data.get("n_phrases")
        return cls(
            vocabulary=text("vocabulary"),
            n_phrases=int(n_phrases) if n_phrases is not None else None,
            score=text("score"),
            text_embeddings=text("text_embeddings"),
            status=text("status"),
            reason=text("reason"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Cluster:
    """A ranked cluster: its class, gap and influence, names, with/without table, medoid and every region (most
    similar to the medoid first)."""

    rank: int
    cluster_id: int
    class_name: str | None  # JSON key "class"; None when no class is correlated
    gap: float
    influence: float
    names: tuple[Name, ...] = ()
    n_regions: int
    n_images: int
    table: tuple[TableRow, ...]
    medoid: tuple[float, ...]
    regions: tuple[Region, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "cluster_id": self.cluster_id,
            "class": self.class_name,
            "gap": self.gap,
            "influence": self.influence,
            "names": [n.to_dict() for n in self.names],
            "n_regions": self.n_regions,
            "n_images": self.n_images,
            "table": [row.to_dict() for row in self.table],
            "medoid": list(self.medoid),
            "regions": [r.to_dict() for r in self.regions],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Cluster:
        """Documents from before cluster naming lack ``names``, ``n_regions`` and ``n_images``: no names then, and
        the counts follow from the regions."""
        regions = tuple(Region.from_dict(r) for r in data["regions"])
        name = data["class"]
        return cls(
            rank=int(data["rank"]),
            cluster_id=int(data["cluster_id"]),
            class_name=str(name) if name is not None else None,
            gap=float(data["gap"]),
            influence=float(data["influence"]),
            names=tuple(Name.from_dict(n) for n in data.get("names") or ()),
            n_regions=int(data.get("n_regions", len(regions))),
            n_images=int(data.get("n_images", len({r.image for r in regions}))),
            table=tuple(TableRow.from_dict(row) for row in data["table"]),
            medoid=tuple(float(v) for v in data["medoid"]),
            regions=regions,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Discovery:
    """A discovery.json: the ranked clusters and what mitigation needs (every medoid, the audit record).

    ``cluster_sizes`` is None in documents written before cluster naming (they did not record it).
    """

    k: int
    classes: tuple[str, ...]
    embedding_dim: int
    audit: Audit
    naming: Naming = field(default_factory=Naming)
    cluster_sizes: tuple[int, ...] | None = None
    clusters: tuple[Cluster, ...]
    medoids: tuple[tuple[float, ...], ...]  # [k][D], by cluster id
    format: str = DISCOVERY_FORMAT

    def medoid_array(self) -> np.ndarray:
        """[k, D] float32, every cluster's medoid embedding by cluster id."""
        return np.asarray(self.medoids, dtype=np.float32).reshape(len(self.medoids), self.embedding_dim)

    def by_rank(self, rank: int) -> Cluster:
        """The cluster ranked ``rank`` (1 = the most spurious). Raises ConfigError when there is none."""
        for c in self.clusters:
            if c.rank == rank:
                return c
        raise ConfigError(f"the discovery has {len(self.clusters)} ranked cluster(s); rank {rank} does not exist")

    def to_dict(self) -> dict[str, Any]:
        """The JSON document, key for key what ``cluster`` writes."""
        out: dict[str, Any] = {
            "format": self.format,
            "k": self.k,
            "classes": list(self.classes),
            "embedding_dim": self.embedding_dim,
            "audit": self.audit.to_dict(),
            "naming": self.naming.to_dict(),
        }
        if self.cluster_sizes is not None:
            out["cluster_sizes"] = list(self.cluster_sizes)
        out["clusters"] = [c.to_dict() for c in self.clusters]
        out["medoids"] = [list(m) for m in self.medoids]
        return out

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "discovery.json") -> Discovery:
        """Check the format tag and the layout, then build the value.

        Raises:
            ConfigError: not a JSON object, another format tag (``discover --out``'s arrays document included), a
                missing key (an older ravl-engine) or a value of the wrong kind; one line naming ``source`` and
                the fix.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{source}: not a ravl-engine discovery.json (a JSON {type(data).__name__}, not an object); "
                f"{RERUN_CLUSTER}"
            )
        tag = data.get("format")
        if tag != DISCOVERY_FORMAT:
            what = " (`ravl-engine discover --out` writes region indices only)" if tag == DISCOVER_ARRAYS_FORMAT else ""
            raise ConfigError(
                f"{source}: not a ravl-engine discovery.json (format {tag}, expected {DISCOVERY_FORMAT}){what}; "
                f"{RERUN_CLUSTER}"
            )
        try:
            sizes = data.get("cluster_sizes")
            return cls(
                format=str(tag),
                k=int(data["k"]),
                classes=tuple(str(c) for c in data["classes"]),
                embedding_dim=int(data["embedding_dim"]),
                audit=Audit.from_dict(data["audit"]),
                naming=Naming.from_dict(data.get("naming") or {}),
                cluster_sizes=tuple(int(s) for s in sizes) if sizes is not None else None,
                clusters=tuple(Cluster.from_dict(c) for c in data["clusters"]),
                medoids=tuple(tuple(float(v) for v in m) for m in data["medoids"]),
            )
        except KeyError as err:
            raise ConfigError(f"{source}: no {err} key: written by an older ravl-engine; {RERUN_CLUSTER}") from err
        except (TypeError, ValueError, AttributeError) as err:
            raise ConfigError(f"{source}: damaged discovery.json ({err}); {RERUN_CLUSTER}") from err


def read_discovery(path: str | Path) -> Discovery:
    """Read and check a ``discovery.json`` written by ``ravl-engine cluster``.

    Raises:
        ConfigError: unreadable, not JSON, or not this format (see :meth:`Discovery.from_dict`); one line.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(
            f"{path}: not a readable discovery.json ({' '.join(str(err).split())}); {RERUN_CLUSTER}"
        ) from err
    return Discovery.from_dict(data, source=str(path))


def discover_arrays_document(summary: Mapping[str, Any]) -> dict[str, Any]:
    """``discover --out``'s document: the discovery on arrays (region indices, no images), tagged as such."""
    return {"format": DISCOVER_ARRAYS_FORMAT, **summary}
