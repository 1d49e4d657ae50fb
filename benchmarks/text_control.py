#!/usr/bin/env python
"""How far the text controls the masks: the stated size and one shape attribute against what the samples draw.

For one slice per nodule (the largest raters' consensus) of a LIDC split, the same image and the same noise (one
seed per nodule) are sampled under prompts that differ in one statement only:

- **size**: the nodule's diameter stated as each of `--sizes` (mm), in two prompt forms: `paper`, the model's own
  prompt style built from the first rater's nine ratings (style "paper" states the diameter and the volume of a
  sphere of that diameter, as the paper's prompts do; style "slice" the diameter alone), and `plain`, one sentence a
  user would type ("A 12 mm round nodule with a smooth margin."). Measured: the mean Feret diameter (mm, empty
  samples count 0) of the `--num_samples` masks; per nodule the rank correlation of stated and produced size and
  whether it rises monotonically; pooled over (nodule, size) the linear and rank correlation; the mean produced size
  per stated size.
- **shape**: at the first rater's own stated size, the nodule stated round and elongated (paper form: the sphericity
  rating 5 "Round" vs 1 "Linear", nothing else changed; plain form: "A 12 mm round nodule." vs "A 12 mm elongated
  nodule."). Measured: the samples' mean compactness 4 pi area / perimeter^2 (1 = a disk, lower = elongated or
  jagged); the share of nodules whose round prompt gives the more compact masks.

The targets of issue 41 (within-nodule rank correlation >= 0.9, pooled correlation >= 0.8, shape in the stated
direction for >= 80% of nodules) are printed beside the figures. Any checkpoint, any LIDC split; choices are made on
`selection`, `validate` reports:

    python benchmarks/text_control.py --model checkpoints/ambiseg-lidc64 --split selection --output_dir runs/text_control
    python benchmarks/text_control.py --model checkpoints/ambiseg-lidc64 --split validate --output_dir runs/tc_validate \\
        --figure docs/images/text_control.png

Writes `text_control.json` (every nodule's numbers), `text_control.md` (the summary) and `text_control.png` (stated
against produced size; one image under several prompts) to `--output_dir`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from tqdm.auto import tqdm

from ambiseg_diffusers import AmbiSegPipeline
from ambiseg_diffusers.evaluation import build_sampling_scheduler, largest_consensus_slices
from ambiseg_diffusers.lidc import feret_diameter, load_lidc64, pipeline_prompt_style, ratings_to_prompt
from ambiseg_diffusers.text_control import compactness, ratings_of

FORMS = ("paper", "plain")
TARGETS = {"within_nodule_spearman": 0.9, "pooled_pearson": 0.8, "shape_in_stated_direction": 0.8}


def size_prompt(form: str, style: str, ratings: dict, diameter_mm: float) -> str:
    """The prompt of `form` stating `diameter_mm` (see the module docstring)."""
    if form == "plain":
        return f"A {diameter_mm:g} mm round nodule with a smooth margin."
    if style == "paper":
        return ratings_to_prompt(ratings, "paper", diameter_mm=diameter_mm, volume_mm3=math.pi * diameter_mm**3 / 6)
    if style == "slice":
        return ratings_to_prompt(ratings, "slice", diameter_mm=diameter_mm)
    raise ValueError(f"the model's prompt style {style!r} states no size: the paper form needs 'paper' or 'slice' "
                     "(pass --forms plain).")


def shape_prompts(form: str, style: str, ratings: dict, diameter_mm: float) -> tuple[str, str]:
    """(round, elongated) prompts of `form` at `diameter_mm`, differing in the stated sphericity only."""
    if form == "plain":
        return f"A {diameter_mm:g} mm round nodule.", f"A {diameter_mm:g} mm elongated nodule."
    return tuple(size_prompt(form, style, {**ratings, "sphericity": score}, diameter_mm) for score in (5, 1))


def stated_size(style: str, row: dict, rater: int) -> float:
    """The size the rater's own prompt states, whole mm: the slice's extent (style "slice") or the nodule's."""
    column = "slice_diameter_mm" if style == "slice" else "diameter_mm"
    return float(round(row[column][rater]))


def measure(masks: np.ndarray, spacing: float) -> tuple[float, float, float]:
    """Mean Feret diameter (mm, empty = 0), mean compactness of the non-empty masks, share of empty masks."""
    diameters = [feret_diameter(m, spacing) for m in masks]
    shapes = [compactness(m) for m in masks if m.any()]
    return float(np.mean(diameters)), float(np.mean(shapes)) if shapes else float("nan"), float(np.mean(
        [not m.any() for m in masks]))


