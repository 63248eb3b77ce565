"""RaVL stage 1, discovery: cluster region embeddings and find the clusters that drive zero-shot errors.

Entry points: :func:`discover` (arrays in, ranked feature clusters out) and :func:`run_discover` (the same with an
explicit :class:`~ravl_engine.config.DiscoverConfig`). The math lives in ``kernels/``; this module validates the
inputs, moves them to one device and dtype, and assembles the typed result.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from ravl_engine.config import DiscoverConfig
from ravl_engine.errors import BackendError, ConfigError, RavlEngineWarning
from ravl_engine.kernels.backends import get_backend
from ravl_engine.kernels.errors import BackendUnavailableError
from ravl_engine.kernels.kmedoids import kmedoids_sweep
from ravl_engine.kernels.scoring import ClusterScores, best_regions, rank_members, score_clusters, select_clusters
from ravl_engine.kernels.sharded import Comm, LocalComm, Shard, sharded_sweep

logger = logging.getLogger(__name__)

ArrayLike = np.ndarray | Tensor


@dataclass(frozen=True, slots=True)
class ClassRow:
    """One class of a cluster's table: accuracy on images with / without a region in the cluster."""

    class_index: int
    acc_present: float
    n_present: int
    acc_absent: float
    n_absent: int
    gap: float  # weighted gap G_c^y

    def to_dict(self) -> dict[str, Any]:
        return {
            "class_index": self.class_index,
            "acc_present": self.acc_present,
            "n_present": self.n_present,
            "acc_absent": self.acc_absent,
            "n_absent": self.n_absent,
            "gap": self.gap,
        }


@dataclass(frozen=True, slots=True)
class FeatureCluster:
    """A region cluster that passed RaVL's filter.

    Attributes:
        rank: 1 for the most spurious cluster.
        cluster_id: id in ``DiscoveryResult.assignments``.
        class_index: the correlated class, argmax over classes of (acc_present - acc_absent).
        gap: G_c, the sum of absolute weighted per-class gaps.
        influence: H_c.
        medoid: region index of the medoid.
        region_indices: [M] int64, the cluster's regions, most similar to the medoid first.
        similarities: [M] float, their cosine similarity to the medoid.
        table: per scored class, accuracy with / without the feature and counts.
    """

    rank: int
    cluster_id: int
    class_index: int
    gap: float
    influence: float
    medoid: int
    region_indices: np.ndarray
    similarities: np.ndarray
    table: tuple[ClassRow, ...]

    def to_dict(self, *, max_regions: int | None = None) -> dict[str, Any]:
        regions = self.region_indices if max_regions is None else self.region_indices[:max_regions]
        return {
            "rank": self.rank,
            "cluster_id": self.cluster_id,
            "class_index": self.class_index,
            "gap": self.gap,
            "influence": self.influence,
            "medoid": self.medoid,
            "n_regions": int(self.region_indices.shape[0]),
            "region_indices": regions.tolist(),
            "table": [row.to_dict() for row in self.table],
        }


@dataclass(frozen=True, slots=True)
class DiscoveryResult:
    """Output of :func:`discover`.

    Attributes:
        clusters: feature clusters that passed the filter, best first; may be empty.
        k: number of clusters chosen by the silhouette sweep (or fixed by the config).
        silhouettes: K -> mean cosine silhouette for every K tried.
        assignments: [R] int64, cluster of every region.
        medoids: [K] int64, region index of every cluster's medoid.
        gap_total: [K] float64, G_c of every cluster (filtered or not).
        influence: [K] float64, H_c of every cluster (-inf when no image qualifies).
        timings: seconds per step ("validate", "cluster", "score", "rank").
        sweep: per-K stats of the sweep (silhouette, iterations, seconds).
        medoid_embeddings: [K, D] float32, every cluster's medoid row (what mitigation assigns new regions to).
    """

    clusters: list[FeatureCluster]
    k: int
    silhouettes: dict[int, float]
    assignments: np.ndarray
    medoids: np.ndarray
    gap_total: np.ndarray
    influence: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    sweep: list[dict[str, Any]] = field(default_factory=list)
    medoid_embeddings: np.ndarray | None = None

    def to_dict(self, *, max_regions: int | None = 100) -> dict[str, Any]:
        """JSON-ready summary; each cluster lists at most ``max_regions`` region indices (None: all)."""
        return {
            "k": self.k,
            "silhouettes": {str(k): v for k, v in self.silhouettes.items()},
            "n_regions": int(self.assignments.shape[0]),
            "clusters": [c.to_dict(max_regions=max_regions) for c in self.clusters],
            "timings": self.timings,
        }


