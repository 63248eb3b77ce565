"""Mitigation on controlled MNIST settings: the five methods' image and region overall / worst-group accuracy.

The paper's protocol, scaled down to the tiny CLIP: a "pretrained" model is trained from scratch on a neutral set
(``synth --cramers-v 0``: the red square on half the images, independent of the class; digits from the
training pool, none from the evaluation sets). For every
(spurious class, Cramer's V, seed): synth a setting, fine-tune the pretrained model on its training set
(``ravl-engine finetune``: this is Standard FT and the audited model), embed the evaluation set, run discovery;
then every other method fine-tunes the same pretrained model with the same schedule (``ravl-engine mitigate``), its
checkpoint embeds the evaluation set and is evaluated. One JSON line per (setting, seed, method), one summary line
per method (mean and sample standard deviation over the runs), and a Markdown table on stderr.

    python -m bench.bench_mitigate                                      # classes 3,5,8 x V 0.99 x seeds 0,1,2
    python -m bench.bench_mitigate --classes 3 --seeds 0 --methods standard,ravl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
METRICS = ("image_overall", "image_worst_group", "region_overall", "region_worst_group")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(DEFAULT_MNIST), help="folder of MNIST idx files, or 'sklearn'")
    parser.add_argument("--classes", default="3,5,8", help="spurious classes")
    parser.add_argument("--cramers-v", default="0.99")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="standard,upsampled,vl-erm,vl-gdro,ravl")
    parser.add_argument("--n-pretrain", type=int, default=3000, help="images of the neutral pretraining set")
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--n-eval", type=int, default=1000)
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    parser.add_argument("--pretrain-lr", type=float, default=5e-4)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate")
    parser.add_argument("--reduction", default="mean", choices=["sum", "mean"])
    parser.add_argument("--select", default="accuracy", choices=["accuracy", "worst-group", "last"])
    args = parser.parse_args(argv)

    import numpy as np

    from ravl_engine.controlled import SynthConfig, run_synth
    from ravl_engine.demo import DemoConfig, run_demo
    from ravl_engine.evaluate import evaluate_checkpoint
    from ravl_engine.finetune import FinetuneConfig, run_finetune
    from ravl_engine.mitigate import MitigateConfig, run_mitigate

    methods = args.methods.split(",")
    rows: dict[str, list[dict]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp_root:
        root = Path(tmp_root)
        for seed in (int(s) for s in args.seeds.split(",")):
            neutral = run_synth(
                SynthConfig(
                    out=str(root / f"neutral-{seed}"),
                    source=args.source,
                    cramers_v=0.0,
                    n_train=args.n_pretrain,
                    n_eval=20,
                    seed=100 + seed,
                )
            )
            pretrained = run_finetune(
                FinetuneConfig(
                    train=neutral.train_manifest,
                    out=str(root / f"pretrained-{seed}.pt"),
                    epochs=args.pretrain_epochs,
                    patience=args.pretrain_epochs,
                    lr=args.pretrain_lr,
                    seed=seed,
                )
            )
            print(
                json.dumps({"bench": "mitigate-pretrain", "seed": seed, "val_zero_shot_accuracy": pretrained.best_val}),
                flush=True,
            )
            base = pretrained.checkpoint
            for cls in (int(c) for c in args.classes.split(",")):
                for v in (float(x) for x in args.cramers_v.split(",")):
                    out = root / f"c{cls}-v{v}-s{seed}"
                    # the audit: synth, Standard FT from the pretrained weights, embed, discovery, evaluation
                    audit = run_demo(
                        DemoConfig(
                            out=str(out),
                            source=args.source,
                            spurious_class=cls,
                            cramers_v=v,
                            n_train=args.n_train,
                            n_eval=args.n_eval,
                            epochs=args.epochs,
                            pretrained=base,
                            lr=args.lr,
                            seed=seed,
                        )
                    ).to_dict()
                    data = out / "data"
                    for method in methods:
                        t0 = time.perf_counter()
                        if method == "standard":
                            metrics = {**audit["metrics"], **audit["validity"]}
                            info: dict = {
                                "best_epoch": audit["finetune"]["best_epoch"],
                                "step_seconds": None,
                                "seconds": audit["seconds"]["finetune"],
                            }
                        else:
                            result = run_mitigate(
                                MitigateConfig(
                                    train=str(data / "train.csv"),
                                    discovery=audit["paths"]["discovery"],
                                    out=str(out / f"{method}.pt"),
                                    method=method,
                                    pretrained=base,
                                    lr=args.lr,
                                    work_dir=str(out / "train-regions"),
                                    epochs=args.epochs,
                                    patience=args.epochs,
                                    reduction=args.reduction,
                                    select=args.select,
                                    seed=seed,
                                )
                            )
                            ev = evaluate_checkpoint(
                                data / "eval.csv",
                                pretrained=result.checkpoint,
                                run_dir=out / f"eval-{method}",
                                feature=audit["planted"]["feature"],
                                spurious_class=str(cls),
                            )
                            metrics = ev.to_dict()
                            info = {
                                "best_epoch": result.best_epoch,
                                "step_seconds": result.step_seconds,
                                "spurious_regions": result.n_spurious_regions,
                                "seconds": time.perf_counter() - t0,
                            }
                        line = {
                            "bench": "mitigate",
                            "spurious_class": cls,
                            "cramers_v": v,
                            "seed": seed,
                            "method": method,
                            "audit_top_class": audit["found"]["class"],
                            **{m: metrics[m] for m in (*METRICS, "gap_spurious", "gap_other", "valid")},
                            **info,
                        }
                        rows[method].append(line)
                        print(json.dumps(line), flush=True)
    table = ["| method | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for method in methods:
        stats = {}
        for m in METRICS:
            values = np.array([r[m] for r in rows[method]], dtype=float)
            stats[m] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if values.size > 1 else 0.0}
        print(
            json.dumps({"bench": "mitigate-summary", "method": method, "runs": len(rows[method]), **stats}), flush=True
        )
        cells = [f"{100 * stats[m]['mean']:.1f} ± {100 * stats[m]['std']:.1f}" for m in METRICS]
        table.append(f"| {method} | " + " | ".join(cells) + " |")
    print("\n".join(table), file=sys.stderr)


if __name__ == "__main__":
    main()
