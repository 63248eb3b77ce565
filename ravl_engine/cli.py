"""The ``ravl-engine`` command line: a thin layer over the stage APIs.

Option defaults, types and choices come from the stage's config dataclass (:func:`field_option`); a command builds
its options when first needed, so importing this module and ``ravl-engine --help`` never import torch. Every command
takes ``--config FILE.toml`` as the base of its options (explicit options win). Every command prints a JSON summary
on stdout; logs, progress and the summary's warnings go to stderr. Library, OS and decoding errors of any command
become one-line click errors with exit status 1 (in :class:`_Main`, once); Ctrl-C exits 130.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import sys
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import click

from ravl_engine import __version__
from ravl_engine.errors import RavlEngineError

if TYPE_CHECKING:
    from ravl_engine.config import Backend, Strategy

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


def _check_device(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """--device checked once, before any work (an unknown name or a GPU that is not there)."""
    if value is None:
        return None
    from ravl_engine.distributed import check_device  # noqa: PLC0415

    try:
        return check_device(value)
    except RavlEngineError as err:
        raise click.ClickException(f"--device {err}") from err  # one line, without click's usage block


@contextmanager
def _process_group_and_bar(device: str, *, progress: bool, **bar: Any) -> Iterator[tuple[Any, int, int]]:
    """Join the process group a torchrun launch describes (nothing otherwise); yield (progress bar, rank, world
    size), the bar drawn on stderr by rank 0 only."""
    from tqdm import tqdm  # noqa: PLC0415

    from ravl_engine.distributed import init_from_env, rank_world  # noqa: PLC0415

    init_from_env(device)
    rank, world = rank_world()
    # delay: no empty bar for work that fails or ends within half a second
    with tqdm(file=sys.stderr, disable=not progress or rank != 0, delay=0.5, **bar) as pbar:
        yield pbar, rank, world


def _train_epochs(cfg: Any, run: Callable[..., Any], *, desc: str, progress: bool) -> None:
    """Run ``finetune`` or ``mitigate`` (under torchrun: DistributedDataParallel over the ranks) with an epoch bar;
    rank 0 prints the summary."""
    with _process_group_and_bar(cfg.device, progress=progress, total=cfg.epochs, desc=desc, unit="epoch") as (
        bar,
        rank,
        world,
    ):
        result = run(cfg, on_epoch=lambda _e: bar.update(1))
    if rank == 0:
        _emit({**result.to_dict(), "world_size": world})


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="ravl-engine")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
def main(verbose: int) -> None:
    """ravl-engine: find the image features a fine-tuned CLIP-style model has tied to a class by accident
    (RaVL, NeurIPS 2024), rank them, and fine-tune them away."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


