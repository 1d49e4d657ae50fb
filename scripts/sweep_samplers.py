#!/usr/bin/env python
"""Quality against sampler and steps on the same images and seeds, each against a quality reference (DDIM-100).

    python scripts/sweep_samplers.py --model checkpoints/ambiseg-lidc64 --split selection --bf16 \\
        --output_dir runs/sweep --configs ddim:1 ddim:2 ddim:3 ddim:4 ddim:5 dpm:2 unipc:2 ddim:100

Choices (the pipeline's default steps) are made on the `selection` split (training patients), never on validate.
Writes `sweep.md` (paper-layout table with 95% bootstrap intervals, seconds per image, and the paired difference in
GED to the reference with its own interval), `sweep.json` and `quality_vs_steps.png` (intervals shown, GED axis from
0, the "no worse than the reference + 0.005" line). Lower GED is better, so a configuration counts as equal quality
when its GED exceeds the reference's by at most 0.005 (being better by more is no defect). A configuration a scheduler cannot run is reported, not fatal.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ambiseg_diffusers import AmbiSegPipeline
from ambiseg_diffusers.evaluation import SAMPLING_SCHEDULERS, build_sampling_scheduler, evaluate_pipeline
from ambiseg_diffusers.lidc import load_split, pipeline_prompt_style
from ambiseg_diffusers.metrics import format_table, paired_difference, summarize

TOLERANCE = 0.005  # "equal quality": GED at most this above the reference (lower GED is better)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pipeline folder or Hub id")
    parser.add_argument("--dataset", default="lidc64", help="'lidc64' or a folder saved with save_to_disk")
    parser.add_argument("--data_dir", default=None, help="the lidc64 folder or the folder above it")
    parser.add_argument("--split", default="selection", help="where choices are made: selection (training patients)")
    parser.add_argument("--max_images", type=int, default=None, help="only the first N images")
    parser.add_argument("--num_samples", type=int, default=16, help="samples per image")
    parser.add_argument("--prompts", default="annotator", choices=["annotator", "nodule", "none"], help="prompt protocol")
    parser.add_argument("--configs", nargs="+", default=["ddim:1", "ddim:2", "ddim:3", "ddim:4", "ddim:5", "dpm:2",
                                                         "unipc:2", "ddim:100"], help="sampler:steps to compare")
    parser.add_argument("--reference", default="ddim:100", help="the quality reference among --configs")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--images_per_call", type=int, default=4, help="images per pipeline call (memory only)")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for config in args.configs:
        name, _, steps = config.partition(":")
        if name not in SAMPLING_SCHEDULERS or not steps.isdigit():
            parser.error(f"--configs entries are sampler:steps with a sampler in {sorted(SAMPLING_SCHEDULERS)}, got {config!r}")

    base = AmbiSegPipeline.from_pretrained(args.model).to(device)
    base.set_progress_bar_config(disable=True)
    dataset = load_split(args.dataset, args.split, args.data_dir, pipeline_prompt_style(base))
    count = len(dataset) if args.max_images is None else min(args.max_images, len(dataset))
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    per_config, rows, seconds, failed = {}, {}, {}, {}
    for config in args.configs:
        name, steps = config.split(":")
        base.scheduler = build_sampling_scheduler(base.scheduler, name)
        started = time.perf_counter()
        try:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16):
                per_image, _ = evaluate_pipeline(base, dataset, args.num_samples, int(steps), prompts=args.prompts,
                                                 max_images=count, images_per_call=args.images_per_call)
        except Exception as error:  # e.g. a multistep solver that needs more steps
            failed[config] = f"{type(error).__name__}: {error}"
            print(f"{config}: does not run ({failed[config][:120]})", flush=True)
            continue
        seconds[config] = (time.perf_counter() - started) / count
        per_config[config], rows[config] = per_image, summarize(per_image)
        print(f"{config}: GED {rows[config]['ged']['mean']:.4f}  CI {rows[config]['ci']['mean']:.4f}  "
              f"{seconds[config]:.2f} s/image", flush=True)

    reference = per_config.get(args.reference)
    differences = {c: paired_difference(v["ged"], reference["ged"]) for c, v in per_config.items()} if reference else {}
    lines = format_table(rows, with_interval=True).splitlines()
    lines[0] += " s/image | GED − reference [95%] |"
    lines[1] += "---|---|"
    lines[2:] = [line + f" {seconds[c]:.2f} | " + (f"{differences[c]['mean']:+.4f} [{differences[c]['low']:+.4f}, "
                                                   f"{differences[c]['high']:+.4f}] |" if c in differences else "n/a |")
                 for line, c in zip(lines[2:], rows)]
    equal = sorted((int(c.split(":")[1]), c) for c, d in differences.items() if d["mean"] <= TOLERANCE)
    text = (f"{args.split}, {count} images, N = {args.num_samples}, {args.prompts} prompts{', bf16' if args.bf16 else ''};"
            f" reference {args.reference}\n\n" + "\n".join(lines) + "\n")
    if equal:
        text += f"\nFewest steps with GED − reference <= {TOLERANCE} (equal or better quality): {equal[0][1]}\n"
    for config, error in failed.items():
        text += f"\n{config} does not run: {error}\n"
    (output_dir / "sweep.md").write_text(text)
    (output_dir / "sweep.json").write_text(json.dumps({"rows": rows, "seconds_per_image": seconds,
                                                       "ged_minus_reference": differences, "failed": failed,
                                                       "images": count, "split": args.split}, indent=2))
    plot(rows, differences, args.reference, output_dir / "quality_vs_steps.png")
    print(text)
    return rows


def plot(rows: dict, differences: dict, reference: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    top = 0.0
    for sampler in sorted({c.split(":")[0] for c in rows}):
        configs = sorted((c for c in rows if c.startswith(sampler + ":")), key=lambda c: int(c.split(":")[1]))
        steps = [int(c.split(":")[1]) for c in configs]
        ged = [rows[c]["ged"] for c in configs]
        axes[0].errorbar(steps, [g["mean"] for g in ged], yerr=[[g["mean"] - g["low"] for g in ged],
                                                                [g["high"] - g["mean"] for g in ged]],
                         marker="o", capsize=3, label=sampler)
        top = max(top, *[g["high"] for g in ged])
        if differences:
            diff = [differences[c] for c in configs]
            axes[1].errorbar(steps, [d["mean"] for d in diff], yerr=[[d["mean"] - d["low"] for d in diff],
                                                                    [d["high"] - d["mean"] for d in diff]],
                             marker="o", capsize=3, label=sampler)
    axes[0].set_ylim(0, top * 1.15)
    axes[0].set_title("GED with 95% bootstrap interval (lower is better)")
    axes[1].axhline(TOLERANCE, color="0.5", linestyle="--", label=f"reference + {TOLERANCE}")
    axes[1].axhline(0, color="0.4", linewidth=0.8)
    axes[1].set_title(f"GED − {reference} (same images and seeds)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("denoising steps")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
