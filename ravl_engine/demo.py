"""``ravl-engine demo``: the whole audit on a controlled setting, offline, on a CPU, in about a minute.

synth (scikit-learn's bundled digits, a red square tied to one class) -> finetune a tiny CLIP from scratch ->
embed the evaluation set (quadrant boxes) -> cluster (RaVL discovery) -> evaluate (validity, Precision@k).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ravl_engine.cluster import ClusterConfig, run_cluster
from ravl_engine.controlled import SynthConfig, check_feature, run_synth
from ravl_engine.embed import EmbedConfig, run_embed
from ravl_engine.evaluate import evaluate_dir
from ravl_engine.finetune import FinetuneConfig, run_finetune
from ravl_engine.images import check_resize
from ravl_engine.models import DEFAULT_MODEL
from ravl_engine.outputs import clear_out


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoConfig:
    """Options of ``ravl-engine demo`` (defaults: the measured offline setting, about a minute on 2 cores).

    ``pretrained`` / ``lr`` start the fine-tuning from weights instead of from scratch (the mitigation benchmark's
    protocol); ``model`` is any ``--model`` value (``hf:`` folders included); ``resize`` is that of ``finetune``
    and ``embed``; ``shape`` / ``color`` (the planted feature) and ``layout`` / ``image_size`` are synth's (a scene
    layout wants a 112 px model such as ``ravl-tiny-rn-112``); the other fields are those of ``synth`` and
    ``finetune``. ``overwrite`` replaces a non-empty ``out`` (default: refuse): the old demo's files are removed
    first, so seeds never mix.
    """

    out: str = "ravl-demo"
    source: str = "sklearn"
    spurious_class: int = 3
    cramers_v: float = 0.9
    shape: str = "square"
    color: str = "red"
    n_train: int = 3000
    n_eval: int = 1000
    epochs: int = 6
    layout: str = "quadrants"
    image_size: int = 112
    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    lr: float | None = None
    seed: int = 0
    device: str = "cpu"
    resize: str = "squash"
    overwrite: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoResult:
    """What the demo planted and found (``to_dict`` is the JSON summary ``ravl-engine demo`` prints).

    Attributes:
        planted: the feature, its class and the realised Cramér's V of the training set.
        found: the top cluster's class, gap and influence (None without a cluster) and its Precision@10.
        found_planted_feature: the top cluster is the planted class with Precision@10 >= 0.8.
        validity: ``EvalResult``'s valid, gap_spurious and gap_other.
        metrics: image / region overall and worst-group zero-shot accuracy.
        finetune: the kept epoch and its held-out zero-shot accuracy.
        paths: discovery.json, the checkpoint, the evaluation run directory.
        seconds: per step.
        config: the ``DemoConfig``'s fields.
    """

    planted: dict[str, Any]
    found: dict[str, Any]
    found_planted_feature: bool
    validity: dict[str, Any]
    metrics: dict[str, float]
    finetune: dict[str, Any]
    paths: dict[str, str]
    seconds: dict[str, float]
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_demo(cfg: DemoConfig, *, on_step: Callable[[str], None] | None = None) -> DemoResult:
    """Run the demo: synth, finetune, embed, cluster, evaluate (``on_step`` is called with each step's name)."""
    out = Path(cfg.out)
    check_resize(cfg.resize)
    check_feature(cfg.shape, cfg.color)  # before clear_out: a typo must not cost the old demo
    clear_out(out, overwrite=cfg.overwrite)
    seconds: dict[str, float] = {}

    def step(name: str) -> None:
        seconds[name] = time.perf_counter()
        if on_step is not None:
            on_step(name)

    step("synth")
    synth = run_synth(
        SynthConfig(
            out=str(out / "data"),
            source=cfg.source,
            spurious_class=cfg.spurious_class,
            cramers_v=cfg.cramers_v,
            shape=cfg.shape,
            color=cfg.color,
            n_train=cfg.n_train,
            n_eval=cfg.n_eval,
            layout=cfg.layout,
            image_size=cfg.image_size,
            seed=cfg.seed,
        )
    )
    step("finetune")
    tuned = run_finetune(
        FinetuneConfig(
            train=synth.train_manifest,
            out=str(out / "model.pt"),
            model=cfg.model,
            pretrained=cfg.pretrained,
            lr=cfg.lr,
            epochs=cfg.epochs,
            patience=cfg.epochs,
            seed=cfg.seed,
            device=cfg.device,
            resize=cfg.resize,
        )
    )
    step("embed")
    run_embed(
        EmbedConfig(
            data=synth.eval_manifest,
            out=str(out / "run"),
            model=cfg.model,
            pretrained=tuned.checkpoint,
            proposer="manifest",
            device=cfg.device,
            resize=cfg.resize,
        )
    )
    step("cluster")
    clustered = run_cluster(ClusterConfig(run_dir=str(out / "run"), out=str(out / "audit"), seed=cfg.seed))
    step("evaluate")
    evaluation = evaluate_dir(
        out / "run", discovery_path=clustered.path, feature=synth.feature, spurious_class=str(cfg.spurious_class)
    )
    step("end")
    names = list(seconds)
    timing = {a: seconds[b] - seconds[a] for a, b in zip(names, names[1:], strict=False)}
    top = clustered.document.clusters[0] if clustered.document.clusters else None
    return DemoResult(
        planted={
            "feature": synth.feature,
            "class": str(cfg.spurious_class),
            "cramers_v": synth.realised_cramers_v_train,
        },
        found={
            "class": top.class_name if top else None,
            "gap": top.gap if top else None,
            "influence": top.influence if top else None,
            "precision_at_10": (evaluation.precision_at_k or {}).get("p@10"),
        },
        found_planted_feature=bool(
            top is not None
            and top.class_name == str(cfg.spurious_class)
            and (evaluation.precision_at_k or {}).get("p@10", 0.0) >= 0.8
        ),
        validity={
            "valid": evaluation.valid,
            "gap_spurious": evaluation.gap_spurious,
            "gap_other": evaluation.gap_other,
        },
        metrics={
            "image_overall": evaluation.image_overall,
            "image_worst_group": evaluation.image_worst_group,
            "region_overall": evaluation.region_overall,
            "region_worst_group": evaluation.region_worst_group,
        },
        finetune={"best_epoch": tuned.best_epoch, "val_zero_shot_accuracy": tuned.best_val},
        paths={"discovery": clustered.path, "checkpoint": tuned.checkpoint, "run_dir": str(out / "run")},
        seconds=timing,
        config=dataclasses.asdict(cfg),
    )