def _as_tensor(name: str, value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach()
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError) as err:
        raise ConfigError(f"{name} must be a numpy array or torch tensor; got {type(value).__name__}") from err


def _as_index(name: str, value: Any, *, length: int | None = None) -> Tensor:
    t = _as_tensor(name, value)
    if t.ndim != 1:
        raise ConfigError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ConfigError(f"{name} must hold integers, got dtype {t.dtype}")
    if length is not None and t.shape[0] != length:
        raise ConfigError(f"{name} has {t.shape[0]} entries but there are {length} images (len(num_regions))")
    return t.to(torch.int64)


def _as_float_matrix(
    name: str, value: Any, *, rows: int, rows_from: str, cols: int | None = None, row_offset: int = 0
) -> Tensor:
    t = _as_tensor(name, value)
    if t.ndim != 2:
        raise ConfigError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        raise ConfigError(f"{name} must be a float array, got dtype {t.dtype}")
    if t.shape[0] != rows:
        raise ConfigError(f"{name} has {t.shape[0]} rows but {rows_from} says {rows}")
    if cols is not None and t.shape[1] != cols:
        raise ConfigError(f"{name} has {t.shape[1]} columns but image_scores has {cols} classes")
    for start in range(0, t.shape[0], 65536):  # in blocks: no [R, D] bool temporary
        block = t[start : start + 65536]
        if bool(torch.isfinite(block.sum(dim=1)).all()):  # a NaN or inf entry makes its row's sum non-finite
            continue
        bad = ~torch.isfinite(block).all(dim=1)  # (or the sum overflowed: look at the entries)
        if bool(bad.any()):
            row = row_offset + start + int(bad.nonzero()[0, 0])
            raise ConfigError(f"{name} row {row} contains NaN or inf; drop or fix that row")
    return t


def _check_probabilities(name: str, scores: Tensor) -> None:
    # the influence score compares softmax probabilities across regions: logits would rank regions differently
    bad = (scores < 0).any(1) | ((scores.sum(1) - 1.0).abs() > 1e-3)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ConfigError(
            f"{name} must hold softmax probabilities (rows >= 0 summing to 1) but row {row} does not; "
            "apply softmax(logits / temperature) first"
        )


def _check_norms(x: Tensor, cfg: DiscoverConfig, n_regions: int, offset: int) -> Tensor:
    norms = x.norm(dim=1)
    if bool((norms == 0).any()):
        raise ConfigError(
            f"region_embeddings row {offset + int((norms == 0).nonzero()[0, 0])} is all zeros and has no "
            "direction; drop that region"
        )
    off = (norms - 1.0).abs() > cfg.norm_tolerance
    if bool(off.any()):
        row = int(off.nonzero()[0, 0])
        msg = (
            f"region_embeddings: {int(off.sum())} of {n_regions} rows are not unit-norm (row {offset + row} has "
            f"norm {float(norms[row]):.4g})"
        )
        if cfg.normalize == "error":
            raise ConfigError(msg + "; L2-normalise them or use normalize='warn'")
        warnings.warn(msg + "; re-normalised them", RavlEngineWarning, stacklevel=5)
        x = x / norms[:, None]
    return x


T = TypeVar("T")


def _collectively(comm: Comm | None, check: Callable[[], T]) -> T:
    """Run a check of this rank's rows; if it fails on any rank, every rank raises (none waits forever)."""
    try:
        out, error = check(), None
    except ConfigError as err:
        out, error = None, err
    if comm is not None and comm.world > 1:
        failed = int(comm.max(torch.tensor([0 if error is None else 1]))[0])
        if failed and error is None:
            raise ConfigError("region_embeddings: another rank found bad rows (its error names them)")
    if error is not None:
        raise error
    return out  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class _Inputs:
    x: Tensor
    num_regions: Tensor
    region_image: Tensor
    image_labels: Tensor
    image_pred: Tensor
    region_scores: Tensor
    num_classes: int


