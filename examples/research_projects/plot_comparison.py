#!/usr/bin/env python
"""The comparison rows side by side in one picture: each row's chosen checkpoint samples the same validation nodules
with the same seeds and prompts as its validate evaluation (read from that folder's `run_arguments.json`).

    python examples/research_projects/plot_comparison.py --runs ~/ambiseg-runs/compare --rows prob-unet cimd-style ambiseg \\
        --indices 0 3 --output docs/images/comparison_validate.png

One block per row, labelled: image | raters | samples | mean | majority | variance for each nodule.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from ambiseg_diffusers import load_pipeline
from ambiseg_diffusers.evaluation import sample_rows
from ambiseg_diffusers.data import load_multirater, rater_masks
from ambiseg_diffusers.lidc import pipeline_prompt_style
from ambiseg_diffusers.visualization import sample_grid

LABEL_HEIGHT = 16


def row_grid(validate_dir: Path, indices: list[int], num_samples: int, data_dir: str | None) -> PIL.Image.Image:
    """The sample grid of one comparison row, drawn the way its validate evaluation sampled."""
    arguments = json.loads((validate_dir / "run_arguments.json").read_text())
    pipe = load_pipeline(arguments["model"], dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    data = {k: arguments[k] for k in ("train_data_dir", "image_column", "mask_column", "caption_column", "resolution")
            if k in arguments}  # evaluations written before the data flags read lidc64 or a save_to_disk folder
    dataset = load_multirater(arguments.get("dataset_name", arguments.get("dataset")), arguments["split"],
                              data_dir=data_dir, prompt_style=pipeline_prompt_style(pipe), **data)
    if max(indices) >= len(dataset):
        raise ValueError(f"`--indices` must be below {len(dataset)} (the {arguments['split']} split), got {max(indices)}.")
    rows = dataset[indices]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(arguments["bf16"]) and not torch.cuda.is_available()):
        samples = sample_rows(pipe, rows, indices, num_samples, arguments["prompts"], arguments["seed"],
                              arguments["steps"])
    return sample_grid(np.asarray(rows["image"]), rater_masks(rows), samples)


def stack_labelled(blocks: list[tuple[str, PIL.Image.Image]]) -> PIL.Image.Image:
    """Blocks one under the other, each under a line with its label."""
    width = max(block.width for _, block in blocks)
    height = sum(block.height + LABEL_HEIGHT for _, block in blocks)
    picture = PIL.Image.new("RGB", (width, height), "white")
    draw, top = PIL.ImageDraw.Draw(picture), 0
    for label, block in blocks:
        draw.text((2, top + 2), label, fill=(0, 0, 160))
        picture.paste(block, (0, top + LABEL_HEIGHT))
        top += block.height + LABEL_HEIGHT
    return picture


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="the RUNS folder of compare_baselines.sh")
    parser.add_argument("--rows", nargs="+", required=True, help="row folders (each with a validate/ evaluation)")
    parser.add_argument("--indices", nargs="+", type=int, default=[0, 1], help="split positions of the nodules")
    parser.add_argument("--num_samples", type=int, default=8, help="samples drawn per nodule")
    parser.add_argument("--data_dir", default=None, help="the lidc64 folder or its parent")
    parser.add_argument("--output", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    runs = Path(args.runs).expanduser()
    blocks = []
    for name in args.rows:
        validate_dir = runs / name / "validate"
        label = json.loads((validate_dir / "summary.json").read_text())["label"]
        blocks.append((label, row_grid(validate_dir, args.indices, args.num_samples, args.data_dir)))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    stack_labelled(blocks).save(output)
    print(output)
    return output


if __name__ == "__main__":
    main()
