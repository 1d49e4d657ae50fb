#!/usr/bin/env python
"""The README's comparison table from the folders scripts/compare_baselines.sh leaves: each row's validate summary
(95% bootstrap intervals), the checkpoint the selection split chose, its steps and its selection GED.

    python scripts/results_table.py --runs ~/ambiseg-runs/compare --rows ambiseg no-text no-ambiguity cimd-style prob-unet
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ambiseg_diffusers.metrics import format_table


def chosen_steps(best: Path) -> str:
    """Steps of the chosen pipeline: `snapshots/step-N` -> N; a run's final pipeline -> its training summary."""
    if best.name.startswith("step-"):
        return str(int(best.name.split("-")[1]))
    summary = best / "training_summary.json"
    return str(json.loads(summary.read_text())["steps"]) if summary.is_file() else "committed"


def table(runs: Path, rows: list[str], budget_min: float | None = None) -> str:
    summaries, details = {}, []
    for name in rows:
        record = json.loads((runs / name / "validate" / "summary.json").read_text())
        selection = json.loads((runs / name / "selection.json").read_text())
        summaries[record["label"]] = record["summary"]
        best = next(c for c in selection["candidates"] if c["path"] == selection["best"])
        details.append(f"| {record['label']} | {chosen_steps(Path(selection['best']))} | "
                       f"{len(selection['candidates'])} | {best['ged']:.3f} | {record['images']} |")
    budget = f", {budget_min:g} min of training per row" if budget_min else ""
    text = f"Validate, N = 16, 95% bootstrap intervals{budget}:\n\n" + format_table(summaries, with_interval=True)
    text += ("\n| row | steps of the chosen checkpoint | candidates | selection GED | validate images |\n"
             "|---|---|---|---|---|\n" + "\n".join(details) + "\n")
    return text


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="the RUNS folder of compare_baselines.sh")
    parser.add_argument("--rows", nargs="+", required=True, help="row folders, in table order")
    parser.add_argument("--budget_min", type=float, default=None, help="the training budget, for the caption")
    args = parser.parse_args(argv)
    text = table(Path(args.runs).expanduser(), args.rows, args.budget_min)
    print(text)
    return text


if __name__ == "__main__":
    main()