def _validate(
    region_embeddings: Any,
    num_regions: Any,
    image_labels: Any,
    image_scores: Any,
    region_scores: Any,
    cfg: DiscoverConfig,
    comm: Comm | None = None,
) -> _Inputs:
    counts = _as_index("num_regions", num_regions)
    n_images = counts.shape[0]
    if n_images == 0:
        raise ConfigError("num_regions is empty: discovery needs at least one image")
    if bool((counts < 0).any()):
        raise ConfigError(f"num_regions must be >= 0; entry {int((counts < 0).nonzero()[0, 0])} is negative")
    n_regions = int(counts.sum())
    local_rows, offset = n_regions, 0
    if comm is not None:  # this rank holds rows offset .. offset + local_rows of the region embeddings
        shape = _as_tensor("region_embeddings", region_embeddings).shape
        local_rows = int(shape[0]) if len(shape) else 0
        sizes = comm.gather(torch.tensor([local_rows], dtype=torch.int64))
        offset = int(sizes[: comm.rank].sum())
        if int(sizes.sum()) != n_regions:
            raise ConfigError(
                f"region_embeddings: the ranks hold {int(sizes.sum())} rows together but sum(num_regions) says "
                f"{n_regions}"
            )
    x = _collectively(
        comm,
        lambda: _as_float_matrix(
            "region_embeddings",
            region_embeddings,
            rows=local_rows,
            rows_from="sum(num_regions)" if comm is None else "this rank's share",
            row_offset=offset,
        ),
    )
    if x.shape[1] < 1:
        raise ConfigError("region_embeddings has 0 columns; pass [R, D] embeddings with D >= 1")
    img_scores = _as_float_matrix("image_scores", image_scores, rows=n_images, rows_from="len(num_regions)")
    num_classes = img_scores.shape[1]
    if num_classes < 2:
        raise ConfigError(f"image_scores has {num_classes} class column(s); discovery needs at least 2 classes")
    reg_scores = _as_float_matrix(
        "region_scores", region_scores, rows=n_regions, rows_from="sum(num_regions)", cols=num_classes
    )
    _check_probabilities("image_scores", img_scores)
    _check_probabilities("region_scores", reg_scores)
    labels = _as_index("image_labels", image_labels, length=n_images)
    out_of_range = (labels < 0) | (labels >= num_classes)
    if bool(out_of_range.any()):
        i = int(out_of_range.nonzero()[0, 0])
        raise ConfigError(
            f"image_labels[{i}] = {int(labels[i])} is not a class index in [0, {num_classes}) "
            "(image_scores has that many columns)"
        )

    ks = cfg.k_values(num_classes)
    if max(ks) > n_regions - 1:
        raise ConfigError(
            f"region_embeddings has {n_regions} rows, too few for K = {max(ks)} clusters (silhouette needs at "
            f"least K + 1 regions); pass more regions or a smaller K (config k / k_max_factor)"
        )

    device = torch.device(cfg.device) if cfg.device is not None else x.device
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    x = x.to(device=device, dtype=dtype)
    x = _collectively(comm, lambda: _check_norms(x, cfg, n_regions, offset))

    region_image = torch.repeat_interleave(torch.arange(n_images), counts)
    return _Inputs(
        x=x,
        num_regions=counts.to(device),
        region_image=region_image.to(device),
        image_labels=labels.to(device),
        # argmax takes the first maximum, like numpy's argmax in the reference
        image_pred=img_scores.argmax(1).to(device),
        region_scores=reg_scores.to(device),
        num_classes=num_classes,
    )


def _table(scores: ClusterScores, c: int) -> tuple[ClassRow, ...]:
    # one tolist per column: reading tensor elements one at a time costs more than the whole discovery's scoring
    columns = zip(
        scores.acc_present[c].tolist(),
        scores.n_present[c].tolist(),
        scores.acc_absent[c].tolist(),
        scores.n_absent[c].tolist(),
        scores.gap[c].tolist(),
        scores.scored[c].tolist(),
        strict=True,
    )
    return tuple(
        ClassRow(
            class_index=y,
            acc_present=float(ap),
            n_present=int(np_),
            acc_absent=float(aa),
            n_absent=int(na),
            gap=float(g),
        )
        for y, (ap, np_, aa, na, g, scored) in enumerate(columns)
        if scored
    )


@dataclass(frozen=True)
class _Clustering:
    """The K sweep's outcome, wherever the rows live: the chosen fit and how to rank one cluster's members."""

    k: int
    silhouettes: dict[int, float]
    stats: list[dict[str, Any]]
    labels: Tensor  # [R] every region's cluster (gathered across ranks when sharded)
    medoids: Tensor  # [K] global region indices
    medoid_embeddings: Tensor  # [K, D]
    members: Callable[[int], tuple[Tensor, Tensor]]  # cluster -> (region indices, similarity to the medoid), best first