def _field_type(hint: Any) -> Any:
    """The click type of a field annotation: a Choice for a Literal, int / float / str / bool, else None (click's
    default); ``X | None`` counts as X."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if typing.get_origin(hint) is Literal:
        return click.Choice(typing.get_args(hint))
    return hint if hint in (int, float, str, bool) else None


def field_option(cls: type, name: str, *decls: str, **attrs: Any) -> click.Option:
    """A click option for field ``name`` of the config dataclass ``cls``: its default (shown in --help; a field
    without one makes the option required), its type from the annotation, and a Literal annotation's choices.

    ``decls`` default to ``--field-name`` (``--field-name/--no-field-name`` for a bool); ``attrs`` (help, a
    ``click.Choice`` of the module's tuple of modes, a parsing callback) are passed on and win.
    """
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    hint = typing.get_type_hints(cls)[name]
    kind = _field_type(hint)
    flag = f"--{name.replace('_', '-')}"
    if not decls:
        decls = (f"{flag}/--no-{flag[2:]}",) if kind is bool else (flag,)
    base: dict[str, Any] = {"type": kind}
    if field.default is not dataclasses.MISSING:
        base |= {"default": field.default, "show_default": field.default is not None}
    elif field.default_factory is not dataclasses.MISSING:
        base |= {"default": field.default_factory(), "show_default": True}
    else:
        base["required"] = True
    if kind is bool and len(decls) == 1 and "/" not in decls[0]:
        base |= {"is_flag": True, "show_default": False}
    if kind is None:
        del base["type"]
    return click.Option([*decls, name], **(base | attrs))


def device_option(cls: type) -> click.Option:
    """--device with the default of ``cls.device`` (None: where the inputs are, which is cpu for files)."""
    default = {f.name: f.default for f in dataclasses.fields(cls)}["device"]
    where = "" if default is not None else "; default: the inputs' device (cpu: they are read from files)"
    return field_option(cls, "device", callback=_check_device, help=f"torch device (cpu, cuda, cuda:1){where}.")


def resize_option(cls: type) -> click.Option:
    """--resize with the default of ``cls.resize`` (None: the audit's)."""
    from ravl_engine.images import RESIZE_MODES  # noqa: PLC0415

    default = {f.name: f.default for f in dataclasses.fields(cls)}["resize"]
    fit = "How images fit the model's square input: squash (stretch) or pad (letterbox, keeps the aspect ratio)"
    return field_option(
        cls,
        "resize",
        type=click.Choice(RESIZE_MODES),
        help=fit + ("; default: the audit's." if default is None else "."),
    )


def _toml_defaults(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    """--config FILE.toml: its keys (option names, with - or _) become the command's defaults."""
    if value is None:
        return
    if sys.version_info >= (3, 11):
        import tomllib  # noqa: PLC0415
    else:  # pragma: no cover
        import tomli as tomllib  # noqa: PLC0415

    try:
        table = tomllib.loads(Path(value).read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise click.ClickException(f"{value}: not valid TOML ({err}); fix the file or drop --config") from err
    names: dict[str, str] = {}  # key (with _) -> parameter name: the option's flags and its parameter name
    for p in ctx.command.params:
        if p.name and p.name != "config":
            names |= {k.lstrip("-").replace("-", "_"): p.name for k in [p.name, *p.opts]}
    defaults: dict[str, Any] = {}
    for key, item in table.items():
        name = names.get(key.replace("-", "_"))
        if name is None:
            valid = ", ".join(sorted({k.replace("_", "-") for k in names}))
            raise click.ClickException(f"{value}: unknown key {key!r} for `{ctx.info_name}`; valid keys are {valid}")
        if isinstance(item, dict):  # a table of KEY = VALUE, as --proposer-option KEY=VALUE would give
            item = [f"{k}={json.dumps(v)}" for k, v in item.items()]
        defaults[name] = item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}


class _StageCommand(click.Command):
    """A command whose options are built by ``options()`` when first needed (help, parsing), from the stage's
    config dataclass; every one also takes ``--config FILE.toml``."""

    def __init__(self, *args: Any, options: Callable[[], list[click.Parameter]], **kwargs: Any) -> None:
        self._make_options = options
        self._built: list[click.Parameter] | None = None
        super().__init__(*args, **kwargs)

    @property  # type: ignore[override]
    def params(self) -> list[click.Parameter]:
        if self._built is None:
            config = click.Option(
                ["--config", "config"],
                type=click.Path(exists=True, dir_okay=False),
                is_eager=True,
                expose_value=False,
                callback=_toml_defaults,
                help="TOML file of option values (keys: option names); options given here win.",
            )
            self._built = [*self._make_options(), *self._declared, config]
        return self._built

    @params.setter
    def params(self, value: list[click.Parameter]) -> None:
        self._declared = list(value)
        self._built = None


def _stage(name: str, options: Callable[[], list[click.Parameter]]) -> Callable[[Callable[..., Any]], click.Command]:
    return main.command(name, cls=_StageCommand, options=options)


progress_option = click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar.")


def _discovery_options() -> list[click.Parameter]:
    """The options shared by every command that runs discovery (DiscoverConfig's), after the seed."""
    from ravl_engine.config import DiscoverConfig as D  # noqa: PLC0415

    return [
        field_option(D, "k", help="Fixed number of clusters (default: silhouette sweep)."),
        field_option(D, "clip_distance", "--clip-distance", help="The released code's clipped cosine distance."),
        field_option(D, "strategy"),
        field_option(D, "backend"),
        device_option(D),
        click.Option(["--top"], default=10, show_default=True, help="Regions per cluster in the printed summary."),
    ]


def _overwrite(cls: type) -> click.Option:
    return field_option(
        cls, "overwrite", "--overwrite", help="Replace an existing --out (default: refuse); old and new never mix."
    )


def _discover_options() -> list[click.Parameter]:
    from ravl_engine.cluster import ClusterConfig  # noqa: PLC0415

    return [
        click.Option(["--out"], type=click.Path(dir_okay=False, path_type=Path), help="Write the full result here."),
        _overwrite(ClusterConfig),
        field_option(ClusterConfig, "seed", help="Seed of the k-medoids++ initialisation."),
        *_discovery_options(),
    ]


@_stage("discover", _discover_options)
@click.argument("arrays", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@progress_option
def discover_cmd(
    arrays: Path,
    out: Path | None,
    overwrite: bool,
    seed: int,
    k: int | None,
    clip_distance: bool,
    strategy: Strategy,
    backend: Backend,
    device: str | None,
    top: int,
    progress: bool,
) -> None:
    """Run RaVL discovery on precomputed arrays.

    ARRAYS is an .npz file with region_embeddings [R, D], num_regions [N], image_labels [N], image_scores [N, C]
    and region_scores [R, C] (softmax probabilities), the inputs of ravl_engine.discover().
    """
    from tqdm import tqdm  # noqa: PLC0415

    from ravl_engine.config import DiscoverConfig  # noqa: PLC0415
    from ravl_engine.discover import run_discover  # noqa: PLC0415
    from ravl_engine.outputs import check_not_input, check_out  # noqa: PLC0415

    if out is not None:
        check_not_input(out, {"ARRAYS": arrays})
        check_out(out, overwrite=overwrite)
    inputs = _read_arrays(arrays)
    cfg = DiscoverConfig(k=k, clip_distance=clip_distance, strategy=strategy, backend=backend, device=device)
    n_k = len(cfg.k_values(inputs[3].shape[1] if inputs[3].ndim == 2 else 2))
    with tqdm(total=n_k, desc="K sweep", unit="K", file=sys.stderr, disable=not progress, delay=0.5) as bar:
        result = run_discover(cfg, *inputs, seed=seed, on_k=lambda _entry: bar.update(1))
    if out is not None:
        from ravl_engine.documents import discover_arrays_document  # noqa: PLC0415
        from ravl_engine.shards import write_json_atomic  # noqa: PLC0415

        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, discover_arrays_document(result.to_dict(max_regions=None)))
    summary = result.to_dict(max_regions=top)
    summary["out"] = str(out) if out is not None else None
    _emit(summary)


def _read_arrays(path: Path) -> list[Any]:
    """The ARRAY_KEYS arrays of an .npz file; a missing array or an unreadable file is one line naming it."""
    import numpy as np  # noqa: PLC0415

    try:
        with np.load(path) as data:
            missing = [key for key in ARRAY_KEYS if key not in data.files]
            if missing:
                raise click.ClickException(
                    f"{path}: missing array(s) {', '.join(missing)}; the file needs {', '.join(ARRAY_KEYS)}"
                )
            return [data[key] for key in ARRAY_KEYS]
    except (OSError, ValueError) as err:
        raise click.ClickException(f"{path}: not a readable .npz file ({err})") from err


def split_csv(_ctx: Any, _param: Any, value: str | None) -> tuple[str, ...] | None:
    """'a, b,,c' -> ('a', 'b', 'c'); None or nothing but commas -> None."""
    if value is None:
        return None
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    return items or None


def split_templates(_ctx: Any, _param: Any, value: str | None) -> tuple[str, ...] | None:
    """'a {}|b {}' -> ('a {}', 'b {}'); empty pieces are dropped."""
    if not value:
        return None
    return tuple(t for t in value.split("|") if t) or None


def parse_options(_ctx: Any, _param: Any, pairs: tuple[str, ...]) -> dict[str, Any]:
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


def _embed_options() -> list[click.Parameter]:
    from ravl_engine.embed import REGION_MODES, EmbedConfig  # noqa: PLC0415

    def f(name: str, *decls: str, **attrs: Any) -> click.Option:
        return field_option(EmbedConfig, name, *decls, **attrs)

    return [
        f("data", type=click.Path(dir_okay=False), help="Manifest: CSV, JSONL or Parquet."),
        f("out", type=click.Path(file_okay=False), help="Run directory (resumed if present)."),
        f("model", help="open_clip architecture or tiny config."),
        f("pretrained", help="open_clip pretrained tag or local checkpoint file."),
        f("proposer", help="quadrants, grid, manifest, rpn, yolo, ..."),
        f(
            "proposer_options",
            "--proposer-option",
            multiple=True,
            default=(),
            show_default=False,
            type=str,
            callback=parse_options,
            help="KEY=VALUE for the proposer (repeatable).",
        ),
        f("max_boxes", help="Keep at most this many boxes per image."),
        f("min_box_size", help="Drop boxes smaller than this (px)."),
        f("score_threshold", help="Drop proposals scoring below this."),
        f("whole_image", help="Add the whole image as a region."),
        f("region_mode", type=click.Choice(REGION_MODES)),
        f("classes", type=str, callback=split_csv, help="Comma-separated class names (default: the manifest's)."),
        f("classes_file", type=click.Path(dir_okay=False), help="One class name per line."),
        f(
            "templates",
            type=str,
            default=None,
            show_default=False,
            callback=split_templates,
            help="'|'-separated prompt templates, each with one {} (default: the MNIST templates).",
        ),
        f("batch_size"),
        f("shard_size"),
        device_option(EmbedConfig),
        f("num_workers", help="DataLoader workers for image decoding."),
        resize_option(EmbedConfig),
    ]


@_stage("embed", _embed_options)
@progress_option
def embed_cmd(progress: bool, **opts: Any) -> None:
    """Embed every image and region of a manifest into a resumable run directory."""

    from ravl_engine.embed import EmbedConfig, run_embed  # noqa: PLC0415
    from ravl_engine.manifest import read_manifest  # noqa: PLC0415

    if opts["templates"] is None:
        del opts["templates"]  # the config's default
    cfg = EmbedConfig.from_dict(opts)
    total = len(read_manifest(cfg.data))
    # under torchrun the ranks share the shards
    with _process_group_and_bar(cfg.device, progress=progress, total=total, desc="embed", unit="img") as (
        bar,
        rank,
        world,
    ):
        result = run_embed(cfg, on_images=bar.update)
    if rank == 0:
        _emit({**result.to_dict(), "world_size": world})


def _cluster_options() -> list[click.Parameter]:
    from ravl_engine.cluster import ClusterConfig as C  # noqa: PLC0415

    return [
        field_option(C, "out", type=click.Path(file_okay=False), help="Directory for discovery.json."),
        _overwrite(C),
        field_option(C, "vocabulary", type=click.Path(dir_okay=False), help="Phrases to name clusters with."),
        field_option(C, "names", help="Name clusters with the run's text tower."),
        field_option(C, "checkpoint", help="The audited checkpoint, if it moved since embed (for the names)."),
        field_option(C, "seed", help="Seed of the k-medoids++ initialisation."),
        *_discovery_options(),
    ]


@_stage("cluster", _cluster_options)
@click.argument("run_dir", type=click.Path(file_okay=False))
@progress_option
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
    strategy: Strategy,
    backend: Backend,
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
    with _process_group_and_bar(device or "cpu", progress=progress, desc="K sweep", unit="K") as (bar, rank, _world):
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
            "k": doc.k,
            "classes": list(doc.classes),
            "naming": doc.naming.to_dict(),
            "clusters": [
                {
                    "rank": c.rank,
                    "class": c.class_name,
                    "gap": c.gap,
                    "influence": c.influence,
                    "names": [n.to_dict() for n in c.names],
                    "n_regions": c.n_regions,
                    "n_images": c.n_images,
                    "top_regions": [r.to_dict() for r in c.regions[:top]],
                }
                for c in doc.clusters
            ],
        }
    )


def _digits(ctx: Any, param: Any, value: str | None) -> tuple[int, ...] | None:
    classes = split_csv(ctx, param, value)
    if classes is None:
        return None
    try:
        return tuple(int(c) for c in classes)
    except ValueError as err:
        raise click.BadParameter("classes must be digits like 0,3,8", param_hint="--classes") from err


def _synth_options() -> list[click.Parameter]:
    from ravl_engine.controlled import LAYOUTS  # noqa: PLC0415
    from ravl_engine.controlled import SynthConfig as S  # noqa: PLC0415

    return [
        field_option(S, "out", type=click.Path(file_okay=False), help="Output folder."),
        field_option(S, "source", help="'sklearn' (offline) or a folder of idx files."),
        field_option(S, "spurious_class", help="Class tied to the feature in training."),
        field_option(S, "cramers_v", help="Feature-class association in training, in [0, 1); 0 = independent."),
        field_option(S, "n_train"),
        field_option(S, "n_eval"),
        field_option(
            S,
            "classes",
            type=str,
            default=None,
            show_default=False,
            callback=_digits,
            help="Comma-separated digits (default 0..9).",
        ),
        field_option(S, "shape", help="square, disk, ring, triangle, stripes."),
        field_option(S, "color", help="red, green, blue, yellow, magenta, cyan, white."),
        field_option(S, "size", help="Feature size as a fraction of the cell."),
        field_option(S, "grid", help="Cells per side."),
        field_option(S, "cell", help="Cell size in pixels."),
        field_option(
            S,
            "layout",
            type=click.Choice(LAYOUTS),
            help="A grid of cells, or objects of varied size at random non-overlapping positions.",
        ),
        field_option(S, "image_size", help="Scene image side in pixels (--layout scene)."),
        field_option(
            S,
            "caption_feature",
            "--caption-feature/--plain-captions",
            help="Captions also name the feature where it is shown (a pretraining set that teaches its words).",
        ),
        field_option(S, "seed"),
        _overwrite(S),
    ]


@_stage("synth", _synth_options)
def synth_cmd(**opts: Any) -> None:
    """Build a controlled digit setting: train.csv (feature tied to a class) and eval.csv (independent, with boxes)."""
    from ravl_engine.controlled import SynthConfig, run_synth  # noqa: PLC0415

    if opts["classes"] is None:
        del opts["classes"]  # the config's default
    result = run_synth(SynthConfig(**opts))
    _emit(result.to_dict())


def _training_options(cls: type) -> list[click.Option]:
    """The schedule options finetune and mitigate share."""
    return [
        field_option(cls, "epochs"),
        field_option(cls, "batch_size"),
        field_option(cls, "lr", help="Default 1e-3 from scratch, 5e-5 from pretrained weights."),
        field_option(
            cls, "freeze_text", "--freeze-text/--train-text", help="Default: freeze when starting from weights."
        ),
        field_option(cls, "val_fraction"),
        field_option(cls, "patience", help="Epochs without validation gain before stopping."),
    ]


def _finetune_options() -> list[click.Parameter]:
    from ravl_engine.finetune import FinetuneConfig as F  # noqa: PLC0415

    return [
        field_option(F, "train", type=click.Path(dir_okay=False), help="Captioned manifest."),
        field_option(F, "out", type=click.Path(dir_okay=False), help="Checkpoint file to write."),
        field_option(F, "model"),
        field_option(F, "pretrained", help="Start from this tag or checkpoint (default: from scratch)."),
        *_training_options(F),
        field_option(F, "seed"),
        device_option(F),
        resize_option(F),
        _overwrite(F),
    ]


@_stage("finetune", _finetune_options)
@progress_option
def finetune_cmd(progress: bool, **opts: Any) -> None:
    """CLIP contrastive fine-tuning with early stopping; the checkpoint loads with embed --pretrained."""

    from ravl_engine.finetune import FinetuneConfig, run_finetune  # noqa: PLC0415

    _train_epochs(FinetuneConfig(**opts), run_finetune, desc="finetune", progress=progress)


def _mitigate_options() -> list[click.Parameter]:
    from ravl_engine.mitigate import IMAGE_TERM_CHOICES, METHODS, SAMPLERS, SELECT  # noqa: PLC0415
    from ravl_engine.mitigate import MitigateConfig as M  # noqa: PLC0415

    return [
        field_option(M, "train", type=click.Path(dir_okay=False), help="Captioned fine-tuning manifest."),
        field_option(M, "discovery", type=click.Path(dir_okay=False), help="discovery.json of the audit."),
        field_option(M, "out", type=click.Path(dir_okay=False), help="Checkpoint file to write."),
        field_option(M, "method", type=click.Choice(METHODS)),
        field_option(
            M,
            "sampler",
            type=click.Choice(SAMPLERS),
            help="Training sampler: the method's own, or group-balanced / shuffle for any method.",
        ),
        field_option(M, "pretrained", help="Starting weights (checkpoint or tag); default random init."),
        field_option(M, "model", help="Architecture of the starting weights (default: the audited model's)."),
        field_option(M, "region_model", help="The audited checkpoint, if it moved since cluster ran."),
        field_option(
            M, "clusters", "--cluster", type=int, multiple=True, help="Rank of a spurious cluster (repeatable)."
        ),
        field_option(M, "work_dir", type=click.Path(file_okay=False), help="Run dir for the training regions."),
        field_option(M, "proposer", help="Override the audit's proposer for the fine-tuning images."),
        field_option(M, "clip_weight", help="lambda: the CLIP loss's share."),
        field_option(
            M,
            "image_term",
            type=click.Choice(IMAGE_TERM_CHOICES),
            help="A term on image pairs with and without the discovered feature that reaches the image embedding "
            "(an extension of the paper's loss; README): 'masked' copies, 'counterfactual' also pastes the feature "
            "into other classes' images. Default 'method': counterfactual for ravl, none for the rest; 'none' with "
            "ravl is the paper's loss. vl-erm / vl-gdro accept a term for ablations.",
        ),
        field_option(M, "temperature", help="tau of the region and zero-shot terms."),
        field_option(M, "reduction", type=click.Choice(["mean", "sum"])),
        field_option(
            M, "distinct_labels", "--distinct-labels/--repeated-labels", help="Batch labels in L_R's denominator."
        ),
        field_option(M, "gdro_step", help="Group DRO step size (vl-gdro)."),
        *_training_options(M),
        field_option(
            M,
            "select",
            type=click.Choice(SELECT),
            help="Which epoch's weights to keep (pseudo-group: the best worst pseudo-group accuracy on the audit "
            "set's selection half).",
        ),
        field_option(
            M,
            "keep_start",
            "--keep-start/--fine-tuned-only",
            help="Whether the starting weights (epoch 0) may be the kept epoch.",
        ),
        field_option(
            M,
            "freeze_bn",
            "--freeze-bn/--train-bn",
            help="BatchNorm on the starting statistics and weights in the image and region paths (default: train).",
        ),
        field_option(
            M, "audit_data", type=click.Path(dir_okay=False), help="Audit manifest (default: the one cluster recorded)."
        ),
        field_option(M, "split_seed", help="Seed of the audit set's selection / test halves."),
        field_option(M, "seed"),
        device_option(M),
        resize_option(M),
        _overwrite(M),
    ]


@_stage("mitigate", _mitigate_options)
@progress_option
def mitigate_cmd(progress: bool, **opts: Any) -> None:
    """Fine-tune with RaVL's region-aware loss (or a baseline) so the discovered feature stops driving its class."""

    from ravl_engine.mitigate import MitigateConfig, run_mitigate  # noqa: PLC0415

    cfg = MitigateConfig(**opts)
    _train_epochs(cfg, run_mitigate, desc=cfg.method, progress=progress)


def _evaluate_options() -> list[click.Parameter]:
    # evaluate embeds the manifest with EmbedConfig: its model, device and resize defaults are that config's
    from ravl_engine.embed import EmbedConfig as E  # noqa: PLC0415
    from ravl_engine.evaluate import EvaluateConfig as V  # noqa: PLC0415

    return [
        field_option(V, "data", type=click.Path(dir_okay=False), help="Evaluation manifest (boxes, labels)."),
        field_option(E, "pretrained", help="Checkpoint or tag of the model to evaluate."),
        field_option(E, "model"),
        field_option(V, "discovery", type=click.Path(dir_okay=False), help="discovery.json to score."),
        field_option(V, "feature", help="Region label of the spurious feature (default: the only non-class one)."),
        field_option(V, "spurious_class", help="Class tested against the feature (default: largest gap)."),
        field_option(
            V, "work", type=click.Path(file_okay=False), help="Run directory for the embeddings (default: temporary)."
        ),
        field_option(
            V,
            "counterfactual",
            help="Paste the feature into the feature-free images and report how often the prediction flips.",
        ),
        device_option(E),
        resize_option(E),
    ]


@_stage("evaluate", _evaluate_options)
def evaluate_cmd(**opts: Any) -> None:
    """Image / region overall and worst-group zero-shot accuracy (also per region kind), validity gaps, the paired
    counterfactual flip rate, and Precision@k of a discovery."""
    from ravl_engine.evaluate import EvaluateConfig, run_evaluate  # noqa: PLC0415

    _emit(run_evaluate(EvaluateConfig(**opts)).to_dict())


def _demo_options() -> list[click.Parameter]:
    from ravl_engine.controlled import LAYOUTS  # noqa: PLC0415
    from ravl_engine.demo import DemoConfig as D  # noqa: PLC0415

    return [
        field_option(D, "out", type=click.Path(file_okay=False)),
        field_option(D, "source", help="'sklearn' (offline) or a folder of idx files."),
        field_option(D, "spurious_class"),
        field_option(D, "cramers_v"),
        field_option(D, "shape", help="The planted feature's shape: square, disk, ring, triangle, stripes."),
        field_option(D, "color", help="The planted feature's colour: red, green, blue, yellow, magenta, cyan, white."),
        field_option(D, "n_train"),
        field_option(D, "n_eval"),
        field_option(D, "epochs"),
        field_option(D, "layout", type=click.Choice(LAYOUTS), help="synth's layout (scene: use a 112 px --model)."),
        field_option(D, "image_size", help="Scene image side in pixels (--layout scene)."),
        field_option(D, "model", help="Any --model value, hf:PATH_OR_ID included."),
        field_option(D, "pretrained", help="Fine-tune from this tag or checkpoint (default: from scratch)."),
        field_option(D, "seed"),
        device_option(D),
        resize_option(D),
        _overwrite(D),
    ]


@_stage("demo", _demo_options)
def demo_cmd(**opts: Any) -> None:
    """Plant a feature (a red square by default) on one digit class, fine-tune a tiny CLIP, and let RaVL find it
    (offline, ~1 min on CPU)."""
    from ravl_engine.demo import DemoConfig, run_demo  # noqa: PLC0415

    summary = run_demo(DemoConfig(**opts), on_step=lambda name: click.echo(f"[demo] {name}", err=True)).to_dict()
    found = summary["found"]
    click.echo(
        f"[demo] planted {summary['planted']['feature']!r} on class {summary['planted']['class']}; top cluster: class "
        f"{found['class']}, Precision@10 {found['precision_at_10']}; discovery: {summary['paths']['discovery']}",
        err=True,
    )
    _emit(summary)


if __name__ == "__main__":
    main()
