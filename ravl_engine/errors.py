"""Exception and warning types raised by ravl-engine.

Every message names the offending argument, file or value and says how to fix it.
"""

from __future__ import annotations


class RavlEngineError(Exception):
    """Base class for all errors raised on purpose by ravl-engine."""


class ConfigError(RavlEngineError, ValueError):
    """An argument, option or input array is invalid; the message names it and the fix."""


class ShardError(RavlEngineError):
    """A run-directory shard is missing, corrupt or inconsistent with the manifest."""


class BackendError(RavlEngineError, ImportError):
    """An optional compute backend (faiss, ultralytics, ...) is missing or broken."""


class RavlEngineWarning(UserWarning):
    """Something was fixed up automatically (for example embeddings were re-normalised)."""
