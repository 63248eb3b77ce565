"""Pool bench_mitigate's raw lines from several invocations: per-method means and RaVL's paired differences.

A setting (feature, class, V, seed) counts when it is valid and every method seen has a line for it (an invocation
stopped mid-setting leaves its partial lines out); a setting run again by another invocation (with more arms, from
the same deterministic pretraining and audit) counts once, its arms merged. Prints the same ``mitigate-summary`` and
``mitigate-paired`` lines as the benchmark, plus a ``mitigate-pooled`` line with the counts; ``--markdown`` prints
the README's table instead (mean ± sample standard deviation, points).

    python -m bench.pool_mitigate bench/results/mitigate-paper-lr-2026-12-04.jsonl \\
        bench/results/mitigate-quadrants-2026-12-06.jsonl --markdown
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np

from bench.bench_mitigate import METRICS, _emit, emit_summaries

COLUMNS = (*METRICS, "flip_rate")
NAMES = {
    "standard": "Standard FT",
    "upsampled": "Upsampled FT",
    "vl-erm": "VL-ERM",
    "vl-gdro": "VL-GDRO",
    "ravl": "RaVL, the paper's loss",
    "ravl+balanced": "RaVL + balanced sampler",
    "ravl+masked": "RaVL + masked image term",
    "ravl+counterfactual": "RaVL + counterfactual image term (mitigate's default)",
    "vl-erm+shuffle+counterfactual": "Ablation: VL-ERM, shuffled, + counterfactual term (no region terms)",
}


def pool(
    paths: list[str], only: list[str] | None = None
) -> tuple[list[str], dict[tuple, dict[str, dict]], dict[str, int]]:
    """(methods in first-seen order, setting -> method -> line for complete valid settings, setting counts).

    ``only``: pool these arms alone (in that order), so settings that ran them but not some other arm still pair.
    """
    lines = [json.loads(x) for p in paths for x in open(p, encoding="utf-8") if x.strip()]
    methods: list[str] = []
    by: dict[tuple, dict[str, dict]] = defaultdict(dict)
    validity: dict[tuple, bool] = {}  # a setting audited by several invocations (more arms later) counts once
    for line in lines:
        key = (line.get("family"), line.get("feature", "red square"), line.get("spurious_class"))
        key += (line.get("cramers_v"), line.get("seed"))
        if line["bench"] == "mitigate-setting":
            validity[key] = bool(line["valid"])
        if line["bench"] == "mitigate" and line["valid"] and (only is None or line["method"] in only):
            methods += [] if line["method"] in methods else [line["method"]]
            by[key][line["method"]] = line
    if only is not None:
        missing = [m for m in only if m not in methods]
        if missing:
            raise SystemExit(f"--methods: no valid run of {', '.join(missing)} in these files")
        methods = list(only)
    complete = {k: v for k, v in by.items() if all(m in v for m in methods)}
    counts = {"settings": len(validity), "valid": sum(validity.values()), "pairs": len(complete)}
    return methods, complete, counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="raw JSON-lines files of bench_mitigate")
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    parser.add_argument("--methods", help="comma-separated arms to pool (default: every arm in the files)")
    args = parser.parse_args(argv)
    methods, settings, counts = pool(args.files, args.methods.split(",") if args.methods else None)
    rows = {m: [settings[k][m] for k in sorted(settings, key=str)] for m in methods}
    if args.markdown:
        print(f"{counts['pairs']} paired settings ({counts['valid']} valid of {counts['settings']})\n")
        print("| method | Image Overall | Image Worst-Group | Region Overall | Region Worst-Group | flip rate |")
        print("|---|---|---|---|---|---|")
        for m in methods:
            cells = [np.array([100 * r[c] for r in rows[m] if r[c] is not None]) for c in COLUMNS]
            print(f"| {NAMES.get(m, m)} | " + " | ".join(f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" for v in cells) + " |")
        return
    _emit({"bench": "mitigate-pooled", "files": args.files, **counts})
    emit_summaries(rows, [m for m in methods if m.partition("+")[0] == "ravl"])


if __name__ == "__main__":
    main()
