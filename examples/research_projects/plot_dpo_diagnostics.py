#!/usr/bin/env python
"""What each DPO objective trains on: the implicit accuracy on held-out pairs against the timestep (one line per run),
and the median |0.5 * beta * delta| there (how saturated the loss is), from the `implicit_accuracy.json` that
training/train_dpo.py writes with `--diagnostic_preferences`.

    python examples/research_projects/plot_dpo_diagnostics.py --runs runs/dpo/eps runs/dpo/x0 runs/dpo/min-snr --labels eps x0 min-SNR \\
        --output docs/images/dpo_implicit_accuracy.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="train_dpo.py output folders")
    parser.add_argument("--labels", nargs="*", default=None, help="legend labels (default: folder names)")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    labels = args.labels or [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"--labels has {len(labels)} entries for {len(args.runs)} --runs")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for run, label in zip(args.runs, labels):
        path = Path(run).expanduser() / "implicit_accuracy.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: train with --diagnostic_preferences to write it.")
        record = json.loads(path.read_text())
        steps = [max(t, 1) for t in record["timesteps"]]  # t = 0 drawn at 1 on the log axis
        left.plot(steps, record["implicit_accuracy"], marker="o", label=label)
        right.plot(steps, record["median_scaled_delta"], marker="o", label=label)
    left.axhline(0.5, color="0.5", linestyle="--", linewidth=1)
    left.set(xscale="log", xlabel="timestep t (0 drawn at 1)", ylabel="implicit accuracy",
             title=f"held-out pairs ({record['pairs']}): aligned vs reference")
    right.axhline(5, color="0.5", linestyle="--", linewidth=1, label="|0.5 β Δ| = 5 (saturated)")
    right.set(xscale="log", yscale="log", xlabel="timestep t (0 drawn at 1)", ylabel="median |0.5 β Δ|",
              title="how far into the sigmoid's tails")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
