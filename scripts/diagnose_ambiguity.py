#!/usr/bin/env python
"""Diagnose a checkpoint's ambiguity term on the selection split (never on validate for a choice).

    python scripts/diagnose_ambiguity.py --model checkpoints/ambiseg-lidc64 --split selection --output_dir runs/diag
    python scripts/diagnose_ambiguity.py --model runs/my-ambiseg --train_data_dir my_data --output_dir runs/my-diag

The data flags are evaluate.py's (docs/own_data.md); the default split is the one training validated on (lidc64:
selection; other data its validation split, else the held-out "selection").

Prints and writes (`diagnostics.json`) the KL(q || p) of each latent dimension and the number of live ones, the
per-dimension correlation of the prior's and the posterior's means over the (image, rater) pairs, and, when the UNet
takes z, the prior gap: GED with prior z minus GED with posterior z over the same noise
(`ambiseg_diffusers.diagnostics`). A pipeline without prior and posterior (ambiguity "none") has nothing to report.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ambiseg_diffusers import AmbiSegPipeline, load_pipeline
from ambiseg_diffusers.data import add_data_arguments, load_from_args, model_image_processor, selection_split
from ambiseg_diffusers.diagnostics import ambiguity_diagnostics
from ambiseg_diffusers.lidc import pipeline_prompt_style


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pipeline folder or Hub id")
    add_data_arguments(parser)
    parser.add_argument("--split", default=None, help="default: the split training validated on (lidc64: selection, "
                        "the training patients held out)")
    parser.add_argument("--max_images", type=int, default=None, help="only the first N images")
    parser.add_argument("--num_samples", type=int, default=16, help="samples per image for the prior gap")
    parser.add_argument("--no_prior_gap", action="store_true", help="latent statistics only (no sampling)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", required=True)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(args.model, dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    if not isinstance(pipe, AmbiSegPipeline):
        print(f"nothing to report: {args.model} is a {type(pipe).__name__}; these diagnostics read an AmbiSeg "
              "pipeline's prior, posterior and denoiser (the ambiguity term of the mask-diffusion model)")
        return {}
    if args.split is None:
        args.split = selection_split(args.dataset_name, args.train_data_dir)
    dataset = load_from_args(args, args.split, pipeline_prompt_style(pipe), image_processor=model_image_processor(pipe))
    with torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16):
        report = ambiguity_diagnostics(pipe, dataset, args.max_images, args.num_samples, args.seed,
                                       prior_gap=not args.no_prior_gap)
    report = {"model": args.model, "split": args.split, **report}
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "diagnostics.json").write_text(json.dumps(report, indent=2))
    for key, value in report.items():
        print(f"{key}: {[round(v, 3) for v in value] if isinstance(value, list) else value}")
    return report


if __name__ == "__main__":
    main()
