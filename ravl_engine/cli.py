"""The ``ravl-engine`` command line: a thin layer over the stage APIs.

Every command prints a JSON summary on stdout; logs, progress and the summary's warnings go to stderr. Library, OS
and decoding errors of any command become one-line click errors with exit status 1 (in :class:`_Main`, once);
Ctrl-C exits 130.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

from ravl_engine import __version__
from ravl_engine.errors import RavlEngineError

logger = logging.getLogger(__name__)

ARRAY_KEYS = ("region_embeddings", "num_regions", "image_labels", "image_scores", "region_scores")
# commands whose rerun picks up where an interrupted run stopped (committed shards are kept)
RESUMABLE = frozenset({"embed"})
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT
_OS_HINTS = {
    errno.ENOSPC: "free some disk space or write elsewhere",
    errno.EDQUOT: "free some disk space or write elsewhere",
    errno.EACCES: "choose a location you can write to",
    errno.EPERM: "choose a location you can write to",
    errno.EROFS: "the file system is read-only; choose another location",
}


def _emit(summary: dict[str, Any]) -> None:
    for warning in summary.get("warnings") or ():
        click.echo(f"Warning: {warning}", err=True)
    click.echo(json.dumps(summary, indent=2, default=float))


def error_line(err: Exception) -> str:
    """One line for an engine error, an OS error (with the file and a fix) or undecodable text."""
    if isinstance(err, OSError) and err.strerror:
        where = f"{err.filename}: " if err.filename is not None else ""
        hint = _OS_HINTS.get(err.errno or 0)
        text = f"{where}{err.strerror}" + (f"; {hint}" if hint else "")
    elif isinstance(err, UnicodeDecodeError):
        text = f"an input file is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


class _Main(click.Group):
    """The command group; the one place where failures of any command become one line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            resume = ctx.invoked_subcommand in RESUMABLE
            hint = "; rerun the same command to resume where it stopped" if resume else ""
            click.echo(f"Interrupted{hint}", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
        except (RavlEngineError, OSError, UnicodeDecodeError) as err:
            raise click.ClickException(error_line(err)) from err


def _device(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """--device checked once, before any work (an unknown name or a GPU that is not there)."""
    from ravl_engine.distributed import check_device  # noqa: PLC0415

    if value is None:
        return None
    try:
        return check_device(value)
    except RavlEngineError as err:
        raise click.ClickException(f"--device {err}") from err  # one line, without click's usage block


F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def _launched(device: str, *, progress: bool, **bar: Any) -> Iterator[tuple[Any, int, int]]:
    """Join the process group a torchrun launch describes (nothing otherwise); yield (progress bar, rank, world
    size), the bar drawn on stderr by rank 0 only."""
    from tqdm import tqdm  # noqa: PLC0415

    from ravl_engine.distributed import init_from_env, rank_world  # noqa: PLC0415

    init_from_env(device)
    rank, world = rank_world()
    # delay: no empty bar for work that fails or ends within half a second
    with tqdm(file=sys.stderr, disable=not progress or rank != 0, delay=0.5, **bar) as pbar:
        yield pbar, rank, world


resize_option = click.option(
    "--resize",
    type=click.Choice(["squash", "pad"]),
    default="squash",
    show_default=True,
    help="How images fit the model's square input: squash (stretch) or pad (letterbox, keeps the aspect ratio).",
)
overwrite_option = click.option(
    "--overwrite", is_flag=True, help="Replace an existing --out (default: refuse); old and new outputs never mix."
)


def discovery_options(command: F) -> F:
    """The options shared by every command that runs discovery."""
    options = [
        click.option("--seed", default=0, show_default=True, help="Seed of the k-medoids++ initialisation."),
        click.option("--k", "k", type=int, default=None, help="Fixed number of clusters (default: silhouette sweep)."),
        click.option("--clip-distance", is_flag=True, help="The released code's clipped cosine distance (O(N^2))."),
        click.option(
            "--strategy", type=click.Choice(["auto", "cached", "search", "sharded"]), default="auto", show_default=True
        ),
        click.option("--backend", type=click.Choice(["auto", "torch", "faiss"]), default="auto", show_default=True),
        click.option("--device", default=None, callback=_device, help="torch device (cpu, cuda, cuda:1); default cpu."),
        click.option("--top", default=10, show_default=True, help="Regions per cluster in the printed summary."),
        click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
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
@overwrite_option
@discovery_options
def discover_cmd(
    arrays: Path,
    out: Path | None,
    overwrite: bool,
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
    from ravl_engine.outputs import check_not_input, check_out  # noqa: PLC0415

    if out is not None:
        check_not_input(out, {"ARRAYS": arrays})
        check_out(out, overwrite=overwrite)
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
    cfg = DiscoverConfig(k=k, clip_distance=clip_distance, strategy=strategy, backend=backend, device=device)
    n_k = len(cfg.k_values(inputs[3].shape[1] if inputs[3].ndim == 2 else 2))
    with tqdm(total=n_k, desc="K sweep", unit="K", file=sys.stderr, disable=not progress, delay=0.5) as bar:
        result = run_discover(cfg, *inputs, seed=seed, on_k=lambda _entry: bar.update(1))
    if out is not None:
        from ravl_engine.shards import write_json_atomic  # noqa: PLC0415

        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, result.to_dict(max_regions=None))
    summary = result.to_dict(max_regions=top)
    summary["out"] = str(out) if out is not None else None
    _emit(summary)


def _split_csv(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    return items or None


def _parse_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """KEY=VALUE proposer options; values are parsed as JSON when they can be (numbers, null, true)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--proposer-option")
        key, value = pair.split("=", 1)
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


@main.command("embed")
@click.option("--data", "data", required=True, type=click.Path(dir_okay=False), help="Manifest: CSV, JSONL or Parquet.")
@click.option(
    "--out", "out", required=True, type=click.Path(file_okay=False), help="Run directory (resumed if present)."
)
@click.option("--model", default="ravl-tiny-rn", show_default=True, help="open_clip architecture or tiny config.")
@click.option("--pretrained", default=None, help="open_clip pretrained tag or local checkpoint file.")
@click.option("--proposer", default="quadrants", show_default=True, help="quadrants, grid, manifest, rpn, yolo, ...")
@click.option("--proposer-option", "proposer_options", multiple=True, help="KEY=VALUE for the proposer (repeatable).")
@click.option("--max-boxes", type=int, default=None, help="Keep at most this many boxes per image.")
@click.option("--min-box-size", type=float, default=1.0, show_default=True, help="Drop boxes smaller than this (px).")
@click.option("--score-threshold", type=float, default=None, help="Drop proposals scoring below this.")
@click.option(
    "--whole-image/--no-whole-image", default=False, show_default=True, help="Add the whole image as a region."
)
@click.option(
    "--region-mode", type=click.Choice(["auto", "roi", "roi-mean", "crop"]), default="auto", show_default=True
)
@click.option("--classes", default=None, help="Comma-separated class names (default: the manifest's labels).")
@click.option("--classes-file", default=None, type=click.Path(dir_okay=False), help="One class name per line.")
@click.option("--templates", default=None, help="'|'-separated prompt templates, each with one {}.")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--shard-size", default=4096, show_default=True)
@click.option("--device", default="cpu", show_default=True, callback=_device)
@click.option("--num-workers", default=0, show_default=True, help="DataLoader workers for image decoding.")
@resize_option
@click.option("--progress/--no-progress", default=True, show_default=True)
def embed_cmd(**opts: Any) -> None:
    """Embed every image and region of a manifest into a resumable run directory."""

    from ravl_engine.embed import EmbedConfig, run_embed  # noqa: PLC0415
    from ravl_engine.manifest import read_manifest  # noqa: PLC0415

    progress = opts.pop("progress")
    templates = opts.pop("templates")
    fields: dict[str, Any] = {k: v for k, v in opts.items() if k not in ("classes", "proposer_options")}
    fields["classes"] = _split_csv(opts["classes"])
    fields["proposer_options"] = _parse_options(opts["proposer_options"])
    if templates:
        fields["templates"] = tuple(t for t in templates.split("|") if t)
    cfg = EmbedConfig.from_dict(fields)
    total = len(read_manifest(cfg.data))
    # under torchrun the ranks share the shards
    with _launched(cfg.device, progress=progress, total=total, desc="embed", unit="img") as (bar, rank, world):
        result = run_embed(cfg, on_images=bar.update)
    if rank == 0:
        _emit({**result.to_dict(), "world_size": world})


@main.command("cluster")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Directory for discovery.json.")
@overwrite_option
@click.option(
    "--vocabulary", default=None, type=click.Path(dir_okay=False), help="Phrases to name clusters with, one per line."
)
@click.option("--names/--no-names", default=True, show_default=True, help="Name clusters with the run's text tower.")
@click.option("--checkpoint", default=None, help="The audited checkpoint, if it moved since embed (for the names).")
@discovery_options
def cluster_cmd(
    run_dir: str,
    out: str,
    overwrite: bool,
    vocabulary: str | None,
    names: bool,
    checkpoint: str | None,
    seed: int,
    k: int | None,
    clip_distance: bool,
    strategy: str,
    backend: str,
    device: str | None,
    top: int,
    progress: bool,
) -> None:
    """Find spurious region clusters in a run directory; writes OUT/discovery.json and OUT/report.html.

    Clusters are named with phrases (--vocabulary, default: a built-in list of objects, colours x shapes and
    artefacts) scored by the run's own text tower, loaded from the checkpoint the run recorded.
    """

    from ravl_engine.cluster import ClusterConfig, run_cluster  # noqa: PLC0415
    from ravl_engine.config import DiscoverConfig  # noqa: PLC0415

    discover_cfg = DiscoverConfig(k=k, clip_distance=clip_distance, strategy=strategy, backend=backend, device=device)
    cfg = ClusterConfig(
        run_dir=run_dir,
        out=out,
        seed=seed,
        names=names,
        vocabulary=vocabulary,
        checkpoint=checkpoint,
        discover=discover_cfg,
        overwrite=overwrite,
    )
    # under torchrun the ranks share the region embeddings
    with _launched(device or "cpu", progress=progress, desc="K sweep", unit="K") as (bar, rank, _world):
        result = run_cluster(cfg, on_k=lambda _entry: bar.update(1))
    if rank != 0:
        return
    doc = result.document
    from ravl_engine.report import summary_table  # noqa: PLC0415

    click.echo(summary_table(doc), err=True)
    _emit(
        {
            "discovery": result.path,
            "report": result.report,
            "k": doc["k"],
            "classes": doc["classes"],
            "naming": doc["naming"],
            "clusters": [
                {
                    "rank": c["rank"],
                    "class": c["class"],
                    "gap": c["gap"],
                    "influence": c["influence"],
                    "names": c["names"],
                    "n_regions": c["n_regions"],
                    "n_images": c["n_images"],
                    "top_regions": c["regions"][:top],
                }
                for c in doc["clusters"]
            ],
        }
    )


@main.command("synth")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--source", default="sklearn", show_default=True, help="'sklearn' (offline) or a folder of idx files.")
@click.option("--spurious-class", default=0, show_default=True, help="Class tied to the feature in training.")
@click.option(
    "--cramers-v",
    default=0.9,
    show_default=True,
    help="Feature-class association in training, in [0, 1); 0 = independent.",
)
@click.option("--n-train", default=2000, show_default=True)
@click.option("--n-eval", default=500, show_default=True)
@click.option("--classes", default=None, help="Comma-separated digits (default 0..9).")
@click.option("--shape", default="square", show_default=True, help="square, disk, ring, triangle, stripes.")
@click.option("--color", default="red", show_default=True, help="red, green, blue, yellow, magenta, cyan, white.")
@click.option("--size", default=1.0, show_default=True, help="Feature size as a fraction of the cell.")
@click.option("--grid", default=2, show_default=True, help="Cells per side.")
@click.option("--cell", default=28, show_default=True, help="Cell size in pixels.")
@click.option(
    "--layout",
    type=click.Choice(["quadrants", "scene"]),
    default="quadrants",
    show_default=True,
    help="A grid of cells, or objects of varied size at random non-overlapping positions.",
)
@click.option("--image-size", default=112, show_default=True, help="Scene image side in pixels (--layout scene).")
@click.option("--seed", default=0, show_default=True)
@overwrite_option
def synth_cmd(**opts: Any) -> None:
    """Build a controlled digit setting: train.csv (feature tied to a class) and eval.csv (independent, with boxes)."""
    from ravl_engine.controlled import SynthConfig, run_synth  # noqa: PLC0415

    classes = _split_csv(opts.pop("classes"))
    if classes is not None:
        try:
            opts["classes"] = tuple(int(c) for c in classes)
        except ValueError as err:
            raise click.BadParameter("classes must be digits like 0,3,8", param_hint="--classes") from err
    result = run_synth(SynthConfig(**opts))
    _emit(result.to_dict())


@main.command("finetune")
@click.option("--train", "train", required=True, type=click.Path(dir_okay=False), help="Captioned manifest.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Checkpoint file to write.")
@click.option("--model", default="ravl-tiny-rn", show_default=True)
@click.option("--pretrained", default=None, help="Start from this tag or checkpoint (default: from scratch).")
@click.option("--epochs", default=8, show_default=True)
@click.option("--batch-size", default=128, show_default=True)
@click.option("--lr", type=float, default=None, help="Default 1e-3 from scratch, 5e-5 from pretrained weights.")
@click.option("--freeze-text/--train-text", default=None, help="Default: freeze when starting from weights.")
@click.option("--val-fraction", default=0.1, show_default=True)
@click.option("--patience", default=2, show_default=True, help="Epochs without validation gain before stopping.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, callback=_device)
@resize_option
@overwrite_option
@click.option("--progress/--no-progress", default=True, show_default=True)
def finetune_cmd(progress: bool, **opts: Any) -> None:
    """CLIP contrastive fine-tuning with early stopping; the checkpoint loads with embed --pretrained."""

    from ravl_engine.finetune import FinetuneConfig, run_finetune  # noqa: PLC0415

    cfg = FinetuneConfig(**opts)
    # under torchrun: DistributedDataParallel over the ranks
    with _launched(cfg.device, progress=progress, total=cfg.epochs, desc="finetune", unit="epoch") as (
        bar,
        rank,
        world,
    ):
        result = run_finetune(cfg, on_epoch=lambda _e: bar.update(1))
    if rank == 0:
        _emit({**result.to_dict(), "world_size": world})


@main.command("mitigate")
@click.option(
    "--train", "train", required=True, type=click.Path(dir_okay=False), help="Captioned fine-tuning manifest."
)
@click.option(
    "--discovery", "discovery", required=True, type=click.Path(dir_okay=False), help="discovery.json of the audit."
)
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Checkpoint file to write.")
@click.option(
    "--method",
    type=click.Choice(["ravl", "standard", "upsampled", "vl-erm", "vl-gdro"]),
    default="ravl",
    show_default=True,
)
@click.option("--pretrained", default=None, help="Starting weights (checkpoint or tag); default random init.")
@click.option("--model", default=None, help="Architecture of the starting weights (default: the audited model's).")
@click.option("--region-model", default=None, help="The audited checkpoint, if it moved since cluster ran.")
@click.option(
    "--cluster", "clusters", multiple=True, type=int, help="Rank of a spurious cluster (repeatable; default 1)."
)
@click.option("--work-dir", default=None, type=click.Path(file_okay=False), help="Run dir for the training regions.")
@click.option("--proposer", default=None, help="Override the audit's proposer for the fine-tuning images.")
@click.option("--clip-weight", default=0.8, show_default=True, help="lambda: the CLIP loss's share.")
@click.option("--temperature", default=0.07, show_default=True, help="tau of the region and zero-shot terms.")
@click.option("--reduction", type=click.Choice(["mean", "sum"]), default="mean", show_default=True)
@click.option(
    "--distinct-labels/--repeated-labels", default=True, show_default=True, help="Batch labels in L_R's denominator."
)
@click.option("--gdro-step", default=0.01, show_default=True, help="Group DRO step size (vl-gdro).")
@click.option("--epochs", default=6, show_default=True)
@click.option("--batch-size", default=128, show_default=True)
@click.option("--lr", type=float, default=None, help="Default 1e-3 from scratch, 5e-5 from pretrained weights.")
@click.option("--freeze-text/--train-text", default=None, help="Default: freeze when starting from weights.")
@click.option("--val-fraction", default=0.1, show_default=True)
@click.option("--patience", default=6, show_default=True, help="Epochs without validation gain before stopping.")
@click.option(
    "--select",
    type=click.Choice(["accuracy", "worst-group", "last"]),
    default="accuracy",
    show_default=True,
    help="Which epoch's weights to keep.",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, callback=_device)
@click.option(
    "--resize",
    type=click.Choice(["squash", "pad"]),
    default=None,
    help="How images fit the model's square input: squash or pad (letterbox); default: the audit's.",
)
@overwrite_option
@click.option("--progress/--no-progress", default=True, show_default=True)
def mitigate_cmd(progress: bool, clusters: tuple[int, ...], **opts: Any) -> None:
    """Fine-tune with RaVL's region-aware loss (or a baseline) so the discovered feature stops driving its class."""

    from ravl_engine.mitigate import MitigateConfig, run_mitigate  # noqa: PLC0415

    cfg = MitigateConfig(clusters=clusters or (1,), **opts)
    # under torchrun: DistributedDataParallel over the ranks
    with _launched(cfg.device, progress=progress, total=cfg.epochs, desc=cfg.method, unit="epoch") as (
        bar,
        rank,
        world,
    ):
        result = run_mitigate(cfg, on_epoch=lambda _e: bar.update(1))
    if rank == 0:
        _emit({**result.to_dict(), "world_size": world})


@main.command("evaluate")
@click.option(
    "--data", "data", required=True, type=click.Path(dir_okay=False), help="Evaluation manifest (boxes, region_labels)."
)
@click.option("--pretrained", default=None, help="Checkpoint or tag of the model to evaluate.")
@click.option("--model", default="ravl-tiny-rn", show_default=True)
@click.option(
    "--discovery", "discovery", default=None, type=click.Path(dir_okay=False), help="discovery.json to score."
)
@click.option("--feature", default=None, help="Region label of the spurious feature (default: the only non-class one).")
@click.option("--spurious-class", default=None, help="Class tested against the feature (default: largest gap).")
@click.option(
    "--work",
    default=None,
    type=click.Path(file_okay=False),
    help="Run directory for the embeddings (default: a temporary one).",
)
@click.option(
    "--counterfactual/--no-counterfactual",
    default=True,
    show_default=True,
    help="Paste the feature into the feature-free images and report how often the prediction flips.",
)
@click.option("--device", default="cpu", show_default=True, callback=_device)
@resize_option
def evaluate_cmd(**opts: Any) -> None:
    """Image / region overall and worst-group zero-shot accuracy (also per region kind), validity gaps, the paired
    counterfactual flip rate, and Precision@k of a discovery."""
    from ravl_engine.evaluate import EvaluateConfig, run_evaluate  # noqa: PLC0415

    _emit(run_evaluate(EvaluateConfig(**opts)).to_dict())


@main.command("demo")
@click.option("--out", "out", default="ravl-demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--source", default="sklearn", show_default=True, help="'sklearn' (offline) or a folder of idx files.")
@click.option("--spurious-class", default=3, show_default=True)
@click.option("--cramers-v", default=0.9, show_default=True)
@click.option("--n-train", default=3000, show_default=True)
@click.option("--n-eval", default=1000, show_default=True)
@click.option("--epochs", default=6, show_default=True)
@click.option("--model", default="ravl-tiny-rn", show_default=True, help="Any --model value, hf:PATH_OR_ID included.")
@click.option("--pretrained", default=None, help="Fine-tune from this tag or checkpoint (default: from scratch).")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, callback=_device)
@resize_option
@overwrite_option
def demo_cmd(**opts: Any) -> None:
    """Plant a red square on one digit class, fine-tune a tiny CLIP, and let RaVL find it (offline, ~1 min on CPU)."""
    from ravl_engine.demo import DemoConfig, run_demo  # noqa: PLC0415

    summary = run_demo(DemoConfig(**opts), on_step=lambda name: click.echo(f"[demo] {name}", err=True))
    found = summary["found"]
    click.echo(
        f"[demo] planted {summary['planted']['feature']!r} on class {summary['planted']['class']}; top cluster: class "
        f"{found['class']}, Precision@10 {found['precision_at_10']}; discovery: {summary['paths']['discovery']}",
        err=True,
    )
    _emit(summary)


if __name__ == "__main__":
    main()
