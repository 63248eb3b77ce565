"""Mitigation on controlled MNIST settings: the five methods through one training loop, paired, valid settings only.

The paper's protocol, scaled down to the tiny CLIP. A "pretrained" model is trained from scratch on a neutral set
(``synth --cramers-v 0``; digits from the training pool, none from the evaluation sets). For every (spurious class,
Cramer's V, seed): synth a setting, fine-tune the pretrained model on its training set at ``--lr`` (the audited
model), embed the evaluation set (the audit set), run discovery and check the setting: valid only if both validity
gaps exceed 10 points and discovery's Precision@10 exceeds 0.6 (the paper's rule); invalid settings are counted and
reported, not mitigated. On a valid setting every method (``standard``, ``upsampled``, ``vl-erm``, ``vl-gdro``,
``ravl``) runs through ``run_mitigate`` (one training loop, one generator seeded with the run's seed) from the same
pretrained weights and the same discovery, at ``--mitigate-lr`` (quadrants 5e-5, the paper's; scenes 5e-4); the
epoch is kept by ``--select`` (default ``pseudo-group``: the audit set's selection half, split by a seeded hash of
the image id); every checkpoint is evaluated on the audit set's disjoint *test half*. One JSON line per (setting,
seed, method); then, per method, the mean of each metric, and the mean and 95% t-interval of RaVL's paired
difference to every baseline (pairs = the same setting and seed).

A method may name its sampler and RaVL its image term: ``ravl+balanced`` is RaVL's loss with the baselines'
group-balanced sampler over the discovered groups (``mitigate --sampler balanced``), ``ravl+masked`` RaVL with the
feature-masked image term (``mitigate --image-term masked``); every RaVL arm is compared, paired, with every other
method. An arm without an image term runs without one: ``ravl`` is the paper's loss (``--image-term none``), not
``mitigate``'s default, which is ``ravl+counterfactual``.

    python -m bench.bench_mitigate                                      # classes 3,5,8 x V 0.99 x seeds 0,1,2
    python -m bench.bench_mitigate --classes 3 --seeds 0 --methods standard,ravl,ravl+balanced,ravl+masked
    python -m bench.bench_mitigate --shape disk --color blue --classes 2,6,9 --seeds 5,6    # another feature
    python -m bench.bench_mitigate --pretrain-epochs 0 --start audited --keep-start     # a user's defaults: the
        # audited model trained from scratch (finetune's defaults), every method from it (mitigate's defaults)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.common import add_source_option

METRICS = ("image_overall", "image_worst_group", "region_overall", "region_worst_group")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_option(parser)
    parser.add_argument(
        "--family",
        default="quadrants",
        choices=["quadrants", "scene"],
        help="synth layout: MNIST quadrants (ravl-tiny-rn, 64 px) or scenes (ravl-tiny-rn-112, 112 px)",
    )
    parser.add_argument("--model", default=None, help="default: ravl-tiny-rn, or ravl-tiny-rn-112 for scenes")
    parser.add_argument("--classes", default="3,5,8", help="spurious classes")
    parser.add_argument("--cramers-v", default="0.99")
    parser.add_argument("--shape", default="square", help="the planted feature's shape (synth's SHAPES)")
    parser.add_argument("--color", default="red", help="the planted feature's colour (synth's COLORS)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="standard,upsampled,vl-erm,vl-gdro,ravl,ravl+balanced")
    parser.add_argument("--n-pretrain", type=int, default=3000, help="images of the neutral pretraining set")
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--n-eval", type=int, default=1000)
    parser.add_argument(
        "--pretrain-epochs",
        type=int,
        default=15,
        help="0 = no pretraining: the audited model and every method start from the same random init",
    )
    parser.add_argument("--pretrain-lr", type=float, default=5e-4)
    parser.add_argument(
        "--start",
        default="pretrained",
        choices=["pretrained", "audited"],
        help="what every method fine-tunes: the pretrained start (the paper's protocol) or the audited model itself "
        "(a user who has only the shortcut model: mitigate --pretrained AUDITED.pt; methods at 5e-5 unless given)",
    )
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate of the audited model's fine-tuning (5e-4; 1e-3 from scratch)",
    )
    parser.add_argument(
        "--mitigate-lr",
        type=float,
        default=None,
        help="learning rate of every method; default 5e-5 for quadrants (the paper's, and mitigate's default from "
        "weights), 1e-3 from scratch (mitigate's default there), 5e-4 for scenes (their weak start does not train "
        "at 5e-5 in 5 epochs: bench/results/mitigate-scene-lr5e-5-2026-12-04.jsonl)",
    )
    parser.add_argument(
        "--freeze-bn", action="store_true", help="every method with BatchNorm frozen (mitigate --freeze-bn)"
    )
    parser.add_argument("--reduction", default="mean", choices=["sum", "mean"])
    parser.add_argument("--select", default="pseudo-group", choices=["pseudo-group", "accuracy", "worst-group", "last"])
    parser.add_argument(
        "--keep-start",
        action="store_true",
        help="let the pretrained start (epoch 0) be the kept epoch; off by default: the start was trained on the "
        "same domain without the bias, and with it every method kept epoch 0 (bench/results/"
        "mitigate-2026-12-04-keep-start.jsonl)",
    )
    parser.add_argument("--clip-weight", type=float, default=0.8, help="lambda of the RaVL and VL losses")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the audit set's selection / test halves")
    parser.add_argument(
        "--include-invalid",
        action="store_true",
        help="mitigate invalid settings too (lines marked valid: false, left out of the summaries; for smoke runs)",
    )
    args = parser.parse_args(argv)

    from ravl_engine.demo import DemoConfig, run_demo
    from ravl_engine.evaluate import EvaluateConfig, run_evaluate
    from ravl_engine.mitigate import IMAGE_TERMS, METHODS, SAMPLERS, WITH_CLASSES, MitigateConfig, run_mitigate

    model = args.model or ("ravl-tiny-rn-112" if args.family == "scene" else "ravl-tiny-rn")
    scratch = args.pretrain_epochs == 0  # from scratch: the engine's default lr there (1e-3) unless given
    if args.lr is None:
        args.lr = 1e-3 if scratch else 5e-4
    if args.mitigate_lr is None:
        from_random_init = scratch and args.start == "pretrained"
        args.mitigate_lr = 1e-3 if from_random_init else 5e-4 if args.family == "scene" else 5e-5
    methods = args.methods.split(",")
    arms: dict[str, tuple[str, str, str]] = {}  # spec -> (method, sampler, image term)
    for spec in methods:
        name, *parts = spec.split("+")
        sampler = next((p for p in parts if p in SAMPLERS), "method")
        term = next((p for p in parts if p in IMAGE_TERMS), "none")
        if (
            name not in METHODS
            or any(p not in (*SAMPLERS, *IMAGE_TERMS) for p in parts)
            or sum(p in SAMPLERS for p in parts) > 1
            or sum(p in IMAGE_TERMS for p in parts) > 1
            or (term != "none" and name not in WITH_CLASSES)
        ):
            parser.error(
                f"--methods: {spec!r} is not METHOD[+SAMPLER][+IMAGE_TERM] ({', '.join(METHODS)}; "
                f"{', '.join(SAMPLERS)}; {', '.join(IMAGE_TERMS)} with {', '.join(WITH_CLASSES)})"
            )
        arms[spec] = (name, sampler, term)
    rows: dict[str, list[dict]] = {m: [] for m in methods}
    settings = {"valid": 0, "invalid": 0}
    with tempfile.TemporaryDirectory() as tmp_root:
        root = Path(tmp_root)
        for seed in (int(s) for s in args.seeds.split(",")):
            base = _pretrain(args, model, root, seed)
            for cls in (int(c) for c in args.classes.split(",")):
                for v in (float(x) for x in args.cramers_v.split(",")):
                    out = root / f"c{cls}-v{v}-s{seed}"
                    audit = run_demo(
                        DemoConfig(
                            out=str(out),
                            source=args.source,
                            spurious_class=cls,
                            cramers_v=v,
                            shape=args.shape,
                            color=args.color,
                            n_train=args.n_train,
                            n_eval=args.n_eval,
                            epochs=args.epochs,
                            layout=args.family,
                            model=model,
                            pretrained=base,
                            lr=args.lr,
                            seed=seed,
                        )
                    ).to_dict()
                    p10 = audit["found"].get("precision_at_10") or 0.0
                    gaps = (audit["validity"]["gap_spurious"], audit["validity"]["gap_other"])
                    valid = bool(audit["validity"]["valid"]) and p10 > 0.6
                    setting = {
                        "family": args.family,
                        "feature": audit["planted"]["feature"],
                        "spurious_class": cls,
                        "cramers_v": v,
                        "seed": seed,
                    }
                    _emit(
                        {"bench": "mitigate-setting", **setting, "valid": valid, "precision_at_10": p10, "gaps": gaps}
                    )
                    settings["valid" if valid else "invalid"] += 1
                    if audit["found"]["class"] is None or (not valid and not args.include_invalid):
                        continue  # nothing to mitigate without a spurious cluster
                    data = out / "data"
                    test_half = _test_half(data / "eval.csv", args.split_seed)
                    for method in methods:
                        t0 = time.perf_counter()
                        name, sampler, term = arms[method]
                        result = run_mitigate(
                            MitigateConfig(
                                train=str(data / "train.csv"),
                                discovery=audit["paths"]["discovery"],
                                out=str(out / f"{method}.pt"),
                                method=name,
                                sampler=sampler,
                                image_term=term,
                                pretrained=audit["paths"]["checkpoint"] if args.start == "audited" else base,
                                lr=args.mitigate_lr,
                                freeze_bn=args.freeze_bn,
                                work_dir=str(out / "train-regions"),
                                epochs=args.epochs,
                                patience=args.epochs,
                                clip_weight=args.clip_weight,
                                reduction=args.reduction,
                                select=args.select,
                                keep_start=args.keep_start,
                                audit_data=str(data / "eval.csv"),
                                split_seed=args.split_seed,
                                seed=seed,
                            )
                        )
                        ev = run_evaluate(
                            EvaluateConfig(
                                data=str(test_half),
                                model=model,
                                pretrained=result.checkpoint,
                                work=str(out / f"eval-{method}"),
                                feature=audit["planted"]["feature"],
                                spurious_class=str(cls),
                                counterfactual=True,
                            )
                        ).to_dict()
                        line = {
                            "bench": "mitigate",
                            **setting,
                            "method": method,
                            "sampler": result.sampler,
                            "image_term": result.image_term,
                            "valid": valid,
                            "select": args.select,
                            **{m: ev.get(m) for m in (*METRICS, "gap_spurious", "gap_other")},
                            "flip_rate": (ev.get("counterfactual") or {}).get("flip_rate"),
                            "start": args.start,
                            "keep_start": args.keep_start,
                            "lr": args.mitigate_lr,
                            "freeze_bn": args.freeze_bn,
                            "clip_weight": args.clip_weight,
                            "best_epoch": result.best_epoch,
                            "start_val": result.start_val,
                            "best_val": result.best_val,
                            "step_seconds": result.step_seconds,
                            "spurious_regions": result.n_spurious_regions,
                            "seconds": time.perf_counter() - t0,
                        }
                        if valid:
                            rows[method].append(line)
                        _emit(line)
    _emit({"bench": "mitigate-settings", **settings})
    emit_summaries(rows, [m for m in methods if arms[m][0] == "ravl"])


def emit_summaries(rows: dict[str, list[dict]], ravl_arms: list[str]) -> None:
    """Per method the mean of every metric; the paired differences of each RaVL arm to every baseline and to every
    RaVL arm listed before it (``ravl+masked`` minus ``ravl``).

    ``rows`` maps each method to its lines in one setting order (pairs = the same position); None values (a metric
    a run did not produce) are left out of the means and their pairs.
    """
    import numpy as np

    for method, lines in rows.items():
        stats = {m: _mean([r[m] for r in lines]) for m in (*METRICS, "flip_rate")}
        _emit({"bench": "mitigate-summary", "method": method, "runs": len(lines), **stats})
    for i, arm in enumerate(ravl_arms):  # each RaVL arm minus every baseline and every earlier RaVL arm
        for other in [*(m for m in rows if m not in ravl_arms), *ravl_arms[:i]]:
            for m in (*METRICS, "flip_rate"):
                pairs = [(a[m], b[m]) for a, b in zip(rows[arm], rows[other], strict=True)]
                diffs = np.array([a - b for a, b in pairs if a is not None and b is not None])
                better = int((diffs < 0).sum() if m == "flip_rate" else (diffs > 0).sum())
                line = {"bench": "mitigate-paired", "metric": m, "arm": arm, "minus": other, "better_in": better}
                _emit({**line, **_paired(diffs)})


def _pretrain(args: argparse.Namespace, model: str, root: Path, seed: int) -> str | None:
    """The seed's "pretrained" start: trained from scratch on a neutral set; None (random init) with 0 epochs."""
    from ravl_engine.controlled import SynthConfig, run_synth
    from ravl_engine.finetune import FinetuneConfig, run_finetune

    line = {"bench": "mitigate-pretrain", "family": args.family, "model": model, "seed": seed}
    if args.pretrain_epochs == 0:
        _emit({**line, "from_scratch": True})
        return None
    neutral = run_synth(
        SynthConfig(
            out=str(root / f"neutral-{seed}"),
            source=args.source,
            cramers_v=0.0,
            shape=args.shape,
            color=args.color,
            n_train=args.n_pretrain,
            n_eval=20,
            layout=args.family,
            seed=100 + seed,
        )
    )
    pretrained = run_finetune(
        FinetuneConfig(
            train=neutral.train_manifest,
            out=str(root / f"pretrained-{seed}.pt"),
            model=model,
            epochs=args.pretrain_epochs,
            patience=args.pretrain_epochs,
            lr=args.pretrain_lr,
            seed=seed,
        )
    )
    _emit({**line, "val_zero_shot_accuracy": pretrained.best_val})
    return pretrained.checkpoint


def _emit(line: dict) -> None:
    print(json.dumps(line), flush=True)


def _mean(values: list) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _paired(diffs) -> dict:
    """Mean of paired differences and its 95% t-interval (None with fewer than 2 pairs)."""
    from scipy import stats

    n = int(diffs.size)
    if n < 2:
        return {"n": n, "mean": float(diffs.mean()) if n else None, "ci95": None}
    half = float(stats.t.ppf(0.975, n - 1) * diffs.std(ddof=1) / n**0.5)
    mean = float(diffs.mean())
    return {"n": n, "mean": mean, "ci95": [mean - half, mean + half]}


def _test_half(manifest: Path, split_seed: int) -> Path:
    """The audit manifest's test half (rows outside the selection half), beside it so relative paths hold."""
    import csv

    from ravl_engine.controlled import write_csv
    from ravl_engine.selection import in_selection_half

    with manifest.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        kept = [row for row in reader if not in_selection_half(row["image"], split_seed)]
    out = manifest.with_name(f"eval-test-half-{split_seed}.csv")
    write_csv(out, kept, fields)
    return out


if __name__ == "__main__":
    main()
