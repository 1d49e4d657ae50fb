#!/usr/bin/env python
"""Iterated TDG-DiffDPO: pairs from the current aligned model, train, repeat, with the reference fixed.

    python scripts/iterate_dpo.py --reference checkpoints/ambiseg-lidc64 --rounds 3 --output_dir runs/dpo-rounds \\
        --record_states -- --config cpu --lora_rank 8 --beta 5000

Round 1 builds pairs with the reference and trains an adapter from scratch; round r builds pairs with round r-1's
aligned model (the reference + its adapter) and trains on, starting from that adapter (`train_dpo.py
--init_adapter`), against the same frozen reference. Arguments after `--` go to train_dpo.py unchanged. Every round
is scored on `--score_split` (default `selection`: training patients, where choices are made) with the same seeds, and
`rounds.md` / `rounds.json` give each round's GED, CI and average Dice with the paired difference to the reference.
Each stage resumes (pairs per chunk, training per checkpoint); finished rounds are skipped; a rerun into the same
folder with other arguments (`--rounds` aside, so more rounds can be added) is refused. The data flags are
evaluate.py's (docs/own_data.md); they reach build_preferences.py and train_dpo.py too, and on other data than lidc64
the default `--score_split` is the split training validated on (its validation split, else `selection`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))  # train_dpo.py, run as a script
import build_preferences  # noqa: E402  (beside this script)
import train_dpo  # noqa: E402
from ambiseg_diffusers import AmbiSegPipeline
from ambiseg_diffusers.configs import DPO_CONFIGS
from ambiseg_diffusers.data import (
    DATA_FLAGS, DatasetContractError, add_data_arguments, check_choosing_split, data_flags, load_from_args,
    model_image_processor, selection_split, splits_overlap,
)
from ambiseg_diffusers.evaluation import evaluate_pipeline
from ambiseg_diffusers.lidc import pipeline_prompt_style
from ambiseg_diffusers.metrics import paired_difference
from ambiseg_diffusers.run_records import check_resumable, data_arguments, pipeline_fingerprint
from ambiseg_diffusers.training_utils import recipe_from_args

ROUND_METRICS = ("avg_dice", "ged", "ci")


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    dpo_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="the AmbiSeg pipeline to align (folder or Hub id)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (build pairs, train)")
    parser.add_argument("--output_dir", required=True, help="round-<r>/pairs and round-<r>/adapter go here")
    parser.add_argument("--strategy", default="mean_dice", choices=build_preferences.STRATEGIES)
    parser.add_argument("--split", default="train_fit", help="split the pairs come from (selection patients stay out)")
    parser.add_argument("--fraction", type=float, default=0.25, help="fraction of the split's rows per round")
    parser.add_argument("--num_candidates", type=int, default=4, help="candidates per image")
    parser.add_argument("--record_states", action="store_true", help="pairs denoised as sampled (train_dpo.py)")
    add_data_arguments(parser)
    parser.add_argument("--score_split", default=None, help="where each round is scored (default: lidc64 "
                        "selection, other data the split training validated on); never one that reports")
    parser.add_argument("--max_images", type=int, default=None, help="score on the first N images only (tests)")
    parser.add_argument("--num_samples", type=int, default=16, help="samples per image when scoring")
    parser.add_argument("--seed", type=int, default=0, help="seed of pairs (varied per round) and scoring")
    args = parser.parse_args(own)
    args.score_split = args.score_split or selection_split(args.dataset_name, args.train_data_dir)
    try:
        check_choosing_split(args.dataset_name, args.train_data_dir, args.score_split)
    except DatasetContractError as error:
        parser.error(f"--score_split: {error}")
    if splits_overlap(args.split, args.score_split):
        parser.error(f"--split {args.split!r} holds the rows of --score_split {args.score_split!r}: rounds would be "
                     "scored on rows their pairs came from; build pairs on train_fit")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    own_flags = ("--reference", "--preferences", "--output_dir", "--init_adapter", "--dataset",
                 *(f"--{name}" for name in DATA_FLAGS))
    if any(a.split("=")[0] in own_flags for a in dpo_args):
        parser.error("after `--` pass only the recipe and run options of train_dpo.py: this script sets --reference, "
                     "--preferences, --output_dir and --init_adapter itself, and passes its own data flags (before "
                     "`--`) on to build_preferences.py and train_dpo.py")
    # the recipe as train_dpo.py resolves it (a --config preset with its flags on top), not the literal flags
    recipe = recipe_from_args(train_dpo.parse_args(
        dpo_args + ["--reference", args.reference, "--preferences", "-", "--output_dir", "-"]), DPO_CONFIGS)
    if recipe.lora_rank < 1:
        parser.error(f"rounds go on from the last round's LoRA adapter, and the train_dpo.py recipe after `--` has "
                     f"lora_rank {recipe.lora_rank} (a full fine-tune): pass --lora_rank > 0")
    return args, dpo_args


def score(model: str | Path, args: argparse.Namespace) -> dict[str, list[float]]:
    """Per-image metrics of one pipeline on the scoring split (the same seeds for every round)."""
    pipe = AmbiSegPipeline.from_pretrained(str(model)).to("cuda" if torch.cuda.is_available() else "cpu")
    pipe.set_progress_bar_config(disable=True)
    dataset = load_from_args(args, args.score_split, pipeline_prompt_style(pipe), image_processor=model_image_processor(pipe))
    per_image, _ = evaluate_pipeline(pipe, dataset, args.num_samples, seed=args.seed, max_images=args.max_images)
    return {k: per_image[k].tolist() for k in ROUND_METRICS}


def data_record(args: argparse.Namespace) -> dict:
    """The reference's weights and both splits' data as they resolve (folders, contents): what a finished round's
    pairs and scores were made from, beyond the flags as given."""
    pipe = AmbiSegPipeline.from_pretrained(args.reference, dtype=torch.float32)
    record = {"reference_sha256": pipeline_fingerprint(pipe)}
    for split in dict.fromkeys((args.split, args.score_split)):
        rows = load_from_args(args, split, pipeline_prompt_style(pipe), image_processor=model_image_processor(pipe))
        record.update({f"{split}:{key}": value for key, value in data_arguments(args, rows, split).items()})
    return record


def main(argv=None) -> dict:
    args, dpo_args = parse_args(argv)
    output_dir = Path(args.output_dir)
    # a rerun resumes only with the same arguments (finished rounds, pairs and scores are reused as they are)
    arguments = {k: v for k, v in vars(args).items() if k != "rounds"} | {"train_dpo": dpo_args}
    check_resumable(output_dir, arguments | data_record(args), [output_dir / "rounds.json"])
    record_path = output_dir / "rounds.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}

    def save() -> None:
        tmp = record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, record_path)

    if "reference" not in record:
        record["reference"] = score(args.reference, args)
        save()
    policy = args.reference
    for round_number in range(1, args.rounds + 1):
        folder = output_dir / f"round-{round_number}"
        adapter = folder / "adapter"
        if not (adapter / "preference.json").exists():
            build = ["--reference", str(policy), "--strategy", args.strategy, "--split", args.split,
                     "--fraction", str(args.fraction), "--num_candidates", str(args.num_candidates),
                     "--seed", str(args.seed + round_number - 1), "--output_dir", str(folder / "pairs")]
            build += ["--record_states"] if args.record_states else []
            build += data_flags(args)
            if not (folder / "pairs" / "preference_report.json").exists():
                build_preferences.main(build)
            train = ["--reference", args.reference, "--preferences", str(folder / "pairs"), "--output_dir", str(adapter),
                     "--resume_from_checkpoint", "latest", *data_flags(args), *dpo_args]
            train += ["--init_adapter", str(policy)] if round_number > 1 else []
            train_dpo.main(train)
        if f"round-{round_number}" not in record:
            record[f"round-{round_number}"] = score(adapter, args)
            save()
        policy = adapter
    (output_dir / "rounds.md").write_text(table(record, args))
    print((output_dir / "rounds.md").read_text())
    return record


def table(record: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> str:
    """rounds.md: each round's means with the paired difference to the reference."""
    reference = record["reference"]
    lines = [f"{args.score_split}, {len(reference['ged'])} images, N = {args.num_samples}; the difference to the "
             "reference paired over images [95% bootstrap]", "",
             "| | " + " | ".join(ROUND_METRICS) + " |", "|---|" + "---|" * len(ROUND_METRICS)]
    for name, values in record.items():
        cells = []
        for metric in ROUND_METRICS:
            mean = sum(values[metric]) / len(values[metric])
            if name == "reference":
                cells.append(f"{mean:.4f}")
            else:
                diff = paired_difference(values[metric], reference[metric])
                cells.append(f"{mean:.4f} ({diff['mean']:+.4f} [{diff['low']:+.4f}, {diff['high']:+.4f}])")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