def _cluster_local(
    inp: _Inputs,
    ks: list[int],
    cfg: DiscoverConfig,
    backend: Any,
    generator: torch.Generator,
    on_k: Callable[[dict[str, Any]], None] | None,
) -> _Clustering:
    """The K sweep in one process (cached or search fit, per ``cfg.strategy``)."""
    sweep = kmedoids_sweep(
        inp.x,
        ks,
        generator=generator,
        max_iter=cfg.max_iter,
        clip=cfg.clip_distance,
        strategy=cfg.strategy,
        backend=backend,
        n_trials=cfg.init_trials,
        block_size=cfg.block_size,
        memory_budget=cfg.memory_budget_mb << 20,
        on_k=on_k,
    )
    labels, medoids = sweep.fit.labels, sweep.fit.medoids
    return _Clustering(
        k=sweep.k,
        silhouettes=sweep.silhouettes,
        stats=sweep.stats,
        labels=labels,
        medoids=medoids,
        medoid_embeddings=inp.x[medoids],
        members=lambda c: rank_members(inp.x, labels, c, int(medoids[c])),
    )


def _cluster_sharded(
    inp: _Inputs,
    ks: list[int],
    cfg: DiscoverConfig,
    backend: Any,
    generator: torch.Generator,
    on_k: Callable[[dict[str, Any]], None] | None,
    comm: Comm,
) -> _Clustering:
    """The K sweep over rows spread across ranks (``inp.x`` is this rank's share); every rank gets the same result."""
    if cfg.clip_distance:
        raise ConfigError("clip_distance=True is not available for sharded (multi-process) discovery")
    sweep = sharded_sweep(
        inp.x,
        ks,
        comm,
        generator=generator,
        max_iter=cfg.max_iter,
        n_trials=cfg.init_trials,
        backend=backend,
        block_size=cfg.block_size,
        on_k=on_k,
    )
    local_labels = sweep.fit.labels
    labels = comm.gather(local_labels)
    assert sweep.shard is not None  # a sharded sweep says where this rank's rows are
    shard = sweep.shard
    medoid_emb = shard.rows(sweep.fit.medoids.cpu(), comm)
    return _Clustering(
        k=sweep.k,
        silhouettes=sweep.silhouettes,
        stats=sweep.stats,
        labels=labels,
        medoids=sweep.fit.medoids.to(labels.device),
        medoid_embeddings=medoid_emb,
        members=lambda c: _rank_members_sharded(shard, local_labels, c, medoid_emb[c], comm),
    )


