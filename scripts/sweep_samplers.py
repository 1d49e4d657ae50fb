#!/usr/bin/env python
"""Quality against sampler and steps on the same images and seeds, each against a quality reference (DDIM-100),
on three views of the split: all its slices; its largest-consensus slice per nodule (the slice a radiologist reads
first, `largest_consensus_slices`); and every slice whose raters' consensus area is above the split's median (a
large-nodule view: few steps lose where the nodule is large, which a view of mostly small edge slices hides). The
default is chosen on all three.

    python scripts/sweep_samplers.py --model checkpoints/ambiseg-lidc64 --split selection --bf16 \\
        --output_dir runs/sweep --configs ddim:100 ddim:10 dpm:8 dpm_sde:10 unipc:8 deis:8 ddim:20:eta=1

A configuration is `sampler:steps`, optionally `:noclip` for the solver without x0 clipping (by default every x0 the
solver derives is clipped to [-1, 1]: `build_sampling_scheduler`; `noclip` applies to epsilon and v models only: the
pipeline clamps an x0-model's prediction itself, so it would change nothing there and is refused) and `:eta=X` for
DDIM's eta. `dpm` is DPM-Solver++ 2M, `dpm_sde` DPM-Solver++ SDE. A configuration ending in `@folder` samples with
another pipeline, e.g. a distilled sampler against its teacher's DDIM-100 (training/train_consistency.py; the `lcm`
sampler keeps the folder's distilled schedule):

    python scripts/sweep_samplers.py --model checkpoints/ambiseg-lidc64 --output_dir runs/sweep \
        --configs ddim:2 ddim:100 lcm:1@runs/lcm lcm:2@runs/lcm --bf16

Choices (the pipeline's default sampler and steps) are made on the `selection` split (training patients), never on
validate. Writes `sweep.md` (per view: the paper-layout table with 95% bootstrap intervals, seconds per image, and the
paired difference in GED to the reference with its own interval), `sweep.json` and `quality_vs_steps.png` (every
view; intervals shown, GED axis from 0, the "no worse than the reference + 0.005" line). Lower GED is better. The
default is the cheapest configuration (fewest UNet calls; between equals, the nearer to the reference) that meets
`meets_default_rule`: mean GED at most 0.005 above the reference on all three views, and the upper end of the
all-slices paired 95% interval below 0.01 (being better by more is no defect). A configuration a scheduler cannot run is reported, not
fatal.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ambiseg_diffusers import AmbiSegPipeline
from ambiseg_diffusers.evaluation import (
    SAMPLING_SCHEDULERS, build_sampling_scheduler, consensus_areas, evaluate_pipeline, largest_consensus_slices,
    warn_if_emulated_bf16,
)
from ambiseg_diffusers.data import (
    DatasetContractError, add_data_arguments, check_choosing_split, load_from_args, model_image_processor, rater_masks,
    selection_split,
)
from ambiseg_diffusers.lidc import pipeline_prompt_style
from ambiseg_diffusers.metrics import format_table, paired_difference, summarize
from ambiseg_diffusers.run_records import check_resumable, data_arguments, pipeline_fingerprint

TOLERANCE = 0.005  # "equal quality": GED at most this above the reference (lower GED is better) ...
INTERVAL_LIMIT = 0.01  # ... and the upper end of the paired difference's 95% interval below this


def meets_target(difference: dict | None) -> bool:
    """Equal quality: a paired GED difference to the reference (mean, low, high) within the tolerances."""
    return difference is not None and difference["mean"] <= TOLERANCE and difference["high"] < INTERVAL_LIMIT


def meets_default_rule(all_slices: dict | None, *other_views: dict | None) -> bool:
    """The rule a default sampler is chosen by (issues 34 and 40): mean GED at most TOLERANCE above the reference on
    every view, and the upper end of the all-slices interval below INTERVAL_LIMIT (the other views are smaller:
    their intervals are reported, not required)."""
    return meets_target(all_slices) and all(v is not None and v["mean"] <= TOLERANCE for v in other_views)


# The views: every slice; one slice per nodule (where its raters' consensus is largest); and the large-nodule view
# the default is chosen on, every slice whose consensus area is above the split's median (many more slices than
# nodules, so its interval can decide something).
VIEWS = ("all slices", "largest-consensus slice per nodule", "slices with consensus area above the median")
# Every view: the above-median view alone let DDIM-2 pass within 0.005 while the largest-consensus view, where a
# radiologist reads first, showed it +0.06 off (issue 40).
RULE_VIEWS = VIEWS


class Config(NamedTuple):
    sampler: str
    steps: int
    clip: bool
    model: str | None  # None: --model
    eta: float | None  # DDIM's eta where given


def parse_config(config: str) -> Config:
    """`sampler:steps[:noclip][:eta=X][@model]` -> Config."""
    sampling, at, model = config.partition("@")
    parts = sampling.split(":")
    options = parts[2:]
    eta = [o for o in options if o.startswith("eta=")]
    valid = (len(parts) >= 2 and parts[0] in SAMPLING_SCHEDULERS and parts[1].isdigit() and int(parts[1]) >= 1
             and all(o == "noclip" or o.startswith("eta=") for o in options) and len(options) == len(set(options))
             and len(eta) <= 1 and not (at and not model))
    try:
        eta_value = float(eta[0][4:]) if eta else None
    except ValueError:
        valid = False
    if not valid or (eta and not (eta_value >= 0 and parts[0] == "ddim")):
        raise ValueError(f"`--configs` entries are sampler:steps[:noclip][:eta=X][@model] with a sampler in "
                         f"{sorted(SAMPLING_SCHEDULERS)}, steps >= 1, eta >= 0 for ddim only, and a pipeline folder "
                         f"or Hub id after '@', got {config!r}")
    return Config(parts[0], int(parts[1]), "noclip" not in options, model or None, eta_value)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pipeline folder or Hub id")
    add_data_arguments(parser)
    parser.add_argument("--split", default=None, help="where choices are made (default: lidc64 selection, training "
                        "patients held out of training; other data the split training validated on); never one that "
                        "reports")
    parser.add_argument("--max_images", type=int, default=None, help="only the first N images")
    parser.add_argument("--num_samples", type=int, default=16, help="samples per image")
    parser.add_argument("--prompts", default="annotator", choices=["annotator", "nodule", "none"], help="prompt protocol")
    parser.add_argument("--configs", nargs="+", default=["ddim:1", "ddim:2", "ddim:3", "ddim:4", "ddim:5", "dpm:2",
                                                         "unipc:2", "deis:2", "ddim:100"],
                        help="sampler:steps[:noclip][@folder] to compare (@folder: another pipeline)")
    parser.add_argument("--reference", default="ddim:100", help="the quality reference among --configs")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--images_per_call", type=int, default=4, help="images per pipeline call (memory only)")
    parser.add_argument("--paper_protocol_images", type=int, default=2,
                        help="images timed with the paper's protocol (16 one-sample DDIM-100 float32 calls each), the "
                             "speed reference of the '× paper' column; 0 = skip")
    parser.add_argument("--picture_images", type=int, default=3,
                        help="largest-consensus slices drawn for every configuration in samples.png; 0 = none")
    parser.add_argument("--output_dir", required=True,
                        help="resumable: each configuration's results are kept (configs/*.npz) and reused by a rerun "
                             "with the same arguments, so a run can add configurations to an earlier one")
    parser.add_argument("--overwrite", action="store_true", help="delete the folder's earlier results first")
    args = parser.parse_args(argv)
    args.split = args.split or selection_split(args.dataset_name, args.train_data_dir)
    try:
        check_choosing_split(args.dataset_name, args.train_data_dir, args.split)
    except DatasetContractError as error:
        parser.error(f"--split: {error}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    warn_if_emulated_bf16(args.bf16)
    for config in args.configs:
        try:
            parse_config(config)
        except ValueError as error:
            parser.error(str(error))
    args.configs = list(dict.fromkeys(args.configs))  # a configuration named twice is measured once
    if args.reference not in args.configs:
        parser.error(f"--reference {args.reference!r} must be one of --configs {args.configs}")

    base = AmbiSegPipeline.from_pretrained(args.model).to(device)
    pipelines = {None: base}  # --model, and each other pipeline a configuration names after '@'
    for model in dict.fromkeys(parse_config(c).model for c in args.configs):
        if model is not None:
            pipelines[model] = AmbiSegPipeline.from_pretrained(model).to(device)
    for pipe in pipelines.values():
        pipe.set_progress_bar_config(disable=True)
    for config in args.configs:
        name, _, clip, model, _ = parse_config(config)
        if pipeline_prompt_style(pipelines[model]) != pipeline_prompt_style(base):  # one dataset, one prompt style
            parser.error(f"`{config}`: its pipeline reads {pipeline_prompt_style(pipelines[model])!r} prompts, "
                         f"--model {args.model!r} reads {pipeline_prompt_style(base)!r}; sweep them separately")
        if not clip and pipelines[model].scheduler.config.prediction_type == "sample":
            parser.error(f"`{config}`: `:noclip` changes nothing for an x0-predicting model (the pipeline clamps its "
                         "predicted mask to [-1, 1] before every step); it applies to epsilon and v models")
    dataset = load_from_args(args, args.split, pipeline_prompt_style(base), image_processor=model_image_processor(base))
    count = len(dataset) if args.max_images is None else min(args.max_images, len(dataset))
    output_dir = Path(args.output_dir)
    cache = output_dir / "configs"
    # what decides a configuration's numbers (not which configurations, nor memory or timing-only options)
    deciding = {k: v for k, v in vars(args).items()
                if k not in ("configs", "reference", "output_dir", "overwrite", "images_per_call", "paper_protocol_images")}
    deciding["model_sha256"] = pipeline_fingerprint(base)  # a folder whose weights were replaced is another model
    deciding.update(data_arguments(args, dataset, args.split))  # the data resolved and by content, not by name
    deciding["device"], deciding["torch"] = device, torch.__version__  # GPU and CPU numbers are not mixed in one table
    check_resumable(output_dir, deciding, sorted(cache.glob("*.npz")), overwrite=args.overwrite)
    cache.mkdir(parents=True, exist_ok=True)
    shown = dataset.select(range(count))
    areas = consensus_areas(shown)
    views = {VIEWS[0]: list(range(count)), VIEWS[1]: largest_consensus_slices(shown),
             VIEWS[2]: np.flatnonzero(areas > np.median(areas)).tolist()}
    paper_seconds = paper_protocol_seconds(base, dataset, args.paper_protocol_images, args.num_samples, device)
    pictured = views[VIEWS[1]][: args.picture_images]
    per_config, seconds, failed, pictures, reused = {}, {}, {}, {}, []
    # every configuration is built from its model's own scheduler, never from the last one
    saved = {model: pipe.scheduler for model, pipe in pipelines.items()}
    # the other pipelines' results are kept by their weights (before any configuration replaces their scheduler), so a
    # folder retrained in place is measured again
    fingerprints = {model: pipeline_fingerprint(pipe)[:16] for model, pipe in pipelines.items() if model is not None}
    for config in args.configs:
        name, steps, clip, model, eta = parse_config(config)
        pipe = pipelines[model]
        kept = cache / f"{config.partition('@')[0].replace(':', '_')}.npz"
        if model is not None:
            kept = kept.with_name(f"{kept.stem}@{fingerprints[model]}.npz")
        if kept.exists():  # measured by an earlier run into this folder with the same arguments
            stored = np.load(kept)
            per_config[config] = {k[len("metric_"):]: stored[k] for k in stored.files if k.startswith("metric_")}
            seconds[config], pictures[config] = float(stored["seconds"]), stored["pictures"]
            reused.append(config)
            print(f"{config}: reused from {kept}", flush=True)
            continue
        pipe.scheduler = build_sampling_scheduler(saved[model], name, clip=clip)
        print(f"{config}: sampling {count} images x {args.num_samples}", flush=True)
        started = time.perf_counter()
        try:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16):
                per_image, samples = evaluate_pipeline(pipe, dataset, args.num_samples, steps, prompts=args.prompts,
                                                       max_images=count, images_per_call=args.images_per_call,
                                                       progress=True,  # a bar per configuration (DDIM-100: 40 min)
                                                       **({} if eta is None else {"eta": eta}))
        except Exception as error:  # e.g. a multistep solver that needs more steps
            failed[config] = f"{type(error).__name__}: {error}"
            print(f"{config}: does not run ({failed[config][:120]})", flush=True)
            continue
        synchronize(device)
        seconds[config] = (time.perf_counter() - started) / count
        per_config[config], pictures[config] = per_image, samples[pictured]
        partial = kept.with_suffix(".tmp.npz")
        np.savez(partial, seconds=seconds[config], pictures=pictures[config],
                 **{f"metric_{k}": v for k, v in per_image.items()})
        os.replace(partial, kept)
        print(f"{config}: GED {per_image['ged'].mean():.4f}  CI {per_image['ci'].mean():.4f}  "
              f"{seconds[config]:.2f} s/image", flush=True)

    header = (f"{args.split}, {count} images ({len(views[VIEWS[1]])} nodules), N = {args.num_samples}, {args.prompts} "
              f"prompts{', bf16' if args.bf16 else ''}; reference {args.reference}\n")
    speedup = {c: paper_seconds / t for c, t in seconds.items()} if paper_seconds else {}
    if reused:
        header += (f"\nReused from an earlier run into this folder, with the same arguments: {', '.join(reused)} (their "
                   "s/image too, so their speed is not measured side by side with this run's).\n")
    if paper_seconds:
        header += (f"\nSpeed: the paper's protocol (16 one-sample DDIM-100 calls per image, float32) took "
                   f"{paper_seconds:.1f} s/image on {args.paper_protocol_images} images in this run; '× paper' is that over "
                   "each configuration's s/image.\n")
    report = {"views": {}, "seconds_per_image": seconds, "failed": failed, "reused": reused, "images": count,
              "split": args.split,
              "paper_protocol_seconds_per_image": paper_seconds, "speedup_vs_paper": speedup}
    sections = [header]
    for view, indices in views.items():
        rows, differences, text = view_table(per_config, indices, args.reference, seconds, speedup)
        report["views"][view] = {"indices": indices, "rows": rows, "ged_minus_reference": differences}
        sections.append(f"## {view} ({len(indices)} images)\n\n{text}")
    equal = [c for c in per_config
             if meets_default_rule(*(report["views"][v]["ged_minus_reference"].get(c) for v in RULE_VIEWS))]
    if equal:  # the reference at least, when it was measured
        # equal UNet calls cost the same (a solver's own arithmetic is negligible beside a UNet call, and seconds
        # measured in different runs are not comparable): the nearer one to the reference on all slices wins
        nearest = lambda c: report["views"][VIEWS[0]]["ged_minus_reference"][c]["mean"]  # noqa: E731
        cheapest = min(equal, key=lambda c: (parse_config(c).steps, nearest(c)))
        report["cheapest_meeting_rule"] = cheapest
        views = ", ".join(f"'{v}'" for v in RULE_VIEWS)
        sections.append(f"Cheapest meeting the rule (fewest UNet calls, then the smallest all-slices GED − reference; "
                        f"GED − reference <= {TOLERANCE} on {views}, the upper end of the all-slices 95% interval "
                        f"below {INTERVAL_LIMIT}): {cheapest}\n")
    sections += [f"{config} does not run: {error}\n" for config, error in failed.items()]
    text = "\n".join(sections)
    (output_dir / "sweep.md").write_text(text)
    (output_dir / "sweep.json").write_text(json.dumps(report, indent=2))
    plot(report["views"], args.reference, output_dir / "quality_vs_steps.png")
    if pictured and pictures:
        draw_samples(dataset.select(pictured), pictures, output_dir / "samples.png")
    print(text)
    return report


def view_table(per_config: dict, indices: list[int], reference: str, seconds: dict,
               speedup: dict | None = None) -> tuple[dict, dict, str]:
    """Summaries, paired GED differences to `reference` and the markdown table over the images at `indices` (with
    the speed-up over the paper's protocol when measured)."""
    subset = {c: {k: v[indices] for k, v in per_image.items()} for c, per_image in per_config.items()}
    rows = {c: summarize(per_image) for c, per_image in subset.items()}
    differences = ({c: paired_difference(v["ged"], subset[reference]["ged"]) for c, v in subset.items()}
                   if reference in subset else {})
    lines = format_table(rows, with_interval=True).splitlines()
    lines[0] += " s/image | × paper | GED − reference [95%] |"
    lines[1] += "---|---|---|"
    lines[2:] = [line + f" {seconds[c]:.2f} | " + (f"{speedup[c]:.0f}× | " if speedup else "n/a | ")
                 + (f"{differences[c]['mean']:+.4f} [{differences[c]['low']:+.4f}, {differences[c]['high']:+.4f}] |"
                    if c in differences else "n/a |")
                 for line, c in zip(lines[2:], rows)]
    return rows, differences, "\n".join(lines) + "\n"


def paper_protocol_seconds(pipe, dataset, num_images: int, num_samples: int, device: str) -> float | None:
    """Seconds per image of the paper's protocol: `num_samples` separate one-sample DDIM-100 calls in float32."""
    if num_images <= 0:
        return None
    from ambiseg_diffusers.lidc import eval_prompts

    ddim = AmbiSegPipeline(**{**pipe.components, "scheduler": build_sampling_scheduler(pipe.scheduler, "ddim")},
                           **{k: pipe.config[k] for k in ("autocast", "prompt_style")})
    ddim.set_progress_bar_config(disable=True)
    warm = dataset[0]  # one untimed call first: the paper's protocol must not pay the one-time warm-up alone
    ddim(np.asarray(warm["image"], np.float32), eval_prompts(warm, "annotator")[0], num_samples=1, num_inference_steps=2,
         autocast="no", generator=torch.Generator().manual_seed(0))
    synchronize(device)
    started = time.perf_counter()
    for index in range(min(num_images, len(dataset))):
        row = dataset[index]
        prompts = eval_prompts(row, "annotator")
        for sample in range(num_samples):
            ddim(np.asarray(row["image"], np.float32), prompts[sample % len(prompts)], num_samples=1,
                 num_inference_steps=100, autocast="no", generator=torch.Generator().manual_seed(1000 * index + sample))
    synchronize(device)
    return (time.perf_counter() - started) / min(num_images, len(dataset))


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so that a timer reads finished work."""
    if device == "cuda":
        torch.cuda.synchronize()


def draw_samples(rows, pictures: dict, path: Path) -> None:
    """One labelled `sample_grid` block per configuration, on the same slices: image | raters | samples | ..."""
    import PIL.Image
    import PIL.ImageDraw

    from ambiseg_diffusers.visualization import sample_grid

    images, raters = np.asarray(rows["image"]), rater_masks(rows)
    blocks = []
    for config, samples in pictures.items():
        grid = sample_grid(images, raters, samples)
        block = PIL.Image.new("RGB", (grid.width, grid.height + 16), "white")
        block.paste(grid, (0, 16))
        PIL.ImageDraw.Draw(block).text((4, 2), config, fill="black")
        blocks.append(block)
    canvas = PIL.Image.new("RGB", (max(b.width for b in blocks), sum(b.height for b in blocks)), "white")
    top = 0
    for block in blocks:
        canvas.paste(block, (0, top))
        top += block.height
    canvas.save(path)


def plot(views: dict, reference: str, path: Path) -> None:
    """GED and GED − reference against steps, one row of panels per view."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(len(views), 2, figsize=(10, 3.4 * len(views)), squeeze=False)
    for axes, (view, report) in zip(grid, views.items()):
        rows, differences = report["rows"], report["ged_minus_reference"]
        top = 0.0
        for curve in sorted({_curve_of(c) for c in rows}):
            configs = sorted((c for c in rows if _curve_of(c) == curve), key=lambda c: parse_config(c).steps)
            steps = [parse_config(c).steps for c in configs]
            label = curve.replace(":noclip", " (no x0 clip)")
            ged = [rows[c]["ged"] for c in configs]
            axes[0].errorbar(steps, [g["mean"] for g in ged], yerr=[[g["mean"] - g["low"] for g in ged],
                                                                    [g["high"] - g["mean"] for g in ged]],
                             marker="o", capsize=3, label=label)
            top = max(top, *[g["high"] for g in ged])
            if differences:
                diff = [differences[c] for c in configs]
                axes[1].errorbar(steps, [d["mean"] for d in diff], yerr=[[d["mean"] - d["low"] for d in diff],
                                                                        [d["high"] - d["mean"] for d in diff]],
                                 marker="o", capsize=3, label=label)
        axes[0].set_ylim(0, top * 1.15)
        axes[0].set_title(f"{view}\nGED, 95% bootstrap interval (lower is better)", fontsize=9)
        axes[1].axhline(TOLERANCE, color="0.5", linestyle="--", label=f"reference + {TOLERANCE}")
        axes[1].axhline(0, color="0.4", linewidth=0.8)
        axes[1].set_title(f"{view}\nGED − {reference} (same images and seeds)", fontsize=9)
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xlabel("denoising steps")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _curve_of(config: str) -> str:
    """The line a configuration belongs on: its sampler, with or without x0 clipping, and its model."""
    name, _, clip, model, eta = parse_config(config)
    return ((name if clip else f"{name}:noclip") + ("" if eta is None else f":eta={eta:g}")
            + (f"@{model}" if model else ""))


if __name__ == "__main__":
    main()
