"""Discovery accuracy on controlled MNIST settings: does ravl-engine's top cluster hold the planted feature?

For every (spurious class, Cramer's V, seed): synth from MNIST idx files -> fine-tune the tiny CLIP from scratch ->
embed the evaluation set -> cluster -> evaluate. One JSON line per setting: the validity gaps, ravl-engine's
Precision@10 and the random ranking's (the share of feature regions among all regions, its expected value).

    python -m bench.bench_accuracy                                      # 3 classes x V in {0.9, 0.99}, seed 0
    python -m bench.bench_accuracy --classes 3,5,8 --cramers-v 0.9,0.99 --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench.common import add_source_option


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_option(parser)
    parser.add_argument("--classes", default="3,5,8", help="spurious classes")
    parser.add_argument("--cramers-v", default="0.9,0.99")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--n-eval", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args(argv)

    import numpy as np

    from ravl_engine.demo import DemoConfig, run_demo
    from ravl_engine.shards import read_run

    for cls in (int(c) for c in args.classes.split(",")):
        for v in (float(x) for x in args.cramers_v.split(",")):
            for seed in (int(s) for s in args.seeds.split(",")):
                t0 = time.perf_counter()
                with tempfile.TemporaryDirectory() as tmp:
                    summary = run_demo(
                        DemoConfig(
                            out=tmp,
                            source=args.source,
                            spurious_class=cls,
                            cramers_v=v,
                            n_train=args.n_train,
                            n_eval=args.n_eval,
                            epochs=args.epochs,
                            seed=seed,
                        )
                    ).to_dict()
                    labels = np.array(read_run(Path(tmp) / "run").data.region_labels)
                    random_p10 = float(np.mean(labels == summary["planted"]["feature"]))
                print(
                    json.dumps(
                        {
                            "bench": "accuracy",
                            "source": os.path.basename(args.source.rstrip("/")),
                            "spurious_class": cls,
                            "cramers_v": v,
                            "realised_v": summary["planted"]["cramers_v"],
                            "seed": seed,
                            "valid": summary["validity"]["valid"],
                            "gap_spurious": summary["validity"]["gap_spurious"],
                            "gap_other": summary["validity"]["gap_other"],
                            "top_class": summary["found"]["class"],
                            "precision_at_10": summary["found"]["precision_at_10"],
                            "random_precision_at_10": random_p10,
                            "image_overall": summary["metrics"]["image_overall"],
                            "seconds": time.perf_counter() - t0,
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
