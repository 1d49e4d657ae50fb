#!/usr/bin/env python
"""Evaluate a checkpoint the way the paper does: N samples per image, the ambiguity metrics, figures.

    python scripts/evaluate.py --model checkpoints/ambiseg-lidc64 --split validate --num_samples 16 \\
        --prompts annotator --scheduler ddim --steps 20 --output_dir runs/eval
    torchrun --nproc_per_node 2 scripts/evaluate.py ...                     # several processes (CPU or GPUs)
    accelerate launch --multi_gpu --num_processes 4 scripts/evaluate.py ...  # the same through accelerate

Writes per-image metrics (`per_image.jsonl`, `per_image.csv`), the paper-layout summary with 95% bootstrap
intervals (`summary.md`, `summary.json`), the sample-count sweep (Table 4) computed from this one run of the
largest N, and figures (`figure_samples.png`, `quality_vs_n.png`, optionally `prompt_control.png`).
Images are split across the launcher's processes, each writing its own `per_image.rank<r>.jsonl`; the main process
merges them once and records `num_processes` in `summary.json`. An interrupted run resumes from those files when
run again with the same arguments and model (recorded in `run_arguments.json`); other arguments are refused unless
`--overwrite` starts over.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from ambiseg_diffusers import load_pipeline
from ambiseg_diffusers.evaluation import (
    SAMPLING_SCHEDULERS, build_sampling_scheduler, cpu_only, sample_rows, warn_if_emulated_bf16,
)
from ambiseg_diffusers.data import (
    add_data_arguments, check_prompts_for_model, evaluation_split, load_from_args, model_image_processor, rater_masks,
)
from ambiseg_diffusers.lidc import pipeline_prompt_style
from ambiseg_diffusers.pipelines.pipeline_ambiseg import recommended_steps
from ambiseg_diffusers.metrics import METRIC_NAMES, compute_metrics_batch, format_table, summarize
from ambiseg_diffusers.run_records import check_resumable, data_arguments, pipeline_fingerprint
from ambiseg_diffusers.visualization import sample_grid

N_SWEEP = (1, 2, 4, 8, 12, 16, 24, 32)
FIGURE_IMAGES = 4


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pipeline folder or Hub id")
    add_data_arguments(parser)
    parser.add_argument("--split", default=None, help="split to evaluate (default: lidc64 'validate'; other data its "
                        "'test' split, else 'validation')")
    parser.add_argument("--num_samples", type=int, default=16, help="samples per image N")
    parser.add_argument("--prompts", default="annotator", choices=["annotator", "nodule", "none"],
                        help="prompt protocol (see ambiseg_diffusers.lidc)")
    parser.add_argument("--scheduler", default=None, choices=sorted(SAMPLING_SCHEDULERS),
                        help="sampler (default: the saved one)")
    parser.add_argument("--steps", type=int, default=None,
                        help="default: a distilled sampler's own count (consistency.json), else `__call__`'s default")
    parser.add_argument("--deterministic", action="store_true",
                        help="baseline: z at the prior mean and one sample repeated num_samples times")
    parser.add_argument("--guidance_scale", type=float, default=1.0)
    parser.add_argument("--prior_temperature", type=float, default=1.0, help="scale of the prior's std (0 = its mean)")
    parser.add_argument("--preference_scale", type=float, default=None,
                        help="TDG-DiffDPO checkpoints: 0 = reference ... 1 = aligned (default 1)")
    parser.add_argument("--max_images", type=int, default=None, help="only the first N images")
    parser.add_argument("--images_per_call", type=int, default=4, help="images per pipeline call (memory only)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="rows (image x sample) per UNet call, default: the pipeline's (memory and speed only)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (faster on CPUs with AVX-512 BF16 or AMX and "
                        "on Ampere+ GPUs; emulated elsewhere, and far slower than float32 there)")
    parser.add_argument("--seed", type=int, default=0, help="image i samples with a generator seeded seed + i")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--overwrite", action="store_true",
                        help="delete partial results made with other arguments and start over")
    parser.add_argument("--label", default=None, help="row label in summary.md")
    parser.add_argument("--prompt_control", nargs=2, default=None, metavar=("PROMPT_A", "PROMPT_B"),
                        help="also draw the paper's Figure 9 panel: 8 samples for each of two contradicting prompts")
    return parser.parse_args(argv)


def load_model(args):
    """AmbiSegPipeline, a TDG-DiffDPO adapter or ProbUNetPipeline: the class named in the folder's model_index.json."""
    pipe = load_pipeline(args.model, dtype=torch.float32)
    if args.scheduler:
        pipe.scheduler = build_sampling_scheduler(pipe.scheduler, args.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_images(pipe, rows: dict, args, indices: list[int]) -> np.ndarray:
    """`(B, N, H, W)` bool samples for a chunk of dataset rows, with this run's options."""
    with torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16, enabled=args.bf16):
        return sample_rows(pipe, rows, indices, args.num_samples, args.prompts, args.seed, args.steps,
                           deterministic=args.deterministic,
                           # only the options a run sets, so pipelines without them (ProbUNetPipeline) run too
                           **({} if args.guidance_scale == 1.0 else {"guidance_scale": args.guidance_scale}),
                           **({} if args.batch_size is None else {"batch_size": args.batch_size}),
                           **({} if args.deterministic or args.prior_temperature == 1.0 else {"prior_temperature": args.prior_temperature}),
                           **({} if args.preference_scale is None else {"preference_scale": args.preference_scale}))


