"""What the controlled-data benchmarks share: where the MNIST idx files are by default."""

from __future__ import annotations

import argparse
from pathlib import Path

# the workspace's copy of the MNIST test set, beside the repository; pass --source for another folder or 'sklearn'
DEFAULT_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def add_source_option(parser: argparse.ArgumentParser) -> None:
    """The ``--source`` option of synth-based benchmarks (default DEFAULT_MNIST)."""
    parser.add_argument("--source", default=str(DEFAULT_MNIST), help="folder of MNIST idx files, or 'sklearn'")
