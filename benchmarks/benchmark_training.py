#!/usr/bin/env python
"""Training throughput of the `cpu` config, side by side in one run: eager fp32, bf16 autocast, bf16 + torch.compile.

    python benchmarks/benchmark_training.py [--steps 15]

Each mode runs the real training script in its own process (so peak memory is its own) on lidc64 train, batch 32,
and reports steady-state seconds per step (after 3 warm-up steps) and peak resident memory.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "training" / "train_ambiseg.py"
MODES = {"eager fp32": ["--mixed_precision", "no"], "bf16 autocast": ["--mixed_precision", "bf16"],
         "bf16 + torch.compile": ["--mixed_precision", "bf16", "--torch_compile"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = parser.parse_args()
    results = {}
    for mode in args.modes:
        with tempfile.TemporaryDirectory() as out:
            command = [sys.executable, str(SCRIPT), "--output_dir", out, "--max_train_steps", "100000",
                       "--stop_after_steps", str(args.steps), "--validation_steps", "0", "--report_to", "none",
                       "--checkpointing_steps", "100000", *MODES[mode]]
            log = subprocess.run(command, capture_output=True, text=True).stderr
        match = re.search(r"THROUGHPUT steps=\d+ s_per_step=([\d.na]+) peak_memory_mib=(\d+)", log)
        if not match:
            print(f"{mode}: failed\n{log[-2000:]}")
            continue
        results[mode] = (float(match.group(1)), int(match.group(2)))
        print(f"{mode}: {results[mode][0]:.3f} s/step, peak {results[mode][1]} MiB", flush=True)
    base = results.get("eager fp32", (None,))[0]
    print("\n| mode | s/step (batch 32) | steps/s | vs eager | peak memory MiB |\n|---|---|---|---|---|")
    for mode, (seconds, peak) in results.items():
        print(f"| {mode} | {seconds:.3f} | {1 / seconds:.2f} | {base / seconds if base else float('nan'):.2f}x | {peak} |")


if __name__ == "__main__":
    main()
