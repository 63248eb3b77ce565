"""Image data sources: MNIST-style idx files (the controlled digit sets)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from ravl_engine.errors import ConfigError

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.int16, 0x0C: np.int32, 0x0D: np.float32, 0x0E: np.float64}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (the MNIST / Fashion-MNIST format), gzipped or not.

    Raises:
        ConfigError: the file is not a valid idx file (the message names it).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read idx file ({err})") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ConfigError(f"{path}: not an idx file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]]).newbyteorder(">")
    count = int(np.prod(dims))
    body = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    if body.size != count:
        raise ConfigError(f"{path}: idx header says {count} values but the file holds {body.size}")
    return body.reshape(dims).astype(dtype.newbyteorder("="))


def load_mnist(folder: str | Path, *, split: str = "t10k") -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 28, 28] uint8 and labels [N] int64 from ``{split}-images-idx3-ubyte[.gz]`` in ``folder``."""
    folder = Path(folder)
    found = {}
    for kind in ("images-idx3", "labels-idx1"):
        for suffix in (".gz", ""):
            candidate = folder / f"{split}-{kind}-ubyte{suffix}"
            if candidate.exists():
                found[kind] = candidate
                break
        else:
            raise ConfigError(f"{folder}: no {split}-{kind}-ubyte[.gz]; point at a folder with MNIST idx files")
    images, labels = read_idx(found["images-idx3"]), read_idx(found["labels-idx1"])
    if images.shape[0] != labels.shape[0]:
        raise ConfigError(f"{folder}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels.astype(np.int64)
