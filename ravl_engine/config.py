"""Frozen, keyword-only configuration dataclasses, one per stage.

Override fields with ``dataclasses.replace``; build from a mapping (a TOML table, a JSON object) with
``from_dict``, which rejects unknown keys instead of silently dropping them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

from ravl_engine.errors import ConfigError

T = TypeVar("T")

Backend = Literal["auto", "torch", "faiss"]
Strategy = Literal["auto", "cached", "search", "sharded"]
NormalizeMode = Literal["warn", "error"]
BACKENDS: tuple[str, ...] = get_args(Backend)
STRATEGIES: tuple[str, ...] = get_args(Strategy)
NORMALIZE_MODES: tuple[str, ...] = get_args(NormalizeMode)


def config_from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build the config dataclass ``cls`` from ``data``; unknown keys raise ConfigError listing the valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} option(s): {', '.join(unknown)}; valid options are {', '.join(sorted(names))}"
        )
    return cls(**dict(data))


@dataclass(frozen=True, slots=True, kw_only=True)
class DiscoverConfig:
    """Options of RaVL discovery (stage 1). Defaults follow the released RaVL code.

    Attributes:
        k: a fixed number of clusters; None (default) sweeps K and keeps the best silhouette.
        k_min_factor: the sweep starts at ``k_min_factor * C`` (C = number of classes). Default 2.
        k_max_factor: the sweep ends at ``k_max_factor * C``. Default 5.
        k_max_inclusive: include the upper end (the paper's wording); default False (the released code's
            ``range(2C, 5C)``).
        max_iter: K-medoids iteration cap per K (the reference's default, 300).
        clip_distance: use the released code's clipped distance ``clip(1 - cos, 0, 1)``; O(N^2 d) time. Default
            False: the plain cosine distance, which allows the O(N K d) kernels.
        influence_threshold: keep clusters with influence H_c >= this (0.25 in the paper and code).
        two_sign_rule: also require a class with positive and one with negative gap (released code). Default True.
        skip_single_region_images: leave one-region images out of the influence score (released code). Default
            True.
        strategy: K-medoids strategy: "cached" keeps [K, N] similarity tables and runs the sweep's fits in
            lockstep (fastest); "search" keeps none and assigns by top-1 search each iteration (for N x K too large
            to cache); "sharded" is the search iteration written for rows spread over torch.distributed ranks (the
            code path of a multi-process run, here with one process); "auto" (default) caches when two [max K, N]
            tables fit ``memory_budget_mb``, and is "sharded" under a multi-process launch.
        memory_budget_mb: MiB for the cached strategy's tables; more lets more K values run in one batch.
        backend: top-1 search backend of the "search" strategy: "auto" (Faiss for CUDA inputs when faiss sees a
            GPU, else torch blocked matmul, the faster one on CPU), "torch" or "faiss".
        device: run on this torch device ("cpu", "cuda", "cuda:1"); None keeps the inputs' device.
        block_size: rows per block in blocked kernels.
        normalize: what to do with embeddings whose rows are not unit-norm: "warn" (re-normalise and warn) or
            "error".
        norm_tolerance: a row counts as unit-norm when | |x| - 1 | <= this.
        init_trials: k-medoids++ candidates per center; None uses 2 + int(log(K_max)).
    """

    k: int | None = None
    k_min_factor: int = 2
    k_max_factor: int = 5
    k_max_inclusive: bool = False
    max_iter: int = 300
    clip_distance: bool = False
    influence_threshold: float = 0.25
    two_sign_rule: bool = True
    skip_single_region_images: bool = True
    strategy: Strategy = "auto"
    memory_budget_mb: int = 1024
    backend: Backend = "auto"
    device: str | None = None
    block_size: int = 65536
    normalize: NormalizeMode = "warn"
    norm_tolerance: float = 1e-3
    init_trials: int | None = None

    def __post_init__(self) -> None:
        if self.k is not None and self.k < 2:
            raise ConfigError(f"k must be >= 2 (or None to sweep), got {self.k}")
        if self.k_min_factor < 1 or self.k_max_factor < self.k_min_factor:
            raise ConfigError(
                f"need 1 <= k_min_factor <= k_max_factor, got k_min_factor={self.k_min_factor}, "
                f"k_max_factor={self.k_max_factor}"
            )
        if not self.k_max_inclusive and self.k_max_factor == self.k_min_factor:
            raise ConfigError(
                "the K sweep is empty: k_max_factor equals k_min_factor with an exclusive upper end; "
                "raise k_max_factor or set k_max_inclusive=True"
            )
        if self.max_iter < 1:
            raise ConfigError(f"max_iter must be >= 1, got {self.max_iter}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.strategy in ("search", "sharded") and self.clip_distance:
            raise ConfigError(f"clip_distance=True needs strategy 'cached' or 'auto', not {self.strategy!r}")
        if self.memory_budget_mb < 1:
            raise ConfigError(f"memory_budget_mb must be >= 1, got {self.memory_budget_mb}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {self.block_size}")
        if self.normalize not in NORMALIZE_MODES:
            raise ConfigError(f"normalize must be one of {', '.join(NORMALIZE_MODES)}, got {self.normalize!r}")
        if not self.norm_tolerance > 0:
            raise ConfigError(f"norm_tolerance must be > 0, got {self.norm_tolerance}")
        if self.init_trials is not None and self.init_trials < 1:
            raise ConfigError(f"init_trials must be >= 1 (or None), got {self.init_trials}")

    def k_values(self, num_classes: int) -> list[int]:
        """The K values to try for ``num_classes`` classes."""
        if self.k is not None:
            return [self.k]
        stop = self.k_max_factor * num_classes + (1 if self.k_max_inclusive else 0)
        return list(range(self.k_min_factor * num_classes, stop))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiscoverConfig:
        """Build from a mapping; unknown keys raise ConfigError."""
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
