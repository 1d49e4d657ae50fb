#!/usr/bin/env python
"""Choose a training run's checkpoint on the selection split (patients carved from the training set), never on
validate: every pipeline snapshot of the run (`snapshots/step-N`, written with `--snapshot_minutes`) and its final
pipeline are sampled on the same slices with the same seeds, and the lowest GED wins.

    python scripts/select_checkpoint.py --run_dir ~/ambiseg-runs/ambiseg-45min
    python scripts/evaluate.py --model "$(python scripts/select_checkpoint.py --run_dir R --print_best)" --split validate ...
    python scripts/select_checkpoint.py --run_dir runs/my-ambiseg --train_data_dir my_data   # your own data

The data flags are evaluate.py's (docs/own_data.md). The default split to choose on is the one training validated on:
lidc64 "selection"; other data its validation split, else "selection" (the seeded 10% of "train" held out of
training). Choosing on a split that reports ("validate", "test") is refused.

Writes `selection.json` (every candidate's GED, CI and average Dice, and the chosen one) in the (first) run folder
and prints the chosen folder. Several runs (and `--extra` folders, e.g. the committed checkpoint) can compete. Works for any pipeline of the package (AmbiSeg, ProbUNet).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ambiseg_diffusers import load_pipeline
from ambiseg_diffusers.data import (
    DatasetContractError, add_data_arguments, check_choosing_split, dataset_label, load_from_args, model_image_processor,
    selection_split,
)
from ambiseg_diffusers.evaluation import evaluate_pipeline
from ambiseg_diffusers.lidc import pipeline_prompt_style

SELECTION_FILE = "selection.json"


def candidates(run_dir: Path) -> list[Path]:
    """The run's snapshots in step order, then its final pipeline (when saved). A snapshot taken at the final step
    holds the final weights: only the final pipeline is scored then."""
    snapshots = sorted(p for p in (run_dir / "snapshots").glob("step-*") if (p / "model_index.json").is_file())
    final = [run_dir] if (run_dir / "model_index.json").is_file() else []
    summary = run_dir / "training_summary.json"
    if final and summary.is_file():
        final_step = json.loads(summary.read_text())["steps"]
        snapshots = [p for p in snapshots if p.name != f"step-{final_step:06d}"]
    if not snapshots and not final:
        raise FileNotFoundError(f"{run_dir} holds no pipeline: neither snapshots/step-N folders nor a final "
                                "model_index.json (train with --snapshot_minutes, or let the run finish).")
    return snapshots + final


def select(paths: list[Path], output: Path, data_args: argparse.Namespace, split: str = "selection",
           num_samples: int = 16, max_images: int | None = None, images_per_call: int = 16, bf16: bool = False,
           seed: int = 0, prompts: str = "annotator", batch_size: int | None = None) -> dict:
    """Scores every pipeline folder in `paths` on `split` of the data `data_args` names (the flags of
    `add_data_arguments`) and writes the record, with the lowest-GED one as `best`. Each pipeline gets the prompts in
    its own `prompt_style`, and the images at its own size unless `--resolution` names one."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, datasets = [], {}  # the split loaded once per prompt style and size
    for path in paths:
        pipe = load_pipeline(str(path)).to(device)
        pipe.set_progress_bar_config(disable=True)
        processor = model_image_processor(pipe)
        key = (pipeline_prompt_style(pipe), None if processor is None else processor.to_json_string())
        if key not in datasets:
            datasets[key] = load_from_args(data_args, split, key[0], image_processor=processor)
        dataset = datasets[key]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            per_image, _ = evaluate_pipeline(pipe, dataset, num_samples, seed=seed, images_per_call=images_per_call,
                                             max_images=max_images, prompts=prompts,
                                             **({} if batch_size is None else {"batch_size": batch_size}))
        rows.append({"path": str(path), "ged": float(per_image["ged"].mean()), "ci": float(per_image["ci"].mean()),
                     "avg_dice": float(per_image["avg_dice"].mean())})
        print(f"{path}: GED {rows[-1]['ged']:.4f}  CI {rows[-1]['ci']:.4f}", flush=True)
    best = min(rows, key=lambda r: r["ged"])
    record = {"dataset": dataset_label(data_args), "split": split, "images": len(per_image["ged"]),
              "num_samples": num_samples, "seed": seed, "prompts": prompts, "criterion": "lowest mean GED",
              "candidates": rows, "best": best["path"]}
    output.write_text(json.dumps(record, indent=2))
    return record


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", nargs="+", required=True,
                        help="training run folder(s): all their snapshots and final pipelines compete")
    parser.add_argument("--extra", nargs="*", default=[], help="more pipeline folders to compete (e.g. the committed one)")
    parser.add_argument("--output", default=None, help="the record (default: selection.json in the first run folder)")
    parser.add_argument("--prompts", default="annotator", choices=["annotator", "nodule", "none"],
                        help="prompt protocol ('none' for models trained without text)")
    add_data_arguments(parser)
    parser.add_argument("--split", default=None, help="the split to choose on (default: the one training validated "
                        "on; lidc64: selection); never one that reports (validate, test)")
    parser.add_argument("--num_samples", type=int, default=16)
    parser.add_argument("--max_images", type=int, default=None, help="only the first N images of the split")
    parser.add_argument("--images_per_call", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=None, help="rows per UNet call (memory and speed only)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print_best", action="store_true", help="only print the chosen folder (reuses selection.json)")
    args = parser.parse_args(argv)
    run_dirs = [Path(d).expanduser() for d in args.run_dir]
    output = Path(args.output) if args.output else run_dirs[0] / SELECTION_FILE
    output.parent.mkdir(parents=True, exist_ok=True)
    if args.print_best and output.is_file():
        record = json.loads(output.read_text())
    else:
        args.split = args.split or selection_split(args.dataset_name, args.train_data_dir)
        try:
            check_choosing_split(args.dataset_name, args.train_data_dir, args.split)
        except DatasetContractError as error:
            parser.error(f"--split: {error}")
        paths = [p for d in run_dirs for p in candidates(d)] + [Path(e) for e in args.extra]
        record = select(paths, output, args, args.split, args.num_samples, args.max_images, args.images_per_call,
                        args.bf16, args.seed, args.prompts, args.batch_size)
    print(record["best"])
    return record


if __name__ == "__main__":
    main()
