#!/usr/bin/env python
"""Build TDG-DiffDPO preference pairs from a reference AmbiSeg pipeline.

    python training/build_preferences.py --reference checkpoints/ambiseg-lidc64 --strategy mean_dice \\
        --output_dir runs/preferences-mean_dice [--push_to_hub org/name]

Samples K candidates for a seeded fraction of the training rows, ranks them by Dice against the raters
(`best_rater`, `mean_dice` or `stochastic_run`), and saves the (winner, loser) pairs as a `datasets.Dataset`.
An interrupted build continues where it stopped when run again with the same arguments.
"""

from __future__ import annotations

import argparse

import torch

from ambiseg_diffusers import AmbiSegPipeline
from ambiseg_diffusers.preferences import STRATEGIES, build_preferences
from ambiseg_diffusers.training_utils import load_training_dataset


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="reference pipeline folder or Hub id")
    parser.add_argument("--strategy", default="mean_dice", choices=STRATEGIES)
    parser.add_argument("--dataset", default="lidc64")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--split", default="train")
    parser.add_argument("--num_candidates", type=int, default=4, help="K (paper: 4)")
    parser.add_argument("--fraction", type=float, default=0.25, help="fraction of the training rows (paper: 0.25)")
    parser.add_argument("--num_inference_steps", type=int, default=None)
    parser.add_argument("--images_per_call", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--push_to_hub", default=None, metavar="REPO_ID")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    pipe = AmbiSegPipeline.from_pretrained(args.reference, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    dataset = load_training_dataset(args.dataset, args.split, args.data_dir)
    pairs, report = build_preferences(
        pipe, dataset, args.output_dir, strategy=args.strategy, num_candidates=args.num_candidates,
        fraction=args.fraction, seed=args.seed, images_per_call=args.images_per_call,
        num_inference_steps=args.num_inference_steps,
    )
    print(f"{report['pairs']} pairs from {report['images']} images ({report['ties']} images with all candidates tied, "
          f"no pair) -> {args.output_dir}")
    if args.push_to_hub:
        pairs.push_to_hub(args.push_to_hub)
    return pairs, report


if __name__ == "__main__":
    main()
