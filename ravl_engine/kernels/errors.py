"""Exception types the kernels raise on purpose (the kernels import nothing of the engine; the engine maps these)."""

from __future__ import annotations


class KernelError(Exception):
    """Base class of the errors raised on purpose by ravl_engine.kernels."""


class BackendUnavailableError(KernelError, ImportError):
    """An optional search backend (faiss) is not importable; the message names the package and the alternative."""
