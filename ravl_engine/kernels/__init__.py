"""Pure tensor kernels for ravl-engine: no I/O, no global state; device and dtype follow the inputs."""

from __future__ import annotations

from ravl_engine.kernels.backends import ClusterBackend, FaissBackend, TorchBackend, get_backend
from ravl_engine.kernels.kmedoids import KMedoidsResult, SweepResult, fit_kmedoids, fit_kmedoids_batch, kmedoids_sweep
from ravl_engine.kernels.scoring import ClusterScores, best_regions, rank_members, score_clusters, select_clusters
from ravl_engine.kernels.seeding import kmedoids_pp_init
from ravl_engine.kernels.segment import segment_argmax, segment_argmin
from ravl_engine.kernels.sharded import fit_kmedoids_search
from ravl_engine.kernels.silhouette import (
    cosine_silhouette,
    pairwise_distance_sums,
    silhouette_from_gram,
    silhouette_from_sums,
    silhouette_is_defined,
)

__all__ = [
    "ClusterBackend",
    "ClusterScores",
    "FaissBackend",
    "KMedoidsResult",
    "SweepResult",
    "TorchBackend",
    "best_regions",
    "cosine_silhouette",
    "get_backend",
    "fit_kmedoids",
    "fit_kmedoids_batch",
    "fit_kmedoids_search",
    "kmedoids_pp_init",
    "kmedoids_sweep",
    "pairwise_distance_sums",
    "rank_members",
    "score_clusters",
    "segment_argmax",
    "segment_argmin",
    "select_clusters",
    "silhouette_from_gram",
    "silhouette_from_sums",
    "silhouette_is_defined",
]
