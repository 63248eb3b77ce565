"""Stage ``cluster``: a run directory -> RaVL discovery -> ``discovery.json``. Needs no model."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ravl_engine.config import DiscoverConfig, config_from_dict
from ravl_engine.discover import DiscoveryResult, run_discover
from ravl_engine.distributed import TorchComm, barrier, rank_world
from ravl_engine.documents import (
    DISCOVERY_FORMAT,  # noqa: F401  (re-exported: mitigate and its tests import it from here)
    Audit,
    Cluster,
    Discovery,
    Name,
    Naming,
    Region,
    RunRecord,
    TableRow,
)
from ravl_engine.errors import ConfigError
from ravl_engine.naming import SCORE_RULE, cluster_means, name_clusters, read_vocabulary
from ravl_engine.outputs import check_out, staged_dir
from ravl_engine.report import write_report
from ravl_engine.runlock import check_not_being_written, directory_lock
from ravl_engine.shards import RunData, load_run_manifest, read_run, write_json_atomic
from ravl_engine.vocabulary import builtin_vocabulary
from ravl_engine.zeroshot import TEMPERATURE, zero_shot_probs

logger = logging.getLogger(__name__)

DISCOVERY_NAME = "discovery.json"
REPORT_NAME = "report.html"


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterConfig:
    """Options of ``ravl-engine cluster``.

    Attributes:
        run_dir: a complete run directory written by ``embed``.
        out: output directory for ``discovery.json``.
        seed: k-medoids++ seed.
        temperature: zero-shot softmax temperature (0.07).
        report: also write ``report.html`` (each cluster's top regions, cut out and in context; see report.py).
        names: name every cluster with phrases scored by the run's own text tower (naming.py); skipped with a
            warning when the model's checkpoint is missing or changed.
        vocabulary: phrase file, one per line; None = the built-in vocabulary (vocabulary.py).
        checkpoint: the audited checkpoint's new path if it moved since ``embed`` (its sha256 must match).
        top_names: phrases kept per cluster, best first.
        discover: discovery options.
        overwrite: replace an existing non-empty ``out`` (default: refuse); the new results are written aside and
            swapped in whole, so old and new files never mix.
    """

    run_dir: str
    out: str
    seed: int = 0
    temperature: float = TEMPERATURE
    report: bool = True
    names: bool = True
    vocabulary: str | None = None
    checkpoint: str | None = None
    top_names: int = 5
    discover: DiscoverConfig = field(default_factory=DiscoverConfig)
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.top_names < 1:
            raise ConfigError(f"top_names must be >= 1, got {self.top_names}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClusterConfig:
        data = dict(data)
        if isinstance(data.get("discover"), Mapping):
            data["discover"] = DiscoverConfig.from_dict(data["discover"])
        return config_from_dict(cls, data)


@dataclass(frozen=True)
class ClusterResult:
    """Where discovery.json went, the discovery itself, and the document written."""

    path: str
    discovery: DiscoveryResult
    document: Discovery
    report: str | None = None


def discovery_document(
    result: DiscoveryResult,
    *,
    classes: list[str],
    ids: list[str],
    boxes: np.ndarray,
    region_offsets: np.ndarray,
    medoid_emb: np.ndarray,
    audit: Audit,
    names: list[list[dict[str, Any]]] | None = None,
    naming: Naming | None = None,
) -> Discovery:
    """The discovery.json document: clusters ranked, each with its table, medoid and all its regions, best first.

    ``medoids`` holds the embedding of every cluster's medoid (all K, by cluster id) and ``audit`` what produced the
    embeddings (model, checkpoint sha256, proposer, region mode): mitigation assigns new regions to these medoids
    and refuses a model other than the audited one. ``names`` (by cluster id) become each cluster's ``names``
    (empty when naming was skipped; ``naming`` says how they were scored, or why not).
    """
    region_image = np.repeat(np.arange(len(ids)), np.diff(region_offsets))
    clusters = []
    for c in result.clusters:
        clusters.append(
            Cluster(
                rank=c.rank,
                cluster_id=c.cluster_id,
                class_name=classes[c.class_index] if c.class_index >= 0 else None,
                gap=c.gap,
                influence=c.influence,
                names=tuple(Name.from_dict(n) for n in names[c.cluster_id]) if names is not None else (),
                n_regions=int(c.region_indices.shape[0]),
                n_images=int(np.unique(region_image[c.region_indices]).shape[0]),
                table=tuple(
                    TableRow(classes[row.class_index], row.acc_present, row.n_present, row.acc_absent, row.n_absent)
                    for row in c.table
                ),
                medoid=tuple(medoid_emb[c.cluster_id].astype(float).tolist()),
                regions=tuple(
                    Region(ids[int(region_image[r])], tuple(boxes[r].astype(float).tolist()), float(s))
                    for r, s in zip(c.region_indices, c.similarities, strict=True)
                ),
            )
        )
    return Discovery(
        k=result.k,
        classes=tuple(classes),
        embedding_dim=int(medoid_emb.shape[1]),
        audit=audit,
        naming=naming or Naming(),
        cluster_sizes=tuple(np.bincount(result.assignments, minlength=result.k).tolist()),
        clusters=tuple(clusters),
        medoids=tuple(tuple(m) for m in medoid_emb.astype(float).tolist()),
    )


def _names(
    cfg: ClusterConfig,
    run: RunData,
    record: RunRecord,
    result: DiscoveryResult,
    phrases: list[str],
    *,
    comm: Any,
    rank: int,
) -> tuple[list[list[dict[str, Any]]] | None, Naming]:
    """Every cluster's names (by cluster id) and how they were scored; rank 0 loads the text tower."""
    x = torch.from_numpy(run.data.region_emb)
    labels = torch.from_numpy(result.assignments[run.region_offset : run.region_offset + x.shape[0]])
    sums, counts = cluster_means(x, labels, result.k)
    if comm is not None:  # each rank holds a share of the regions
        sums, counts = comm.sum(sums), comm.sum(counts)
    how = Naming(
        vocabulary=str(Path(cfg.vocabulary).resolve()) if cfg.vocabulary is not None else "builtin",
        n_phrases=len(phrases),
        score=SCORE_RULE,
        text_embeddings="computed at cluster time from the run's model and prompt templates",
    )
    if rank != 0:
        return None, how
    names, reason = name_clusters(record, phrases, sums, counts, top=cfg.top_names, checkpoint=cfg.checkpoint)
    return names, dataclasses.replace(how, status="named" if names is not None else "skipped", reason=reason)


def run_cluster(cfg: ClusterConfig, *, on_k: Callable[[dict[str, Any]], None] | None = None) -> ClusterResult:
    """Discover spurious region clusters in a run directory and write ``OUT/discovery.json``.

    Raises:
        ShardError: not a complete run directory of this format, a run directory that embed is still writing, or
            an ``OUT`` that another cluster is writing.
        ConfigError: images without labels, too few regions for the K sweep, bad embeddings, ``OUT/discovery.json``
            is a directory, an empty or unreadable vocabulary file.
    """
    check_not_being_written(cfg.run_dir)
    if (Path(cfg.out) / DISCOVERY_NAME).is_dir():  # found before the discovery runs, not when it is written
        raise ConfigError(f"{Path(cfg.out) / DISCOVERY_NAME} is a directory; remove it or choose another --out")
    rank, world = rank_world()
    phrases = None
    if cfg.names:  # a bad vocabulary file fails before the discovery, not after
        phrases = read_vocabulary(cfg.vocabulary) if cfg.vocabulary is not None else builtin_vocabulary()
    comm = TorchComm() if world > 1 else None
    region_shards = None
    if comm is not None:  # each rank reads the region embeddings of a contiguous run of shards
        n_shards = len((load_run_manifest(Path(cfg.run_dir)) or {}).get("shards", []))
        chunks = np.array_split(np.arange(n_shards), world)
        mine = chunks[rank]
        region_shards = range(int(mine[0]), int(mine[-1]) + 1) if mine.size else range(n_shards, n_shards)
    run = read_run(cfg.run_dir, region_shards=region_shards)
    record = RunRecord.from_dict(run.manifest)
    check_out(cfg.out, overwrite=cfg.overwrite)  # after the input checks, before the work
    data = run.data
    unlabeled = np.flatnonzero(data.labels < 0)
    if unlabeled.size:
        raise ConfigError(
            f"{cfg.run_dir}: {unlabeled.size} image(s) have no label (first: {data.ids[unlabeled[0]]}); discovery "
            "needs a labelled validation set"
        )
    text = torch.from_numpy(run.text_emb)
    image_probs = zero_shot_probs(torch.from_numpy(data.image_emb), text, temperature=cfg.temperature)
    region_probs = zero_shot_probs(torch.from_numpy(data.region_emb), text, temperature=cfg.temperature)
    if comm is not None:
        region_probs = comm.gather(region_probs)
    result = run_discover(
        cfg.discover,
        data.region_emb,
        data.num_regions,
        data.labels,
        image_probs,
        region_probs,
        seed=cfg.seed,
        on_k=on_k,
        comm=comm,
    )
    assert result.medoid_embeddings is not None
    names: list[list[dict[str, Any]]] | None = None
    naming = Naming()
    if phrases is not None:
        names, naming = _names(cfg, run, record, result, phrases, comm=comm, rank=rank)
    document = discovery_document(
        result,
        classes=run.classes,
        ids=data.ids,
        boxes=data.boxes,
        region_offsets=data.offsets,
        medoid_emb=result.medoid_embeddings,
        audit=Audit.of_run(record),
        names=names,
        naming=naming,
    )
    out = Path(cfg.out)
    path = out / DISCOVERY_NAME
    report = None
    # one writer of OUT: the lock (OUT/.lock) covers its staging folder until the finished folder is swapped in
    with directory_lock(out, command="cluster"):
        if rank == 0:
            with staged_dir(out, overwrite=cfg.overwrite) as stage:
                write_json_atomic(stage / DISCOVERY_NAME, document.to_dict())
                if cfg.report:
                    folder = Path(record.data_path).parent
                    write_report(document, stage / REPORT_NAME, image_folder=folder)
                    report = str(out / REPORT_NAME)
    barrier()
    return ClusterResult(path=str(path), discovery=result, document=document, report=report)
