"""idx readers for the controlled digit sets."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from ravl_engine import ConfigError
from ravl_engine.data import load_mnist, read_idx

MNIST = Path(__file__).resolve().parent / "assets" / "mnist"


def _write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> Path:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def test_round_trip_plain_and_gzip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(_write_idx(tmp_path / "a-idx3-ubyte", images)), images)
    assert np.array_equal(read_idx(_write_idx(tmp_path / "a-idx3-ubyte.gz", images)), images)
    ints = np.array([1, -2, 300000], dtype=np.int32)
    assert np.array_equal(read_idx(_write_idx(tmp_path / "i-idx1", ints, code=0x0C)), ints)


def test_bad_files_name_the_file(tmp_path):
    bad = tmp_path / "bad-idx3-ubyte"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ConfigError, match="bad-idx3-ubyte: not an idx file"):
        read_idx(bad)
    short = _write_idx(tmp_path / "short-idx1-ubyte", np.zeros(10, dtype=np.uint8))
    short.write_bytes(short.read_bytes()[:-3])
    with pytest.raises(ConfigError, match="header says 10 values but the file holds 7"):
        read_idx(short)
    with pytest.raises(ConfigError, match="no t10k-images-idx3-ubyte"):
        load_mnist(tmp_path)


def test_mnist_sample_in_the_repository():
    images, labels = load_mnist(MNIST)
    assert images.shape == (200, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (200,) and np.bincount(labels).tolist() == [20] * 10
    assert 20 < images.mean() < 60 and images.max() == 255  # digits on black, as in MNIST
