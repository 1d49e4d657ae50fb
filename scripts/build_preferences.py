#!/usr/bin/env python
"""Build TDG-DiffDPO preference pairs from a reference AmbiSeg pipeline.

    python scripts/build_preferences.py --reference checkpoints/ambiseg-lidc64 --strategy mean_dice \\
        --output_dir runs/preferences-mean_dice [--push_to_hub org/name]

Samples K candidates for a seeded fraction of the training rows, ranks them by Dice against the raters
(`best_rater`, `mean_dice` or `stochastic_run`), and saves the (winner, loser) pairs as a `datasets.Dataset`.
An interrupted build continues where it stopped when run again with the same arguments, reference weights and data
(its resolved folder, every data flag and the rows' contents);
other arguments are refused unless `--overwrite` starts over. `--push_to_hub` uploads the pairs with a dataset card
carrying the LIDC-IDRI CC BY 3.0 attribution.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ambiseg_diffusers import AmbiSegPipeline
from ambiseg_diffusers.hub_utils import dataset_card, push_dataset_to_hub
from ambiseg_diffusers.data import (
    add_data_arguments, check_prompts_for_model, dataset_label, distillation_splits, load_from_args,
    model_image_processor,
)
from ambiseg_diffusers.lidc import pipeline_prompt_style
from ambiseg_diffusers.preferences import STRATEGIES, build_preferences
from ambiseg_diffusers.run_records import data_arguments


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="reference pipeline folder or Hub id")
    parser.add_argument("--strategy", default="mean_dice", choices=STRATEGIES)
    add_data_arguments(parser)
    parser.add_argument("--split", default=None, help="split the pairs come from (default: the rows outside the split "
                        "train_dpo.py validates on: lidc64 train_fit; other data train, or train_fit where it has no "
                        "validation split)")
    parser.add_argument("--num_candidates", type=int, default=4, help="K (paper: 4)")
    parser.add_argument("--fraction", type=float, default=0.25, help="fraction of the training rows (paper: 0.25)")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="default: the reference's default")
    parser.add_argument("--images_per_call", type=int, default=4, help="images per sampling call and per resumable part")
    parser.add_argument("--seed", type=int, default=0, help="seed of the row selection, prompts and candidates")
    parser.add_argument("--output_dir", required=True, help="where the Dataset is saved")
    parser.add_argument("--overwrite", action="store_true", help="discard partial results made with other arguments")
    parser.add_argument("--record_states", action="store_true",
                        help="keep each mask's sampling states (and z), for train_dpo.py to denoise pairs as sampled")
    parser.add_argument("--push_to_hub", default=None, metavar="REPO_ID")
    args = parser.parse_args(argv)
    # never the rows DPO validates (and its knob is chosen) on: "train" holds lidc64's and other data's "selection"
    args.split = args.split or distillation_splits(args.dataset_name, args.train_data_dir, None, None)[0]
    return args


def main(argv=None):
    args = parse_args(argv)
    pipe = AmbiSegPipeline.from_pretrained(args.reference, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    dataset = load_from_args(args, args.split, pipeline_prompt_style(pipe), image_processor=model_image_processor(pipe))
    check_prompts_for_model(pipe, dataset, opt_in=None)  # pairs of a text model on empty prompts: refused
    pairs, report = build_preferences(
        pipe, dataset, args.output_dir, strategy=args.strategy, num_candidates=args.num_candidates,
        fraction=args.fraction, seed=args.seed, images_per_call=args.images_per_call,
        num_inference_steps=args.num_inference_steps, source=data_arguments(args, dataset, args.split),
        overwrite=args.overwrite, record_states=args.record_states,
    )
    print(f"{report['pairs']} pairs from {report['images']} images ({report['ties']} images with all candidates tied, "
          f"no pair) -> {args.output_dir}")
    if report["pairs"] == 0:  # an empty, loadable result; train_dpo.py refuses it
        print("no pair: every image's candidates tied (the same Dice against the raters: blank masks, or masks the "
              "reference always gets equally right); raise --num_candidates or use another --strategy, reference or "
              "split", file=sys.stderr)
    if args.push_to_hub:
        card = dataset_card(
            f"TDG-DiffDPO preference pairs ({args.strategy})",
            f"{report['pairs']} (winner, loser) mask pairs sampled by the AmbiSeg reference `{args.reference}` on "
            f"{report['images']} {dataset_label(args)} `{args.split}` images and ranked by `{args.strategy}` Dice against "
            f"the raters' masks ({report['ties']} images tied and gave no pair).",
            "python scripts/build_preferences.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            extra_tags=["tdg-diffdpo", "preference-pairs"],
        )
        push_dataset_to_hub(pairs, args.push_to_hub, card)
    return pairs, report


if __name__ == "__main__":
    main()
