#!/usr/bin/env python
"""The training curve: GED on the selection split against training steps, from the `selection.json` records that
scripts/select_checkpoint.py writes (one point per snapshot, with its 95% bootstrap interval when recorded).

    python examples/research_projects/plot_training_curve.py --runs R/ambiseg R/strong-b32 R/strong-b128 --selection R/strong/selection.json \\
        --output docs/images/training_curve.png
    python examples/research_projects/plot_training_curve.py --runs R/stage2 R/stage3 --offsets 3000 3706 ...   # continued runs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def points(selection: dict, run: Path) -> list[tuple[int, float]]:
    """(steps, GED) of the run's candidates in a selection record: snapshots by their step, the final pipeline by
    its training summary."""
    out = []
    for candidate in selection["candidates"]:
        path = Path(candidate["path"])
        if path.parent == run / "snapshots":
            out.append((int(path.name.split("-")[1]), candidate["ged"]))
        elif path == run and (run / "training_summary.json").is_file():
            out.append((json.loads((run / "training_summary.json").read_text())["steps"], candidate["ged"]))
    return sorted(set(out))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="training run folders (one line each)")
    parser.add_argument("--selection", nargs="*", default=[],
                        help="selection.json files to read (default: each run's own)")
    parser.add_argument("--labels", nargs="*", default=None, help="one legend label per run (default: folder names)")
    parser.add_argument("--offsets", nargs="*", type=int, default=None,
                        help="steps each run started from (continued runs on one axis; default 0 each)")
    parser.add_argument("--reference", type=float, default=None, help="a horizontal reference GED (e.g. committed)")
    parser.add_argument("--reference_label", default="reference")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    offsets = args.offsets or [0] * len(args.runs)
    if len(offsets) != len(args.runs):
        parser.error(f"--offsets has {len(offsets)} entries for {len(args.runs)} --runs")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(Path(s).read_text()) for s in args.selection]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, run in enumerate(Path(r).expanduser() for r in args.runs):
        sources = records + ([json.loads((run / "selection.json").read_text())] if (run / "selection.json").is_file() else [])
        curve = sorted({p for record in sources for p in points(record, run)})
        if not curve:
            raise ValueError(f"no selection record names a pipeline of {run}")
        label = args.labels[i] if args.labels else run.name
        ax.plot([offsets[i] + s for s, _ in curve], [g for _, g in curve], marker="o", label=label)
    if args.reference is not None:
        ax.axhline(args.reference, color="grey", linestyle="--", label=args.reference_label)
    split = (records[0] if records else {}).get("split", "selection")
    ax.set_xlabel("training steps")
    ax.set_ylabel(f"GED on the {split} split (lower is better)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
