#!/usr/bin/env python
"""Quality against sampler and steps (the paper's DDPM-1000 / DDIM-100 against few-step solvers) on the same images.

    python scripts/sweep_samplers.py --model checkpoints/ambiseg-lidc64 --split mini --output_dir runs/sweep \\
        --configs ddpm:1000 ddim:100 ddim:50 ddim:20 ddim:10 dpm:20 dpm:10 unipc:20 unipc:10

Writes `sweep.md` (paper-layout table, seconds per image) and `quality_vs_steps.png`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ambiseg_diffusers import AmbiSegPipeline
from ambiseg_diffusers.metrics import format_table, summarize
from ambiseg_diffusers.evaluation import build_sampling_scheduler, evaluate_pipeline
from ambiseg_diffusers.lidc import load_split


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", default="lidc64")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--split", default="mini")
    parser.add_argument("--max_images", type=int, default=None)
    parser.add_argument("--num_samples", type=int, default=16)
    parser.add_argument("--prompts", default="annotator")
    parser.add_argument("--configs", nargs="+", default=["ddim:100", "ddim:50", "ddim:20", "ddim:10", "dpm:20", "dpm:10",
                                                         "unipc:20", "unipc:10"])
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)

    base = AmbiSegPipeline.from_pretrained(args.model)
    base.set_progress_bar_config(disable=True)
    dataset = load_split(args.dataset, args.split, args.data_dir)
    count = len(dataset) if args.max_images is None else min(args.max_images, len(dataset))
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows, seconds = {}, {}
    for config in args.configs:
        name, steps = config.split(":")
        base.scheduler = build_sampling_scheduler(base.scheduler, name)
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            per_image, _ = evaluate_pipeline(base, dataset, args.num_samples, int(steps), prompts=args.prompts,
                                             max_images=count, images_per_call=4)
        seconds[config] = (time.perf_counter() - started) / count
        rows[config] = summarize(per_image)
        print(f"{config}: GED {rows[config]['ged']['mean']:.4f}  CI {rows[config]['ci']['mean']:.4f}  {seconds[config]:.2f} s/image", flush=True)

    table = format_table(rows)
    lines = table.splitlines()
    lines[0] += " s/image |"
    lines[1] += "---|"
    lines[2:] = [line + f" {seconds[c]:.2f} |" for line, c in zip(lines[2:], rows)]
    text = f"{args.split}, {count} images, N = {args.num_samples}, {args.prompts} prompts{', bf16' if args.bf16 else ''}\n\n" + "\n".join(lines) + "\n"
    (output_dir / "sweep.md").write_text(text)
    (output_dir / "sweep.json").write_text(json.dumps({"rows": rows, "seconds_per_image": seconds}, indent=2))
    plot(rows, output_dir / "quality_vs_steps.png")
    print(text)
    return rows


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for sampler in sorted({c.split(":")[0] for c in rows}):
        configs = sorted((c for c in rows if c.startswith(sampler + ":")), key=lambda c: int(c.split(":")[1]))
        steps = [int(c.split(":")[1]) for c in configs]
        for ax, key in zip(axes, ("ged", "ci")):
            ax.plot(steps, [rows[c][key]["mean"] for c in configs], marker="o", label=sampler)
    for ax, title in zip(axes, ("GED (lower is better)", "CI (higher is better)")):
        ax.set_xscale("log")
        ax.set_xlabel("denoising steps")
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