def image_record(index: int, row: dict, samples: np.ndarray) -> dict:
    """Metrics of one image for every N of the sweep up to the number of samples (the first N samples)."""
    annotations = np.asarray(row["masks"]).astype(bool)[None]
    record = {"index": index, "nodule_id": row.get("nodule_id", ""), "slice": int(row.get("slice", -1))}
    for n in [n for n in N_SWEEP if n <= samples.shape[0]] + [samples.shape[0]]:
        metrics = compute_metrics_batch(samples[None, :n], annotations)
        record[f"n{n}"] = {k: float(v[0]) for k, v in metrics.items()}
    record.update(record[f"n{samples.shape[0]}"])
    record["sample_foreground"] = float(samples.mean())
    return record


def result_arguments(args, pipe, total: int, dataset=None) -> dict:
    """What defines the numbers of this run (not how it is split into calls or processes): the model's weights, the
    options, and the data (where it resolves to and its rows' contents, `data_arguments`)."""
    keys = ("dataset_name", "train_data_dir", "image_column", "mask_column", "caption_column", "resolution", "split", "num_samples", "prompts", "scheduler", "steps", "deterministic", "guidance_scale",
            "prior_temperature", "preference_scale", "bf16", "seed")
    return {"model": args.model, "model_sha256": pipeline_fingerprint(pipe), "images": total,
            **{k: getattr(args, k) for k in keys},
            **({} if dataset is None else data_arguments(args, dataset, args.split))}


def main(argv=None) -> dict:
    args = parse_args(argv)
    warn_if_emulated_bf16(args.bf16)
    state = PartialState(cpu=cpu_only())
    output_dir = Path(args.output_dir)
    pipe = load_model(args).to(state.device)
    args.steps = args.steps or recommended_steps(args.model)
    args.split = args.split or evaluation_split(args.dataset_name, args.train_data_dir)
    # data of another size is resized as training resized it (the pipeline's image processor), unless --resolution
    dataset = load_from_args(args, args.split, pipeline_prompt_style(pipe), image_processor=model_image_processor(pipe))
    check_prompts_for_model(pipe, dataset, args.prompts)  # a text model on data without its text: refused
    total = len(dataset) if args.max_images is None else min(args.max_images, len(dataset))
    if state.is_main_process:
        print(f"evaluating {total} images on {state.num_processes} process(es)", flush=True)

    # Resumable: each process appends finished images to its own file; a rerun skips the images in any of them.
    partial = sorted(output_dir.glob("per_image.rank*.jsonl"))
    check_resumable(output_dir, result_arguments(args, pipe, total, dataset), partial, args.overwrite,
                    write=state.is_main_process)
    state.wait_for_everyone()
    done = {json.loads(line)["index"] for path in output_dir.glob("per_image.rank*.jsonl")
            for line in path.read_text().splitlines()}
    state.wait_for_everyone()  # every process has read the files before any appends
    part = output_dir / f"per_image.rank{state.process_index}.jsonl"
    kept: dict[int, np.ndarray] = {}  # samples of the figure's images, when this process draws them
    with state.split_between_processes(list(range(total))) as mine:
        todo = [i for i in mine if i not in done]
        with part.open("a") as sink, tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"evaluate[{state.process_index}]",
                                           disable=not state.is_local_main_process) as bar:
            for start in range(0, len(todo), args.images_per_call):
                indices = todo[start : start + args.images_per_call]
                rows = dataset[indices]
                samples = sample_images(pipe, rows, args, indices)
                kept.update({i: samples[j] for j, i in enumerate(indices) if i < FIGURE_IMAGES})
                for j, index in enumerate(indices):
                    sink.write(json.dumps(image_record(index, dataset[index], samples[j])) + "\n")
                sink.flush()
                bar.update(len(indices))
    state.wait_for_everyone()
    if not state.is_main_process:
        return {}
    return write_reports(args, dataset, pipe, total, kept, state.num_processes)


