#!/usr/bin/env python
"""Evaluations of several models on the same images and seeds, side by side with their paired differences from a
reference: the table every choice on the selection split is read from (DPO recipes, strategies, knob values).

    python scripts/compare_evaluations.py --reference runs/eval-reference \\
        --runs runs/dpo/eps-b5000/selection runs/dpo/x0-b1e6/selection --labels eps-5000 x0-1e6 [--output table.md]

Each folder is an `evaluate.py` output (`per_image.jsonl`); all must cover the same images. Differences are
per-image means with 95% bootstrap intervals (`metrics.paired_difference`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ambiseg_diffusers.metrics import paired_difference

COLUMNS = ("avg_dice", "ged", "ci", "sc")


def per_image(folder: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (folder / "per_image.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{folder}/per_image.jsonl holds no images; run scripts/evaluate.py there first.")
    return {row["index"]: row for row in rows}


def compare(reference: Path, runs: list[Path], labels: list[str]) -> tuple[str, dict]:
    """The markdown table and, per label, {metric: {"mean", "diff": paired_difference}}."""
    base = per_image(reference)
    results, lines = {}, []
    for label, run in zip(labels, runs):
        rows = per_image(run)
        if set(rows) != set(base):
            raise ValueError(f"{run} and {reference} cover different images ({len(rows)} vs {len(base)}); compare "
                             "evaluations of the same split and --max_images.")
        order = sorted(base)
        results[label] = {}
        for metric in COLUMNS:
            values = np.array([rows[i][metric] for i in order])
            results[label][metric] = {"mean": float(values.mean()),
                                      "diff": paired_difference(values, [base[i][metric] for i in order])}
        cells = [f"{results[label][m]['mean']:.3f} ({results[label][m]['diff']['mean']:+.3f} "
                 f"[{results[label][m]['diff']['low']:+.3f}, {results[label][m]['diff']['high']:+.3f}])" for m in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    means = {m: np.mean([base[i][m] for i in base]) for m in COLUMNS}
    header = (f"{len(base)} images; each cell: mean (paired difference from the reference [95% bootstrap interval])\n\n"
              "| | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS) + "\n"
              "| reference | " + " | ".join(f"{means[m]:.3f}" for m in COLUMNS) + " |\n")
    return header + "\n".join(lines) + "\n", results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="evaluate.py output folder of the reference")
    parser.add_argument("--runs", nargs="+", required=True, help="evaluate.py output folders to compare")
    parser.add_argument("--labels", nargs="+", default=None, help="row labels (default: the folder names)")
    parser.add_argument("--output", default=None, help="also write the table (.md) and the numbers (.json beside it)")
    args = parser.parse_args(argv)
    runs = [Path(r).expanduser() for r in args.runs]
    # an evaluation folder inside a run folder (run/selection-scale1.0) is labelled by the run
    labels = args.labels or [r.parent.name if r.name.startswith(("selection", "validate")) else r.name for r in runs]
    if len(labels) != len(runs):
        parser.error(f"--labels has {len(labels)} entries for {len(runs)} --runs")
    text, results = compare(Path(args.reference).expanduser(), runs, labels)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
        Path(args.output).with_suffix(".json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
