"""One scene-level controlled setting end to end: synth --layout scene, finetune the 112 px tiny ResNet from
scratch, embed with the manifest proposer, cluster, evaluate. Prints one JSON line (validity gaps, Precision@k,
image / region metrics per region kind, the counterfactual flip rate, timings).

    nice -n 10 .venv/bin/python -m bench.bench_scene --out /tmp/scene-bench >> bench/results/scene-DATE.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True, help="Work folder (replaced).")
    ap.add_argument("--spurious-class", type=int, default=3)
    ap.add_argument("--cramers-v", type=float, default=0.9)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-eval", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--model", default="ravl-tiny-rn-112")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from ravl_engine.cluster import ClusterConfig, run_cluster
    from ravl_engine.controlled import SynthConfig, run_synth
    from ravl_engine.embed import EmbedConfig, run_embed
    from ravl_engine.evaluate import EvaluateConfig, run_evaluate
    from ravl_engine.finetune import FinetuneConfig, run_finetune

    out = Path(args.out)
    seconds: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        seconds[name] = round(now - t, 1)
        t = now

    synth = run_synth(
        SynthConfig(
            out=str(out / "data"),
            layout="scene",
            spurious_class=args.spurious_class,
            cramers_v=args.cramers_v,
            n_train=args.n_train,
            n_eval=args.n_eval,
            seed=args.seed,
            overwrite=True,
        )
    )
    lap("synth")
    tuned = run_finetune(
        FinetuneConfig(
            train=synth.train_manifest,
            out=str(out / "model.pt"),
            model=args.model,
            epochs=args.epochs,
            patience=args.epochs,
            seed=args.seed,
            overwrite=True,
        )
    )
    lap("finetune")
    run_embed(
        EmbedConfig(
            data=synth.eval_manifest,
            out=str(out / "run"),
            model=args.model,
            pretrained=tuned.checkpoint,
            proposer="manifest",
        )
    )
    lap("embed")
    clustered = run_cluster(
        ClusterConfig(run_dir=str(out / "run"), out=str(out / "audit"), seed=args.seed, overwrite=True)
    )
    lap("cluster")
    ev = run_evaluate(
        EvaluateConfig(
            data=synth.eval_manifest,
            pretrained=tuned.checkpoint,
            model=args.model,
            work=str(out / "run"),
            discovery=clustered.path,
            feature=synth.feature,
            spurious_class=str(args.spurious_class),
        )
    )
    lap("evaluate")
    doc = ev.to_dict()
    doc.pop("groups")
    print(
        json.dumps(
            {
                "bench": "scene",
                "layout": "scene",
                "model": args.model,
                "spurious_class": args.spurious_class,
                "cramers_v_target": args.cramers_v,
                "cramers_v_train": synth.realised_cramers_v_train,
                "n_train": args.n_train,
                "n_eval": args.n_eval,
                "epochs": args.epochs,
                "seed": args.seed,
                **doc,
                "seconds": seconds,
            }
        )
    )


if __name__ == "__main__":
    main()
