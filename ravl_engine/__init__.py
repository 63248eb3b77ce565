"""ravl-engine: find and fix the image features a fine-tuned vision-language model has tied to a class by accident.

Implements RaVL (Varma et al., NeurIPS 2024). Public API::

    from ravl_engine import discover, DiscoverConfig

The names load on first use (PEP 562), so ``import ravl_engine`` and the command line's ``--help`` do not import
torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "DiscoverConfig": "ravl_engine.config",
    "ClassRow": "ravl_engine.discover",
    "DiscoveryResult": "ravl_engine.discover",
    "FeatureCluster": "ravl_engine.discover",
    "discover": "ravl_engine.discover",
    "run_discover": "ravl_engine.discover",
    "BackendError": "ravl_engine.errors",
    "ConfigError": "ravl_engine.errors",
    "RavlEngineError": "ravl_engine.errors",
    "RavlEngineWarning": "ravl_engine.errors",
    "ShardError": "ravl_engine.errors",
}

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

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ loads the same names
    from ravl_engine.config import DiscoverConfig
    from ravl_engine.discover import ClassRow, DiscoveryResult, FeatureCluster, discover, run_discover
    from ravl_engine.errors import BackendError, ConfigError, RavlEngineError, RavlEngineWarning, ShardError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ravl_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


class _Package(types.ModuleType):
    """The package's module type: ``ravl_engine.discover`` stays the function. Importing the submodule of the same
    name (``ravl_engine.discover``, which every stage does) makes the import system assign the submodule to this
    attribute; the setter ignores that, so ``from ravl_engine import discover`` gives the function whatever was
    imported first. The submodule itself is ``sys.modules["ravl_engine.discover"]``."""

    @property
    def discover(self) -> Any:
        return importlib.import_module("ravl_engine.discover").discover

    @discover.setter
    def discover(self, _value: Any) -> None:
        pass


sys.modules[__name__].__class__ = _Package