def sample_nodule(pipe, image: np.ndarray, prompts: list[str], num_samples: int, seed: int, **call_kwargs):
    """`num_samples` masks per prompt, every prompt from the same noise (one generator of `seed` per prompt):
    `(P, N, H, W)` bool and the pixel means `(P, H, W)`."""
    out = pipe(np.repeat(image[None], len(prompts), 0), [[p] for p in prompts], num_samples=num_samples,
               generator=[torch.Generator().manual_seed(seed) for _ in prompts], **call_kwargs)
    return out.masks, out.pixel_mean


def summarize(records: list[dict], sizes: list[float], forms: list[str]) -> dict:
    summary = {}
    for form in forms:
        produced = np.array([r[form]["produced_mm"] for r in records])  # (nodules, sizes)
        within = [stats.spearmanr(sizes, row).statistic for row in produced]
        stated = np.tile(sizes, len(records))
        rounded, elongated = (np.array([r[form][k] for r in records]) for k in ("round_compactness",
                                                                                 "elongated_compactness"))
        summary[form] = {
            "within_nodule_spearman": float(np.nanmean(within)),
            "monotone_nodules": float(np.mean([bool(np.all(np.diff(row) > 0)) for row in produced])),
            "pooled_pearson": float(stats.pearsonr(stated, produced.ravel()).statistic),
            "pooled_spearman": float(stats.spearmanr(stated, produced.ravel()).statistic),
            "mean_produced_mm": dict(zip(map(str, sizes), produced.mean(0).round(2).tolist())),
            "mean_abs_error_mm": float(np.abs(produced - np.asarray(sizes)).mean()),
            "empty_share": float(np.mean([r[form]["empty_share"] for r in records])),
            "shape_in_stated_direction": float(np.mean(rounded > elongated)),
            "round_compactness": float(np.nanmean(rounded)),
            "elongated_compactness": float(np.nanmean(elongated)),
        }
    return summary


def markdown(summary: dict, sizes: list[float], header: str) -> str:
    lines = [header, "", "| form | within-nodule rank corr. (≥ 0.9) | monotone nodules | pooled corr. (≥ 0.8) | pooled rank "
             "corr. | " + " | ".join(f"{s:g} mm" for s in sizes) + " | shape in stated direction (≥ 80%) | "
             "compactness round / elongated |", "|---" * (7 + len(sizes)) + "|"]
    for form, s in summary.items():
        lines.append(
            f"| {form} | {s['within_nodule_spearman']:.2f} | {s['monotone_nodules']:.0%} | {s['pooled_pearson']:.2f} | "
            f"{s['pooled_spearman']:.2f} | " + " | ".join(f"{v:.1f}" for v in s["mean_produced_mm"].values())
            + f" | {s['shape_in_stated_direction']:.0%} | {s['round_compactness']:.3f} / "
            f"{s['elongated_compactness']:.3f} |")
    return "\n".join(lines) + "\n"


