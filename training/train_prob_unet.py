#!/usr/bin/env python
"""Train the Probabilistic U-Net baseline (Kohl et al. 2018) on the same slices as AmbiSeg.

    accelerate launch training/train_prob_unet.py --output_dir runs/prob-unet
    accelerate launch training/train_prob_unet.py --output_dir runs/prob-unet --max_train_minutes 45 --snapshot_minutes 5

The data, the per-step seeding, checkpoints, resuming, the wall-clock budget and the snapshots are those of
training/train_ambiseg.py (one random rater mask per image per step, the same augmentation); the loss is the
negative ELBO of models/prob_unet.py. The result loads with `ProbUNetPipeline.from_pretrained(output_dir)` and is
scored by scripts/evaluate.py like any AmbiSeg pipeline.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler

from ambiseg_diffusers import ProbUNetModel, ProbUNetPipeline
from ambiseg_diffusers.configs import PROB_UNET_CONFIGS, ProbUNetTrainingConfig
from ambiseg_diffusers.evaluation import cpu_only, validation_report
from ambiseg_diffusers.hub_utils import model_card, push_folder_to_hub
from ambiseg_diffusers.data import add_data_arguments, dataset_label, default_splits, image_channels, load_from_args
from ambiseg_diffusers.run_records import data_arguments
from ambiseg_diffusers.training_utils import (
    TrainingClock, generator_of, log_validation, recipe_from_args, resume_training, save_checkpoint, step_batches,
)

logger = get_logger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    add_data_arguments(data, resolution=False)
    data.add_argument("--train_split", default=None, help="split to train on (default 'train'; 'train_fit' where the "
                      "data has no validation split)")
    data.add_argument("--validation_split", default=None,
                      help="split the periodic validation samples (default: lidc64 'mini'; other data its "
                           "'validation' split, else 'selection', a seeded 10%% of 'train' held out of training)")

    recipe = parser.add_argument_group("recipe (default: the --config preset's value)")
    recipe.add_argument("--config", default="kohl2018", choices=sorted(PROB_UNET_CONFIGS), help="named recipe")
    recipe.add_argument("--latent_dim", type=int, help="size of the Gaussian latent z")
    recipe.add_argument("--kl_weight", type=float, help="beta of the ELBO: reconstruction + beta * KL(q || p)")
    recipe.add_argument("--max_train_steps", type=int, help="optimizer steps")
    recipe.add_argument("--train_batch_size", type=int, help="global batch (split over processes)")
    recipe.add_argument("--learning_rate", type=float, help="AdamW learning rate")
    recipe.add_argument("--lr_scheduler", help="diffusers get_scheduler name")
    recipe.add_argument("--adam_weight_decay", type=float, help="AdamW weight decay")

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", required=True, help="run folder: checkpoints, logs, the final pipeline")
    run.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    run.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="autocast precision")
    run.add_argument("--max_train_minutes", type=float, default=None,
                     help="wall-clock budget of training steps (carried across resumes)")
    run.add_argument("--snapshot_minutes", type=float, default=None,
                     help="save the pipeline to snapshots/step-N every this many minutes of training")
    run.add_argument("--dataloader_num_workers", type=int, default=0,
                     help="processes that augment the next batches while the model trains (0 = in this process)")
    run.add_argument("--checkpointing_steps", type=int, default=500, help="save a resumable checkpoint every N steps")
    run.add_argument("--checkpoints_total_limit", type=int, default=2, help="keep at most this many checkpoints")
    run.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint-N folder or 'latest'")
    run.add_argument("--validation_steps", type=int, default=500, help="validate every N steps (0 = only at the end)")
    run.add_argument("--num_validation_images", type=int, default=4, help="images validated (0 = no validation)")
    run.add_argument("--num_validation_samples", type=int, default=16, help="samples per validation image")
    run.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "wandb", "none"], help="tracker")
    run.add_argument("--push_to_hub", action="store_true", help="upload the final pipeline and its card")
    run.add_argument("--hub_model_id", default=None, help="Hub repo (default: the output folder's name)")
    run.add_argument("--hub_token", default=None, help="Hub token (default: the logged-in one)")
    run.add_argument("--stop_after_steps", type=int, default=None,
                     help="stop without the final save after N steps in this process (simulates a kill; tests)")
    return parser.parse_args(argv)


def build_model(config: ProbUNetTrainingConfig, image_channels: int = 1) -> ProbUNetModel:
    return ProbUNetModel(
        image_channels=image_channels, latent_dim=config.latent_dim, block_out_channels=tuple(config.block_out_channels),
        convs_per_block=config.convs_per_block, num_1x1_convs=config.num_1x1_convs,
    )


def main(argv=None) -> Path:
    args = parse_args(argv)
    config: ProbUNetTrainingConfig = recipe_from_args(args, PROB_UNET_CONFIGS)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, log_with=None if args.report_to == "none" else args.report_to,
        cpu=cpu_only(),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "training_config.json").write_text(json.dumps(asdict(config), indent=2))

    # Data first: every row is checked before anything is built or trained.
    args.train_split, args.validation_split = default_splits(
        args.dataset_name, args.train_data_dir, args.train_split, args.validation_split)
    dataset = load_from_args(args, args.train_split, resolution=config.resolution)
    validation = (load_from_args(args, args.validation_split, resolution=config.resolution)
                  if args.num_validation_images else None)
    model = build_model(config, image_channels=image_channels(dataset))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.adam_weight_decay)
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_train_steps * accelerator.num_processes,
    )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)

    trained_on = data_arguments(args, dataset, args.train_split)  # a resume on other data is refused
    first_step, seconds = resume_training(accelerator, output_dir, args.resume_from_checkpoint, trained_on)
    clock = TrainingClock(args.max_train_minutes, args.snapshot_minutes, seconds)
    if accelerator.is_main_process:
        accelerator.init_trackers("prob-unet", config={k: str(v) for k, v in asdict(config).items()})

    def pipeline() -> ProbUNetPipeline:
        return ProbUNetPipeline(prob_unet=accelerator.unwrap_model(model), image_clip=config.image_clip)

    def validate(step: int) -> dict:
        model.eval()
        with accelerator.autocast():
            metrics, grid = validation_report(pipeline(), validation, args.num_validation_images,
                                              args.num_validation_samples, seed=args.seed)
        log_validation(accelerator, metrics, grid, step)
        logger.info("validation step %d: %s", step, {k: round(v, 4) for k, v in metrics.items()})
        return metrics

    batches = iter(step_batches(dataset, config, args.seed, accelerator, first_step, max(config.max_train_steps - first_step, 0),
                                args.dataloader_num_workers))
    progress = clock.progress_bar(first_step, config.max_train_steps, disable=not accelerator.is_local_main_process)
    done, metrics, metrics_step = first_step, {}, None
    for step in range(first_step, config.max_train_steps):
        if clock.expired_everywhere(accelerator):
            logger.info(f"stopping at step {step}: --max_train_minutes {args.max_train_minutes} spent")
            break
        started = time.perf_counter()
        model.train()
        batch = next(batches)
        generator = generator_of(batch)
        noise = torch.randn(len(batch["prompts"]), config.latent_dim, generator=generator)
        with accelerator.autocast():
            # forward() is the ELBO, so several processes average gradients through DDP
            loss, parts = model(batch["pixel_values"].to(accelerator.device), batch["mask_values"].to(accelerator.device),
                                config.kl_weight, noise.to(accelerator.device))
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        done = step + 1
        snapshot_due = clock.add(time.perf_counter() - started)
        # the means over the processes (one device sync per step)
        logs = {k: accelerator.reduce(v.detach(), reduction="mean").item() for k, v in {"loss": loss, **parts}.items()}
        accelerator.log(logs, step=done)
        progress.set_postfix(step=done, loss=f"{logs['loss']:.1f}", kl=f"{logs['kl']:.2f}")

        if accelerator.is_main_process and done % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, output_dir, done, args.checkpoints_total_limit, clock.seconds, trained_on)
        if accelerator.is_main_process and snapshot_due:
            pipeline().save_pretrained(output_dir / "snapshots" / f"step-{done:06d}")
        if validation is not None and args.validation_steps and done % args.validation_steps == 0:
            if accelerator.is_main_process:
                metrics, metrics_step = validate(done), done
            accelerator.wait_for_everyone()
        if args.stop_after_steps == done - first_step:
            logger.info(f"stopping after {args.stop_after_steps} steps (--stop_after_steps)")
            accelerator.end_training()
            return output_dir
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if validation is not None and metrics_step != done:
            metrics = validate(done)
        pipe = pipeline().to("cpu")
        pipe.save_pretrained(output_dir)
        (output_dir / "training_summary.json").write_text(json.dumps(
            {"steps": done, "train_minutes": round(clock.seconds / 60, 2), "metrics": metrics}, indent=2))
        repo_id = args.hub_model_id or output_dir.name
        is_lidc_data = "ratings" in dataset.column_names  # lidc64, or a LIDC folder of scripts/prepare_lidc.py
        model_card(
            "prob_unet.md", repo_id, extra_tags=["lung-nodule"] * is_lidc_data + ["probabilistic-unet"],
            lidc=is_lidc_data, dataset=dataset_label(args),
            train_split=args.train_split, num_rows=len(dataset), steps=done, minutes=f"{clock.seconds / 60:.1f}",
            config_json=json.dumps(asdict(config), indent=2),
            results=f"Periodic validation during training (split `{args.validation_split}`, first "
                    f"{args.num_validation_images} images, {args.num_validation_samples} samples): "
                    + (json.dumps({k: round(v, 4) for k, v in metrics.items()}) if metrics else "none in this run."),
        ).save(output_dir / "README.md")
        if args.push_to_hub:
            push_folder_to_hub(output_dir, repo_id, token=args.hub_token)
    accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    main()
