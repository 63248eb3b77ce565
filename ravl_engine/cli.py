"""The ``ravl-engine`` command line: a thin layer over the stage APIs.

Every command prints a JSON summary on stdout; logs and progress go to stderr. Library errors become one-line
click errors with a non-zero exit code.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from ravl_engine import __version__
from ravl_engine.errors import RavlEngineError

logger = logging.getLogger(__name__)

ARRAY_KEYS = ("region_embeddings", "num_regions", "image_labels", "image_scores", "region_scores")


def _emit(summary: dict[str, Any]) -> None:
    click.echo(json.dumps(summary, indent=2, default=float))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="ravl-engine")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
def main(verbose: int) -> None:
    """ravl-engine: find the image features a fine-tuned CLIP-style model has tied to a class by accident
    (RaVL, NeurIPS 2024), rank them, and fine-tune them away."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


@main.command("discover")
@click.argument("arrays", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), help="Write the full result here.")
@click.option("--seed", default=0, show_default=True, help="Seed of the k-medoids++ initialisation.")
@click.option("--k", "k", type=int, default=None, help="Fixed number of clusters (default: silhouette sweep).")
@click.option("--clip-distance", is_flag=True, help="The released code's clipped cosine distance (slow, O(N^2)).")
@click.option("--strategy", type=click.Choice(["auto", "cached", "search"]), default="auto", show_default=True)
@click.option("--backend", type=click.Choice(["auto", "torch", "faiss"]), default="auto", show_default=True)
@click.option("--device", default=None, help="torch device (cpu, cuda, cuda:1); default cpu.")
@click.option("--top", default=10, show_default=True, help="Regions per cluster in the printed summary.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def discover_cmd(
    arrays: Path,
    out: Path | None,
    seed: int,
    k: int | None,
    clip_distance: bool,
    strategy: str,
    backend: str,
    device: str | None,
    top: int,
    progress: bool,
) -> None:
    """Run RaVL discovery on precomputed arrays.

    ARRAYS is an .npz file with region_embeddings [R, D], num_regions [N], image_labels [N], image_scores [N, C]
    and region_scores [R, C] (softmax probabilities), the inputs of ravl_engine.discover().
    """
    import numpy as np  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    from ravl_engine.config import DiscoverConfig  # noqa: PLC0415
    from ravl_engine.discover import run_discover  # noqa: PLC0415

    try:
        with np.load(arrays) as data:
            missing = [key for key in ARRAY_KEYS if key not in data.files]
            if missing:
                raise click.ClickException(
                    f"{arrays}: missing array(s) {', '.join(missing)}; the file needs {', '.join(ARRAY_KEYS)}"
                )
            inputs = [data[key] for key in ARRAY_KEYS]
    except (OSError, ValueError) as err:
        raise click.ClickException(f"{arrays}: not a readable .npz file ({err})") from err
    try:
        cfg = DiscoverConfig(k=k, clip_distance=clip_distance, strategy=strategy, backend=backend, device=device)
        n_k = len(cfg.k_values(inputs[3].shape[1] if inputs[3].ndim == 2 else 2))
        with tqdm(total=n_k, desc="K sweep", unit="K", file=sys.stderr, disable=not progress) as bar:
            result = run_discover(cfg, *inputs, seed=seed, on_k=lambda _entry: bar.update(1))
    except RavlEngineError as err:
        raise click.ClickException(str(err)) from err
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result.to_dict(max_regions=None), default=float))
        tmp.replace(out)
    summary = result.to_dict(max_regions=top)
    summary["out"] = str(out) if out is not None else None
    _emit(summary)


if __name__ == "__main__":
    main()