def run_discover(
    cfg: DiscoverConfig,
    region_embeddings: ArrayLike,
    num_regions: ArrayLike,
    image_labels: ArrayLike,
    image_scores: ArrayLike,
    region_scores: ArrayLike,
    *,
    seed: int = 0,
    on_k: Callable[[dict[str, Any]], None] | None = None,
    comm: Comm | None = None,
) -> DiscoveryResult:
    """Run discovery with an explicit config. See :func:`discover` for the arguments.

    With ``comm`` (a multi-process run: :class:`~ravl_engine.distributed.TorchComm`), ``region_embeddings`` is this
    rank's contiguous share of the rows (ranks in order) and every other array is the whole run's; clustering runs the
    sharded K-medoids and every rank returns the same result. ``strategy="sharded"`` runs that code in one process.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if comm is None and cfg.strategy == "sharded":
        comm = LocalComm()
    inp = _validate(region_embeddings, num_regions, image_labels, image_scores, region_scores, cfg, comm)
    timings["validate"] = time.perf_counter() - t0
    logger.info(
        "discover: %d regions x %d dims, %d images, %d classes, device %s",
        inp.x.shape[0],
        inp.x.shape[1],
        inp.num_regions.shape[0],
        inp.num_classes,
        inp.x.device,
    )

    t0 = time.perf_counter()
    try:
        backend = get_backend(cfg.backend, device=inp.x.device, block_size=cfg.block_size)
    except BackendUnavailableError as err:  # the engine's error type at the kernel boundary, same message
        raise BackendError(str(err)) from err
    generator = torch.Generator().manual_seed(seed)
    ks = cfg.k_values(inp.num_classes)
    if comm is None:
        fit = _cluster_local(inp, ks, cfg, backend, generator, on_k)
    else:
        fit = _cluster_sharded(inp, ks, cfg, backend, generator, on_k, comm)
    timings["cluster"] = time.perf_counter() - t0
    logger.info("discover: K = %d (silhouette %.4f)", fit.k, fit.silhouettes[fit.k])

    t0 = time.perf_counter()
    best = best_regions(inp.region_scores, inp.region_image, inp.image_pred, inp.num_regions.shape[0])
    scores = score_clusters(
        fit.labels,
        fit.k,
        region_image=inp.region_image,
        num_regions=inp.num_regions,
        image_labels=inp.image_labels,
        image_pred=inp.image_pred,
        best_region=best,
        num_classes=inp.num_classes,
        skip_single_region=cfg.skip_single_region_images,
    )
    kept = select_clusters(
        scores, influence_threshold=cfg.influence_threshold, two_sign_rule=cfg.two_sign_rule
    ).tolist()
    timings["score"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    clusters = []
    for rank, c in enumerate(kept, start=1):
        members, sims = fit.members(c)
        clusters.append(
            FeatureCluster(
                rank=rank,
                cluster_id=c,
                class_index=int(scores.class_index[c]),
                gap=float(scores.gap_total[c]),
                influence=float(scores.influence[c]),
                medoid=int(fit.medoids[c]),
                region_indices=members.cpu().numpy(),
                similarities=sims.cpu().numpy(),
                table=_table(scores, c),
            )
        )
    timings["rank"] = time.perf_counter() - t0
    logger.info("discover: %d of %d clusters passed the filter", len(clusters), fit.k)
    return DiscoveryResult(
        clusters=clusters,
        k=fit.k,
        silhouettes=fit.silhouettes,
        assignments=fit.labels.cpu().numpy(),
        medoids=fit.medoids.cpu().numpy(),
        gap_total=scores.gap_total.cpu().numpy(),
        influence=scores.influence.cpu().numpy(),
        timings=timings,
        sweep=fit.stats,
        medoid_embeddings=fit.medoid_embeddings.float().cpu().numpy(),
    )


def _rank_members_sharded(
    shard: Shard, local_labels: Tensor, cluster: int, medoid: Tensor, comm: Comm
) -> tuple[Tensor, Tensor]:
    """:func:`~ravl_engine.kernels.scoring.rank_members` over sharded rows: local similarities, gathered in rank
    (= index) order, then one stable sort, so ties keep the lower index as in one process."""
    members = (local_labels == cluster).nonzero().squeeze(1)
    sims = comm.gather(shard.x[members] @ medoid.to(shard.x.dtype))
    members = comm.gather(members + shard.offset)
    order = torch.sort(sims, descending=True, stable=True).indices
    return members[order], sims[order]


def discover(
    region_embeddings: ArrayLike,
    num_regions: ArrayLike,
    image_labels: ArrayLike,
    image_scores: ArrayLike,
    region_scores: ArrayLike,
    *,
    seed: int = 0,
    config: DiscoverConfig | None = None,
    on_k: Callable[[dict[str, Any]], None] | None = None,
) -> DiscoveryResult:
    """Find region clusters that a fine-tuned VLM has tied to a class (RaVL discovery).

    Args:
        region_embeddings: [R, D] float, L2-normalised region embeddings, regions of image 0 first, then image 1...
            Rows that are not unit-norm are re-normalised with a ``RavlEngineWarning`` (``normalize="error"``
            refuses them instead).
        num_regions: [N] int, regions per image, in image order; sums to R.
        image_labels: [N] int, true class index of each image, in [0, C).
        image_scores: [N, C] float, zero-shot softmax probabilities of each image.
        region_scores: [R, C] float, zero-shot softmax probabilities of each region.
        seed: seeds the k-medoids++ initialisation; same seed and inputs, same result.
        config: options (K sweep, filter rules, backend, device); default ``DiscoverConfig()``.
        on_k: called after each K of the sweep with its stats (for progress bars).

    Returns:
        DiscoveryResult; ``result.clusters`` is ranked, best first, and empty when no cluster passes the filter.

    Raises:
        ConfigError: inputs with wrong shapes, mismatched lengths, NaN/inf rows, zero rows, labels outside the
            classes, scores that are not probabilities, or fewer regions than the largest K needs.

    Example:
        >>> result = discover(region_emb, num_regions, labels, image_probs, region_probs, seed=0)
        >>> top = result.clusters[0]
        >>> top.class_index, top.gap, top.influence, top.region_indices[:10]
    """
    return run_discover(
        config or DiscoverConfig(),
        region_embeddings,
        num_regions,
        image_labels,
        image_scores,
        region_scores,
        seed=seed,
        on_k=on_k,
    )
