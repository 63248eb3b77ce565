"""ravl-engine: find and fix the image features a fine-tuned vision-language model has tied to a class by accident.

Implements RaVL (Varma et al., NeurIPS 2024). Public API::

    from ravl_engine import discover, DiscoverConfig
"""

from __future__ import annotations

from ravl_engine.config import DiscoverConfig
from ravl_engine.discover import ClassRow, DiscoveryResult, FeatureCluster, discover, run_discover
from ravl_engine.errors import BackendError, ConfigError, RavlEngineError, RavlEngineWarning, ShardError

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "ClassRow",
    "ConfigError",
    "DiscoverConfig",
    "DiscoveryResult",
    "FeatureCluster",
    "RavlEngineError",
    "RavlEngineWarning",
    "ShardError",
    "__version__",
    "discover",
    "run_discover",
]
