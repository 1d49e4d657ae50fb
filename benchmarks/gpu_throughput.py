#!/usr/bin/env python
"""Throughput on a GPU: the whole validate split at N = 16 with the default call (bf16 on GPUs that support it), and
the projected time of the paper's evaluation (3,072 nodules x 16 samples; the paper: about 23 hours on 4 GPUs with
DDIM-100, one sample per call).

    python benchmarks/gpu_throughput.py --model checkpoints/ambiseg-lidc64      # on a machine with a CUDA GPU
    python benchmarks/gpu_throughput.py --device cpu --max_images 8               # the same script, smoke-tested

Prints images/s, samples/s, peak GPU memory and the projection, and writes them as JSON with `--output`.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ambiseg_diffusers import AmbiSegPipeline
from ambiseg_diffusers.evaluation import evaluate_pipeline
from ambiseg_diffusers.pipelines.pipeline_ambiseg import DEFAULT_NUM_INFERENCE_STEPS, recommended_steps
from ambiseg_diffusers.lidc import load_lidc64, pipeline_prompt_style

PAPER_NODULES = 3072


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="checkpoints/ambiseg-lidc64", help="pipeline folder or Hub id")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num_samples", type=int, default=16)
    parser.add_argument("--images_per_call", type=int, default=16, help="images per pipeline call (GPU batch)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="rows (image x sample) per UNet call (default: every row of a call at once)")
    parser.add_argument("--max_images", type=int, default=None, help="only the first N validate images")
    parser.add_argument("--output", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    pipe = AmbiSegPipeline.from_pretrained(args.model).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    dataset = load_lidc64("validate", prompt_style=pipeline_prompt_style(pipe))
    count = len(dataset) if args.max_images is None else min(args.max_images, len(dataset))
    evaluate_pipeline(pipe, dataset, 2, max_images=min(count, args.images_per_call))  # warm-up
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    per_image, _ = evaluate_pipeline(pipe, dataset, args.num_samples, recommended_steps(args.model), max_images=count,
                                     images_per_call=args.images_per_call, progress=True,
                                     batch_size=args.batch_size or args.images_per_call * args.num_samples)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "images": count, "num_samples": args.num_samples, "seconds": seconds, "images_per_s": count / seconds,
        "samples_per_s": count * args.num_samples / seconds,
        "projected_hours_paper_evaluation": PAPER_NODULES * seconds / count / 3600,
        "peak_gpu_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None,
        "ged": float(per_image["ged"].mean()), "steps": recommended_steps(args.model) or DEFAULT_NUM_INFERENCE_STEPS,
        "images_per_call": args.images_per_call,
    }
    print(json.dumps(result, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