def write_reports(args, dataset, pipe, total: int, kept: dict, num_processes: int) -> dict:
    output_dir = Path(args.output_dir)
    records = {}
    for part in sorted(output_dir.glob("per_image.rank*.jsonl")):
        for line in part.read_text().splitlines():
            record = json.loads(line)
            records[record["index"]] = record
    missing = sorted(set(range(total)) - set(records))
    if missing:
        raise RuntimeError(f"{len(missing)} images have no results (e.g. {missing[:5]}); run again to finish them.")
    records = [records[i] for i in range(total)]
    with (output_dir / "per_image.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with (output_dir / "per_image.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "nodule_id", "slice", *METRIC_NAMES, "sample_foreground"])
        writer.writerows([[r["index"], r["nodule_id"], r["slice"], *[r[k] for k in METRIC_NAMES], r["sample_foreground"]] for r in records])

    label = args.label or f"{Path(args.model).name} ({args.prompts} prompts{', deterministic' if args.deterministic else ''})"
    summary = summarize({k: np.array([r[k] for r in records]) for k in METRIC_NAMES})
    sweep = {n: summarize({k: np.array([r[f"n{n}"][k] for r in records]) for k in METRIC_NAMES})
             for n in N_SWEEP if f"n{n}" in records[0]}
    text = f"## {label}: {args.split}, {len(records)} images, N = {args.num_samples}\n\n"
    text += format_table({label: summary}, with_interval=True)
    text += "\n### Number of samples (Table 4; the first N of the same samples)\n\n"
    text += format_table({f"N = {n}": s for n, s in sweep.items()})
    text += f"\nMean sample foreground {np.mean([r['sample_foreground'] for r in records]):.4f}\n"
    (output_dir / "summary.md").write_text(text)
    (output_dir / "summary.json").write_text(json.dumps(
        {"label": label, "summary": summary, "n_sweep": sweep, "num_processes": num_processes, "images": len(records)},
        indent=2))
    figures(args, dataset, pipe, sweep, kept)
    print(text)
    return summary


def figures(args, dataset, pipe, sweep: dict, kept: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(args.output_dir)
    count = min(FIGURE_IMAGES, len(dataset))
    first = dataset[:count]
    samples = np.stack([kept[i] for i in range(count)]) if all(i in kept for i in range(count)) \
        else sample_images(pipe, first, args, list(range(count)))
    sample_grid(np.asarray(first["image"]), rater_masks(first), samples).save(output_dir / "figure_samples.png")

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    ns = sorted(sweep)
    for ax, key, title in zip(axes, ("ged", "ci", "dmax"), ("GED (lower is better)", "CI", "D_max")):
        ax.errorbar(ns, [sweep[n][key]["mean"] for n in ns],
                    yerr=[[sweep[n][key]["mean"] - sweep[n][key]["low"] for n in ns], [sweep[n][key]["high"] - sweep[n][key]["mean"] for n in ns]],
                    marker="o", capsize=3)
        ax.set_xlabel("samples per image N")
        ax.set_title(title)
        ax.set_xscale("log", base=2)
    fig.tight_layout()
    fig.savefig(output_dir / "quality_vs_n.png", dpi=120)
    plt.close(fig)

    if args.prompt_control:
        row = dataset[0]
        image = np.asarray(row["image"], np.float32)
        panels = []
        for prompt in args.prompt_control:
            out = pipe(image, prompt, num_samples=8, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed))
            panels.append(out.masks[0])
        grid = sample_grid(np.stack([image, image]), np.stack([np.asarray(row["masks"])] * 2), np.stack(panels))
        grid.save(output_dir / "prompt_control.png")
        sizes = [float(p.mean()) for p in panels]
        (output_dir / "prompt_control.json").write_text(json.dumps(dict(zip(args.prompt_control, sizes)), indent=2))


if __name__ == "__main__":
    main()