def figure(records: list[dict], sizes: list[float], forms: list[str], example: dict, path: Path, title: str) -> None:
    """Top: stated against produced size per form (grey: each nodule; red: the mean). Bottom: one image and the pixel
    means of its samples under several prompts of the first form."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strip = ["image"] + example["labels"]
    width = len(strip)
    top = [forms[min(k * len(forms) // width, len(forms) - 1)] for k in range(width)]
    fig, axes = plt.subplot_mosaic([top, strip], figsize=(2.0 * width, 7.0), height_ratios=[2.2, 1])
    for form in forms:
        ax = axes[form]
        for r in records:
            ax.plot(sizes, r[form]["produced_mm"], color="0.75", lw=0.8)
        ax.plot(sizes, np.mean([r[form]["produced_mm"] for r in records], 0), color="C3", lw=2.5, marker="o",
                label="mean over nodules")
        ax.plot([0, max(sizes)], [0, max(sizes)], "k--", lw=0.8, label="produced = stated")
        ax.set(xlabel="stated diameter (mm)", ylabel="produced Feret diameter (mm)", title=f"{form} prompt")
        ax.legend(fontsize=7, loc="upper left")
    axes["image"].imshow(example["image"], cmap="gray")
    axes["image"].set_title("image", fontsize=8)
    for label, mean in zip(example["labels"], example["pixel_mean"]):
        axes[label].imshow(example["image"], cmap="gray")
        axes[label].imshow(np.ma.masked_less(mean, 0.02), cmap="autumn", alpha=0.6, vmin=0, vmax=1)
        axes[label].set_title(f"{forms[0]}: {label}", fontsize=8)
    for name in strip:
        axes[name].axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pipeline folder or Hub id")
    parser.add_argument("--split", default="selection", help="LIDC split (choices on selection, reports on validate)")
    parser.add_argument("--data_dir", default=None, help="the lidc64 folder (default: $AMBISEG_DATA_DIR)")
    parser.add_argument("--sizes", type=float, nargs="+", default=[3, 6, 10, 15, 25], help="stated diameters (mm)")
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS, help="prompt forms")
    parser.add_argument("--num_samples", type=int, default=16, help="samples per prompt")
    parser.add_argument("--sampler", default=None,
                        help="name:steps (e.g. dpm:6) instead of the pipeline's own scheduler and default steps")
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="classifier-free guidance on the text")
    parser.add_argument("--max_nodules", type=int, default=None, help="only the first N nodules")
    parser.add_argument("--seed", type=int, default=0, help="nodule k samples from seed + k under every prompt")
    parser.add_argument("--output_dir", required=True, help="where the JSON, summary and figure go")
    parser.add_argument("--figure", default=None, help="also write the figure here (e.g. docs/images/...)")
    args = parser.parse_args(argv)
    if len(args.sizes) < 2 or min(args.sizes) <= 0:
        parser.error("--sizes: give at least two diameters > 0 (mm)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    pipe = AmbiSegPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    call_kwargs = {"guidance_scale": args.guidance_scale}
    if args.sampler:
        name, steps = args.sampler.split(":")
        pipe.scheduler = build_sampling_scheduler(pipe.scheduler, name)
        call_kwargs["num_inference_steps"] = int(steps)
    style = pipeline_prompt_style(pipe)
    dataset = load_lidc64(args.split, args.data_dir, prompt_style=style if style != "free" else "paper")
    positions = largest_consensus_slices(dataset)[: args.max_nodules]
    records, example = [], None
    for k, position in enumerate(tqdm(positions, desc="nodules", unit="nodule")):
        row = dataset[position]
        rater = int(np.flatnonzero(row["annotator_valid"])[0])
        ratings, spacing = ratings_of(row["ratings"][rater]), float(row["pixel_spacing_mm"])
        own_size = stated_size(style, row, rater)
        record = {"nodule_id": row["nodule_id"], "slice": int(row["slice"]), "pixel_spacing_mm": spacing,
                  "own_stated_mm": own_size, "rater_slice_mm": float(row["slice_diameter_mm"][rater])}
        for form in args.forms:
            prompts = [size_prompt(form, style, ratings, s) for s in args.sizes]
            prompts += list(shape_prompts(form, style, ratings, own_size))
            masks, pixel_mean = sample_nodule(pipe, np.asarray(row["image"], np.float32), prompts, args.num_samples,
                                              args.seed + k, **call_kwargs)
            measured = [measure(m, spacing) for m in masks]
            record[form] = {
                "produced_mm": [m[0] for m in measured[: len(args.sizes)]],
                "empty_share": float(np.mean([m[2] for m in measured[: len(args.sizes)]])),
                "round_compactness": measured[-2][1], "elongated_compactness": measured[-1][1],
                "prompts": prompts,
            }
            if example is None or (form == args.forms[0] and abs(own_size - 10) < abs(example["own_size"] - 10)):
                picks = [0, len(args.sizes) // 2, len(args.sizes) - 1]
                example = {"own_size": own_size, "image": np.asarray(row["image"]),
                           "labels": [f"{args.sizes[i]:g} mm" for i in picks] + ["round", "elongated"],
                           "pixel_mean": [pixel_mean[i] for i in picks] + [pixel_mean[-2], pixel_mean[-1]]}
        records.append(record)

    summary = summarize(records, args.sizes, args.forms)
    sampler = args.sampler or f"the pipeline's default ({type(pipe.scheduler).__name__})"
    header = (f"{args.model}, {args.split}: {len(records)} nodules (largest-consensus slice each), N = "
              f"{args.num_samples}, sampler {sampler}, guidance {args.guidance_scale:g}, prompt style {style!r}")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "text_control.json").write_text(json.dumps(
        {"arguments": vars(args), "summary": summary, "targets": TARGETS, "nodules": records}, indent=1))
    table = markdown(summary, args.sizes, header)
    (output_dir / "text_control.md").write_text(table)
    for path in [output_dir / "text_control.png"] + ([Path(args.figure)] if args.figure else []):
        figure(records, args.sizes, args.forms, example, path, header)
    print(table)
    return summary


if __name__ == "__main__":
    main()
