#!/usr/bin/env python
"""Your own multi-rater data, proven on real data shaped like a user's: the LIDC crops exported as an imagefolder
(16-bit PNG images, 0/255 PNG rater masks, each slice's real rater count, text written by this script; no LIDC
fields), trained on with the documented commands, and compared with the same training through the LIDC loader.

    python examples/own_data.py --output_dir outputs/own_data --max_train_steps 150

Steps (each skipped when its output exists, so a rerun goes on where it stopped):
1. export: `train/` = lidc64 `train_fit`, `validation/` = `selection`, `test/` = `validate`, one `metadata.jsonl` per
   split (`file_name`, `mask_file_names`, `text`: one line per reading rater: that rater's paper-style prompt);
2. train `--train_data_dir <export>` and, with the same recipe, seed and rows, `--dataset_name lidc64
   --train_split train_fit` (four rater slots per slice, empty where a rater did not read it, LIDC's convention);
3. evaluate both on the exported `test` split (the 114 validate slices, each scored against its own raters only, the
   same prompts and seeds) and write `comparison.md`: both rows and their paired difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from ambiseg_diffusers.pipelines.pipeline_ambiseg import native_bf16

ROOT = Path(__file__).resolve().parents[1]
EXPORT_SPLITS = {"train": "train_fit", "validation": "selection", "test": "validate"}
# 16-bit PNG, as CT slices are often stored: value = 1000 * (the stored z-score) + 32768 (the pipeline z-scores
# every image itself, so only the rounding differs from the float crops).
PNG_SCALE, PNG_OFFSET = 1000.0, 32768.0


def export_imagefolder(output_dir: Path, data_dir: str | None = None) -> Path:
    """The lidc64 splits of `EXPORT_SPLITS` as an imagefolder; only the raters who read a nodule are written."""
    from ambiseg_diffusers.lidc import load_lidc64

    for folder_name, split in EXPORT_SPLITS.items():
        rows = load_lidc64(split, data_dir, prompt_style="paper")
        folder = output_dir / folder_name
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for index, row in enumerate(rows):
            image = np.asarray(row["image"], np.float64) * PNG_SCALE + PNG_OFFSET
            PIL.Image.fromarray(np.clip(np.rint(image), 0, 65535).astype(np.uint16)).save(folder / f"{index:05d}.png")
            readers = [m for m, valid in enumerate(row["annotator_valid"]) if valid]
            names = []
            for rater in readers:
                names.append(f"{index:05d}_rater{rater}.png")
                mask = np.asarray(row["masks"][rater], np.uint8) * 255
                PIL.Image.fromarray(mask).save(folder / names[-1])
            lines.append(json.dumps({"file_name": f"{index:05d}.png", "mask_file_names": names,
                                     "text": [row["prompts"][m] for m in readers]}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return output_dir


def run(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/own_data")
    parser.add_argument("--data_dir", default=None, help="the lidc64 folder or the folder above it")
    parser.add_argument("--max_train_steps", type=int, default=150, help="the budget of each training, in steps")
    parser.add_argument("--num_samples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    output = Path(args.output_dir)
    export = output / "imagefolder"
    if not (export / "test" / "metadata.jsonl").exists():
        export_imagefolder(export, args.data_dir)
    # bf16 where the hardware computes it (emulated bf16 is about 30x slower than float32 on an AVX2 CPU)
    bf16 = native_bf16(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    recipe = ["--config", "cpu", "--max_train_steps", str(args.max_train_steps), "--seed", str(args.seed),
              "--mixed_precision", "bf16" if bf16 else "no", "--num_validation_images", "4", "--validation_steps", "0",
              "--checkpointing_steps", "100", "--resume_from_checkpoint", "latest", "--report_to", "none"]
    lidc = ["--data_dir", args.data_dir] if args.data_dir else []
    routes = {
        "imagefolder": ["--train_data_dir", str(export)],
        "lidc64 loader": ["--dataset_name", "lidc64", "--train_split", "train_fit", "--validation_split", "selection",
                          *lidc],
    }
    evaluations = {}
    for label, data in routes.items():
        run_dir = output / f"run_{label.replace(' ', '_')}"
        if not (run_dir / "model_index.json").exists():
            run([sys.executable, str(ROOT / "training" / "train_ambiseg.py"), *data, *recipe, "--output_dir",
                 str(run_dir)])
        evaluations[label] = output / f"eval_{label.replace(' ', '_')}"
        if not (evaluations[label] / "summary.json").exists():
            run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model", str(run_dir), "--train_data_dir",
                 str(export), "--split", "test", "--num_samples", str(args.num_samples), *["--bf16"] * bf16, "--seed",
                 str(args.seed), "--label", label, "--output_dir", str(evaluations[label])])
    sys.path.insert(0, str(ROOT / "scripts"))
    from compare_evaluations import compare

    table, _ = compare(evaluations["lidc64 loader"], [evaluations["imagefolder"]], ["imagefolder route"])
    text = (f"Both trained {args.max_train_steps} steps (recipe `cpu`, seed {args.seed}, {'bf16' if bf16 else 'float32'}) "
            "on the same rows; evaluated "
            f"on the exported `test` split (lidc64 validate), N = {args.num_samples}, the same prompts and seeds, each "
            "slice against its own raters; the reference row is the lidc64-loader route.\n\n" + table)
    (output / "comparison.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
