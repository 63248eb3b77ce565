"""Stage ``evaluate``: zero-shot accuracy overall and per group, validity gaps, Precision@k of a discovery.

Groups are class x feature-present (../shared/docs/RAVL_METHOD.md, "Controlled evaluation" and "Stage 2"). Image
metrics use every image; region metrics use the regions whose ground-truth label is a class name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ravl_engine.documents import Discovery, read_discovery
from ravl_engine.errors import ConfigError
from ravl_engine.shards import RunData, read_run
from ravl_engine.zeroshot import TEMPERATURE, zero_shot_probs

VALIDITY_GAP = 0.10


@dataclass(frozen=True)
class EvalResult:
    """Evaluation metrics (accuracies in [0, 1]).

    Attributes:
        feature: the spurious feature's region label.
        spurious_class: the class the feature is tested against.
        image_overall, image_worst_group, region_overall, region_worst_group: RaVL's four metrics.
        groups: per (class, feature present): image and region accuracy and counts.
        gap_spurious: acc(spurious class | feature) - acc(spurious class | no feature).
        gap_other: the largest acc(y | no feature) - acc(y | feature) over the other classes.
        valid: both gaps above 10 points (the model learned the correlation).
        precision_at_k: Precision@k of the discovery's top cluster (None without a discovery).
    """

    feature: str
    spurious_class: str
    image_overall: float
    image_worst_group: float
    region_overall: float
    region_worst_group: float
    groups: list[dict[str, Any]]
    gap_spurious: float
    gap_other: float
    valid: bool
    precision_at_k: dict[str, float] | None = None
    top_cluster_class: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _feature_name(run: RunData, feature: str | None) -> str:
    labels = run.data.region_labels
    if labels is None:
        raise ConfigError("the run has no region labels; embed an evaluation manifest with 'region_labels'")
    if feature is not None:
        if feature not in set(labels):
            raise ConfigError(f"feature {feature!r} is not among the region labels {sorted(set(labels))}")
        return feature
    others = sorted(set(labels) - set(run.classes) - {"", "none"})
    if len(others) != 1:
        raise ConfigError(f"cannot tell the feature from the region labels {others}; pass --feature NAME")
    return others[0]


def evaluate_run(
    run: RunData,
    *,
    feature: str | None = None,
    spurious_class: str | None = None,
    discovery: Discovery | None = None,
    ks: tuple[int, ...] = (10, 25),
    temperature: float = TEMPERATURE,
) -> EvalResult:
    """Metrics of an embedded evaluation set (see :class:`EvalResult`)."""
    data, classes = run.data, run.classes
    name = _feature_name(run, feature)
    labels = np.array(data.region_labels)
    region_image = np.repeat(np.arange(len(data.ids)), data.num_regions)
    present = np.zeros(len(data.ids), bool)
    present[region_image[labels == name]] = True
    text = torch.from_numpy(run.text_emb)
    image_pred = zero_shot_probs(torch.from_numpy(data.image_emb), text, temperature=temperature).argmax(1).numpy()
    region_pred = zero_shot_probs(torch.from_numpy(data.region_emb), text, temperature=temperature).argmax(1).numpy()
    class_index = {c: i for i, c in enumerate(classes)}
    is_class_region = np.isin(labels, classes)
    region_truth = np.array([class_index.get(v, -1) for v in labels])
    image_ok = image_pred == data.labels
    region_ok = region_pred == region_truth

    groups: list[dict[str, Any]] = []
    for y, cname in enumerate(classes):
        for flag in (False, True):
            img = (data.labels == y) & (present == flag)
            reg = is_class_region & (region_truth == y) & (present[region_image] == flag)
            groups.append(
                {
                    "class": cname,
                    "feature_present": flag,
                    "n_images": int(img.sum()),
                    "image_accuracy": float(image_ok[img].mean()) if img.any() else None,
                    "n_regions": int(reg.sum()),
                    "region_accuracy": float(region_ok[reg].mean()) if reg.any() else None,
                }
            )

    def acc(y: int, flag: bool) -> float | None:
        return next(g["image_accuracy"] for g in groups if g["class"] == classes[y] and g["feature_present"] == flag)

    with_minus_without = {
        y: (acc(y, True) or 0.0) - (acc(y, False) or 0.0)
        for y in range(len(classes))
        if acc(y, True) is not None and acc(y, False) is not None
    }
    if not with_minus_without:
        raise ConfigError("no class has images both with and without the feature; the evaluation set is too small")
    if spurious_class is None:
        a = max(with_minus_without, key=lambda y: with_minus_without[y])
    elif spurious_class in class_index:
        a = class_index[spurious_class]
    else:
        raise ConfigError(f"spurious class {spurious_class!r} is not among the classes {classes}")
    gap_spurious = with_minus_without.get(a, 0.0)
    gap_other = max((-v for y, v in with_minus_without.items() if y != a), default=0.0)

    image_groups = [g["image_accuracy"] for g in groups if g["image_accuracy"] is not None]
    region_groups = [g["region_accuracy"] for g in groups if g["region_accuracy"] is not None]
    precision, top_class = None, None
    if discovery is not None:
        precision, top_class = _precision(discovery, data.ids, region_image, data.boxes, labels, name, ks)
    return EvalResult(
        feature=name,
        spurious_class=classes[a],
        image_overall=float(image_ok.mean()),
        image_worst_group=float(min(image_groups)),
        region_overall=float(region_ok[is_class_region].mean()) if is_class_region.any() else float("nan"),
        region_worst_group=float(min(region_groups)) if region_groups else float("nan"),
        groups=groups,
        gap_spurious=gap_spurious,
        gap_other=gap_other,
        valid=gap_spurious > VALIDITY_GAP and gap_other > VALIDITY_GAP,
        precision_at_k=precision,
        top_cluster_class=top_class,
    )


def _precision(
    discovery: Discovery,
    ids: list[str],
    region_image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    feature: str,
    ks: tuple[int, ...],
) -> tuple[dict[str, float], str | None]:
    """Precision@k of the top cluster: share of its first k regions whose ground-truth label is the feature.

    Regions are matched by (image, box), the way discovery.json names them.
    """
    if not discovery.clusters:
        return {f"p@{k}": 0.0 for k in ks}, None
    truth_of = {
        (ids[int(i)], tuple(np.round(box.astype(np.float64), 2))): label
        for i, box, label in zip(region_image, boxes, labels, strict=True)
    }
    top = discovery.clusters[0]
    hits = [
        truth_of.get((r.image, tuple(np.round(np.asarray(r.box, dtype=np.float64), 2)))) == feature for r in top.regions
    ]
    return {f"p@{k}": float(np.mean(hits[:k])) if hits else 0.0 for k in ks}, top.class_name


def run_evaluate(
    run_dir: str | Path,
    *,
    discovery_path: str | Path | None = None,
    feature: str | None = None,
    spurious_class: str | None = None,
) -> EvalResult:
    """Evaluate an embedded evaluation set (a run directory) and, optionally, a discovery.json against it."""
    discovery = load_discovery(discovery_path) if discovery_path is not None else None
    return evaluate_run(read_run(run_dir), feature=feature, spurious_class=spurious_class, discovery=discovery)


def load_discovery(path: str | Path) -> Discovery:
    """Read a ``discovery.json`` written by ``ravl-engine cluster`` (:func:`ravl_engine.documents.read_discovery`).

    Raises:
        ConfigError: unreadable file, not JSON, another document (``discover --out`` names regions by index only)
            or an older one; one line naming the file and the fix.
    """
    return read_discovery(path)


def evaluate_checkpoint(
    data: str | Path,
    *,
    pretrained: str | None,
    model: str = "ravl-tiny-rn",
    run_dir: str | Path | None = None,
    discovery_path: str | Path | None = None,
    feature: str | None = None,
    spurious_class: str | None = None,
    device: str = "cpu",
    resize: str = "squash",
) -> EvalResult:
    """Embed an evaluation manifest (its ``boxes`` as regions) with a model and evaluate it.

    Args:
        data: evaluation manifest with ``boxes`` and ``region_labels``.
        pretrained, model: the model to evaluate (checkpoint file or tag, architecture).
        run_dir: where the embeddings go (kept; resumed if complete); None = a temporary directory.
        discovery_path, feature, spurious_class: as in :func:`run_evaluate`.
        device, resize: as in ``EmbedConfig``.
    """
    import tempfile  # noqa: PLC0415

    from ravl_engine.embed import EmbedConfig, run_embed  # noqa: PLC0415

    if discovery_path is not None:
        load_discovery(discovery_path)  # before minutes of embedding, not after
    with tempfile.TemporaryDirectory() as tmp:
        target = str(run_dir) if run_dir is not None else str(Path(tmp) / "run")
        run_embed(
            EmbedConfig(
                data=str(data),
                out=target,
                model=model,
                pretrained=pretrained,
                proposer="manifest",
                device=device,
                resize=resize,
            )
        )
        return run_evaluate(target, discovery_path=discovery_path, feature=feature, spurious_class=spurious_class)
