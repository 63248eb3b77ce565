"""Stage ``evaluate``: zero-shot accuracy overall and per group, validity gaps, Precision@k of a discovery.

Groups are class x feature-present (../shared/docs/RAVL_METHOD.md, "Controlled evaluation" and "Stage 2"). Image
metrics use every image; region overall / worst-group use the regions whose ground-truth label is a class name.

Region metrics per kind (``region_kinds``) score every labelled region: "digit" (label = a class name), "feature"
(the spurious feature), "distractor" (``distractor:<color>-<shape>``, scene sets) and "blank" ("none", empty
quadrant cells). A region is "correct" when it is predicted as its image's class (for a digit region, its own
class; for any other region, the class the image-level label gives it); ``spurious_rate`` is the share predicted as
the spurious class, the shortcut seen in the region path. Per kind, ``worst_class_accuracy`` is the lowest accuracy
over the classes (class x kind groups).

The paired counterfactual (``counterfactual``, from :func:`run_evaluate`) pastes the feature, cropped from an
evaluation image that shows it, into every feature-free evaluation image (into a blank cell, or at a free position
of a scene) and embeds them again: ``flip_rate`` is the share of feature-free images of the other classes, not
predicted as the spurious class before, that are predicted as it after the paste.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ravl_engine.controlled import DISTRACTOR_PREFIX
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
        region_kinds: per region kind ("digit", "feature", "distractor", "blank"): n_regions, accuracy (predicted
            as the image's class), spurious_rate (predicted as the spurious class), worst_class_accuracy, and
            per_class (class x kind groups). See the module docstring.
        counterfactual: the paired counterfactual (see :func:`counterfactual_flips`); None when not run.
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
    region_kinds: dict[str, dict[str, Any]] | None = None
    counterfactual: dict[str, Any] | None = None

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
    others = sorted(v for v in set(labels) - set(run.classes) - {"", "none"} if not v.startswith(DISTRACTOR_PREFIX))
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
    kinds = region_kind_metrics(labels, region_pred, data.labels[region_image], classes, name, a)
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
        region_kinds=kinds,
    )


KINDS = ("digit", "feature", "distractor", "blank")


def region_kind(label: str, classes: Sequence[str], feature: str) -> str | None:
    """The kind of a region label (see the module docstring); None for an unlabelled region ("")."""
    if label in classes:
        return "digit"
    if label == feature:
        return "feature"
    if label.startswith(DISTRACTOR_PREFIX):
        return "distractor"
    if label == "none":
        return "blank"
    return None


def region_kind_metrics(
    labels: Sequence[str] | np.ndarray,
    pred: np.ndarray,
    image_class: np.ndarray,
    classes: Sequence[str],
    feature: str,
    spurious: int,
) -> dict[str, dict[str, Any]]:
    """Per-kind region accuracy (predicted = the image's class) and spurious rate (predicted = ``spurious``).

    Args:
        labels: ground-truth region labels [R]; pred: predicted class index [R]; image_class: the class index of
            each region's image [R].
    """
    kind = np.array([region_kind(v, classes, feature) or "" for v in labels])
    ok = pred == image_class
    to_spurious = pred == spurious
    out: dict[str, dict[str, Any]] = {}
    for k in KINDS:
        sel = kind == k
        if not sel.any():
            continue
        per_class: list[dict[str, Any]] = []
        for y, cname in enumerate(classes):
            g = sel & (image_class == y)
            if g.any():
                per_class.append(
                    {
                        "class": cname,
                        "n_regions": int(g.sum()),
                        "accuracy": float(ok[g].mean()),
                        "spurious_rate": float(to_spurious[g].mean()),
                    }
                )
        out[k] = {
            "n_regions": int(sel.sum()),
            "accuracy": float(ok[sel].mean()),
            "spurious_rate": float(to_spurious[sel].mean()),
            "worst_class_accuracy": min(g["accuracy"] for g in per_class),
            "per_class": per_class,
        }
    return out


def counterfactual_flips(before: np.ndarray, after: np.ndarray, labels: np.ndarray, spurious: int) -> dict[str, Any]:
    """Paired counterfactual over feature-free images: predictions ``before`` and ``after`` pasting the feature.

    Eligible: images not of the spurious class and not predicted as it before. ``flip_rate``: share of the eligible
    predicted as the spurious class after (None when none is eligible). Accuracies over every image given.
    """
    before, after, labels = (np.asarray(v) for v in (before, after, labels))
    eligible = (labels != spurious) & (before != spurious)
    flips = eligible & (after == spurious)
    return {
        "n_images": int(labels.size),
        "n_eligible": int(eligible.sum()),
        "n_flipped": int(flips.sum()),
        "flip_rate": float(flips.sum() / eligible.sum()) if eligible.any() else None,
        "accuracy_before": float((before == labels).mean()) if labels.size else None,
        "accuracy_after": float((after == labels).mean()) if labels.size else None,
    }


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


def evaluate_dir(
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


@dataclass(frozen=True, slots=True, kw_only=True)
class EvaluateConfig:
    """Options of ``ravl-engine evaluate``.

    Attributes:
        data: evaluation manifest with ``boxes`` and ``region_labels``.
        pretrained, model: the model to evaluate (checkpoint file or tag, architecture).
        work: run directory for the embeddings (kept; resumed if complete); None = a temporary directory. The
            counterfactual images and their embeddings go to ``<work>-counterfactual`` beside it when it is given.
        discovery: a ``discovery.json`` to score (Precision@k); None = none.
        feature: region label of the spurious feature (default: the only non-class, non-distractor label).
        spurious_class: the class tested against the feature (default: the largest gap).
        counterfactual: also run the paired counterfactual (one more embedding pass over the feature-free images).
        device, resize: as in ``EmbedConfig``.
    """

    data: str
    pretrained: str | None = None
    model: str = "ravl-tiny-rn"
    work: str | None = None
    discovery: str | None = None
    feature: str | None = None
    spurious_class: str | None = None
    counterfactual: bool = True
    device: str = "cpu"
    resize: str = "squash"


def run_evaluate(cfg: EvaluateConfig) -> EvalResult:
    """Embed the evaluation manifest (its ``boxes`` as regions) with the model, evaluate it, and, with
    ``cfg.counterfactual``, add the paired counterfactual.

    Raises:
        ConfigError: an unreadable discovery (checked before embedding), a manifest without region labels, a
            feature that is not among them, or no image showing the feature to paste.
    """
    import tempfile  # noqa: PLC0415

    if cfg.discovery is not None:
        load_discovery(cfg.discovery)  # before minutes of embedding, not after
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(cfg.work) if cfg.work is not None else Path(tmp)
        target = work if cfg.work is not None else work / "run"
        _embed(cfg, cfg.data, target)
        result = evaluate_dir(
            target, discovery_path=cfg.discovery, feature=cfg.feature, spurious_class=cfg.spurious_class
        )
        if not cfg.counterfactual:
            return result
        cf_dir = (Path(cfg.work).parent / f"{Path(cfg.work).name}-counterfactual") if cfg.work else work / "cf"
        manifest, originals = write_counterfactuals(cfg.data, result.feature, cf_dir / "images", seed=0)
        _embed(cfg, str(manifest), cf_dir / "run")
        base, pasted = read_run(target), read_run(cf_dir / "run")
        text = torch.from_numpy(base.text_emb)
        row_of = {i: k for k, i in enumerate(base.data.ids)}
        picked = np.array([row_of[i] for i in originals])
        before, after = _image_pred(base, text)[picked], _image_pred(pasted, text)
        truth = base.data.labels[picked]
        index = {c: k for k, c in enumerate(base.classes)}
        flips = counterfactual_flips(before, after, truth, index[result.spurious_class])
        return dataclasses.replace(result, counterfactual=flips)


def _image_pred(run: RunData, text: torch.Tensor) -> np.ndarray:
    return zero_shot_probs(torch.from_numpy(run.data.image_emb), text, temperature=TEMPERATURE).argmax(1).numpy()


def _embed(cfg: EvaluateConfig, data: str, out: Path) -> None:
    from ravl_engine.embed import EmbedConfig, run_embed  # noqa: PLC0415

    run_embed(
        EmbedConfig(
            data=str(data),
            out=str(out),
            model=cfg.model,
            pretrained=cfg.pretrained,
            proposer="manifest",
            device=cfg.device,
            resize=cfg.resize,
        )
    )


def write_counterfactuals(
    manifest: str | Path, feature: str, out: str | Path, *, seed: int = 0
) -> tuple[Path, list[str]]:
    """Paste the feature into every feature-free image of an evaluation manifest; write the images and a manifest.

    The patch is the pixels of the feature's box in the first image that shows it. It goes into the first blank
    ("none") box that can hold it, centred (quadrant sets), else at a random position apart from every listed box
    (scene sets; drawn from ``seed``). The new manifest lists the pasted box with the feature's label.

    Returns:
        The new manifest's path and the original ``image`` ids of its rows, in order.

    Raises:
        ConfigError: no row shows the feature, or an image has no room for it.
    """

    from PIL import Image  # noqa: PLC0415

    from ravl_engine.controlled import place_boxes, write_csv  # noqa: PLC0415
    from ravl_engine.manifest import read_manifest  # noqa: PLC0415

    rows = read_manifest(manifest)
    source = next((r for r in rows if r.region_labels and feature in r.region_labels), None)
    if source is None:
        raise ConfigError(f"{manifest}: no image shows the feature {feature!r}; the counterfactual needs one to copy")
    source_boxes, source_kinds = source.boxes or (), list(source.region_labels or ())
    x1, y1, x2, y2 = (int(round(v)) for v in source_boxes[source_kinds.index(feature)])
    patch = np.asarray(Image.open(source.path).convert("RGB"))[y1:y2, x1:x2]
    ph, pw = patch.shape[:2]
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written, ids = [], []
    for k, r in enumerate(rows):
        labels = list(r.region_labels or [])
        if feature in labels:
            continue
        img = np.array(Image.open(r.path).convert("RGB"))
        boxes = [[float(v) for v in b] for b in (r.boxes or [])]
        blank = next(
            (
                j
                for j, (b, lab) in enumerate(zip(boxes, labels, strict=True))
                if lab == "none" and b[2] - b[0] >= pw and b[3] - b[1] >= ph
            ),
            None,
        )
        if blank is not None:
            b = boxes[blank]
            px, py = int(b[0] + (b[2] - b[0] - pw) // 2), int(b[1] + (b[3] - b[1] - ph) // 2)
            labels[blank] = feature
        else:
            if ph != pw:
                raise ConfigError(f"{manifest}: the feature's box is not square ({pw} x {ph})")
            try:
                px, py = place_boxes([pw], min(img.shape[:2]), rng, taken=boxes)[0][:2]
            except ConfigError as err:
                raise ConfigError(f"{manifest}: image {r.image!r} has no free place for the feature ({err})") from err
            boxes.append([px, py, px + pw, py + ph])
            labels.append(feature)
        img[py : py + ph, px : px + pw] = patch
        name = f"cf_{k:06d}.png"
        Image.fromarray(img).save(out / name)
        written.append(
            {
                "image": name,
                "label": r.label,
                "boxes": json.dumps([[round(v, 2) for v in b] for b in boxes]),
                "region_labels": json.dumps(labels),
            }
        )
        ids.append(r.image)
    if not written:
        raise ConfigError(f"{manifest}: every image shows the feature {feature!r}; no counterfactual to make")
    path = out / "counterfactual.csv"
    write_csv(path, written)
    return path, ids


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
        discovery_path, feature, spurious_class: as in :func:`evaluate_dir`.
        device, resize: as in ``EmbedConfig``.
    """
    return run_evaluate(
        EvaluateConfig(
            data=str(data),
            pretrained=pretrained,
            model=model,
            work=str(run_dir) if run_dir is not None else None,
            discovery=str(discovery_path) if discovery_path is not None else None,
            feature=feature,
            spurious_class=spurious_class,
            counterfactual=False,
            device=device,
            resize=resize,
        )
    )
