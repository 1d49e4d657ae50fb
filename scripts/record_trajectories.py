#!/usr/bin/env python
"""Record a teacher's DDIM trajectories on training slices, the targets of trajectory distillation
(`training/train_consistency.py --trajectories`; Luhman & Luhman 2021, "Knowledge distillation in iterative
generative models"): for each image, `--samples_per_image` rows sampled as the pipeline samples them (its prompts,
one prior z per row, seeded noise), and for every row the state x_t before each DDIM step and the mask it ends at.

    python scripts/record_trajectories.py --teacher checkpoints/ambiseg-lidc64 --split train_fit \\
        --num_inference_steps 20 --bf16 --output_dir runs/trajectories

Resumable: every `--images_per_call` images are one shard (`shard-00000.npz`, named by its first image, written
atomically); a rerun with the same arguments records only the images no shard holds yet. The data flags are
evaluate.py's (docs/own_data.md), images read at the teacher's size; train_consistency.py takes the flags from the
recording. A shard holds, for its R rows: `images` (R, C, H, W) float32 as the
UNet sees them, `prompts` (R,), `z` (R, latent_dim) float32 (absent for a teacher without a latent), `states`
(R, K, C, H, W) float16 with `timesteps` (K,) the DDIM timesteps they sit at (states[:, 0] is the initial noise),
`final` (R, C, H, W) float32 in [-1, 1] (the teacher's last x0), `positions` (R,) the dataset rows. Record on
training patients only (`train_fit`), so choices made on `selection` stay fair.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from ambiseg_diffusers import AmbiSegPipeline
from ambiseg_diffusers.data import add_data_arguments, distillation_splits, load_from_args, model_image_processor
from ambiseg_diffusers.evaluation import build_sampling_scheduler
from ambiseg_diffusers.lidc import eval_prompts, pipeline_prompt_style
from ambiseg_diffusers.run_records import check_resumable, data_arguments, pipeline_fingerprint


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="the AmbiSeg pipeline whose trajectories are recorded")
    add_data_arguments(parser, resolution=False)  # evaluate.py's data flags (docs/own_data.md); the teacher's size
    parser.add_argument("--split", default=None, help="training rows (default: lidc64 train_fit, keeping the "
                        "selection patients out; other data the split the teacher trained on)")
    parser.add_argument("--num_inference_steps", type=int, default=20, help="DDIM steps of the teacher (>= 2)")
    parser.add_argument("--samples_per_image", type=int, default=16, help="rows recorded per image")
    parser.add_argument("--prompts", default="annotator", choices=["annotator", "nodule", "none"],
                        help="prompt protocol, as in evaluation (row s of an image takes prompt s mod count)")
    parser.add_argument("--seed", type=int, default=0,
                        help="image i draws its rows' noise from a generator seeded 10000019 + seed + i, their prior "
                             "z from one seeded seed + i")
    parser.add_argument("--max_images", type=int, default=None, help="only the first N images")
    parser.add_argument("--images_per_call", type=int, default=16, help="images per pipeline call and shard")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (as the pipeline samples on a CPU with native bf16)")
    parser.add_argument("--output_dir", required=True, help="the shards and run_arguments.json")
    parser.add_argument("--overwrite", action="store_true", help="delete the folder's earlier shards first")
    args = parser.parse_args(argv)
    args.split = distillation_splits(args.dataset_name, args.train_data_dir, args.split, None)[0]
    if args.num_inference_steps < 2:
        parser.error(f"--num_inference_steps must be at least 2, got {args.num_inference_steps}")
    if args.samples_per_image < 1 or args.images_per_call < 1:
        parser.error("--samples_per_image and --images_per_call must be at least 1")
    return args


def record_chunk(pipe: AmbiSegPipeline, rows: dict, positions: list[int], args) -> dict[str, np.ndarray]:
    """The trajectories of one chunk of dataset rows (a dict of lists) at dataset `positions`."""
    count, n = len(positions), args.samples_per_image
    prompt_lists = [eval_prompts({k: rows[k][i] for k in rows}, args.prompts) for i in range(count)]
    images = np.stack([np.asarray(image, np.float32) for image in rows["image"]])
    pixels = pipe.preprocess(images).float()  # what the UNet sees
    shape = (n, pipe.unet.mask_channels, *pixels.shape[-2:])
    # the initial noise is drawn here (so it can be recorded; stored in float16, about 1e-3 from what was sampled);
    # the generators then draw each row's prior z
    noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(
        10_000_019 + args.seed + p)) for p in positions])
    states, latents_seen = [noise.to(torch.float16)], {}

    def keep(pipeline, step, timestep, tensors):
        if step == 0:
            latents_seen["z"] = tensors.get("ambiguity_latents")
        if step < args.num_inference_steps - 1:
            states.append(tensors["latents"].float().cpu().to(torch.float16))
        return {}

    out = pipe(images, prompt_lists, num_samples=n, num_inference_steps=args.num_inference_steps, latents=noise,
               generator=[torch.Generator().manual_seed(args.seed + p) for p in positions],
               autocast="bf16" if args.bf16 else "no", output_type="latent", callback_on_step_end=keep,
               callback_on_step_end_tensor_inputs=["latents", "ambiguity_latents"])
    record = {
        "images": pixels.repeat_interleave(n, dim=0).numpy(),
        "prompts": np.asarray([prompts[s % len(prompts)] for prompts in prompt_lists for s in range(n)]),
        "states": torch.stack(states, 1).numpy(),
        "final": out.masks.float().clamp(-1, 1).cpu().numpy(),
        "positions": np.repeat(np.asarray(positions), n),
        "timesteps": pipe.scheduler.timesteps.cpu().numpy(),
    }
    if latents_seen.get("z") is not None:
        record["z"] = latents_seen["z"].float().cpu().numpy()
    return record


def main(argv=None) -> Path:
    args = parse_args(argv)
    pipe = AmbiSegPipeline.from_pretrained(args.teacher).to("cuda" if torch.cuda.is_available() else "cpu")
    pipe.set_progress_bar_config(disable=True)
    if pipe.scheduler.config.prediction_type != "sample":
        raise ValueError(f"--teacher {args.teacher!r} predicts {pipe.scheduler.config.prediction_type!r}; trajectory "
                         "distillation here needs an x0-predicting teacher (`prediction_type='sample'`).")
    total_steps = pipe.scheduler.config.num_train_timesteps
    if total_steps % args.num_inference_steps:  # trailing DDIM then misses the LCMScheduler's schedule k-1, 2k-1, ...
        raise ValueError(f"--num_inference_steps ({args.num_inference_steps}) must divide the teacher's {total_steps} "
                         "training timesteps, so that the distilled LCMScheduler samples at recorded states.")
    fingerprint = pipeline_fingerprint(pipe)  # the teacher as stored, as the training script loads it
    # the last step lands on x0 itself (alpha 1), so `final` is the teacher's last clean-mask prediction
    pipe.scheduler = DDIMScheduler.from_config(build_sampling_scheduler(pipe.scheduler, "ddim").config,
                                               set_alpha_to_one=True)
    dataset = load_from_args(args, args.split, pipeline_prompt_style(pipe), image_processor=model_image_processor(pipe))
    total = len(dataset) if args.max_images is None else min(args.max_images, len(dataset))
    output_dir = Path(args.output_dir)
    # images_per_call changes the batching only: each image's rows draw from their own generators (in bf16 the
    # batch can still move the last bits)
    deciding = {k: v for k, v in vars(args).items()
                if k not in ("output_dir", "max_images", "images_per_call", "overwrite")}
    deciding["teacher_sha256"] = fingerprint
    deciding.update(data_arguments(args, dataset, args.split))  # the data resolved and by content, not by name
    shards = sorted(output_dir.glob("shard-*.npz"))
    check_resumable(output_dir, deciding, shards, overwrite=args.overwrite)
    shards = sorted(output_dir.glob("shard-*.npz"))  # none left after --overwrite
    recorded = set()
    for shard in shards:
        with np.load(shard) as stored:
            recorded.update(int(p) for p in stored["positions"])
    missing = [p for p in range(total) if p not in recorded]
    for start in tqdm(range(0, len(missing), args.images_per_call), desc="shards", unit="shard"):
        positions = missing[start: start + args.images_per_call]
        shard = output_dir / f"shard-{positions[0]:05d}.npz"
        with torch.no_grad():
            record = record_chunk(pipe, dataset[positions], positions, args)
        partial = shard.with_name(f".{shard.stem}.partial.npz")
        np.savez(partial, **record)
        os.replace(partial, shard)
    return output_dir


if __name__ == "__main__":
    main()
