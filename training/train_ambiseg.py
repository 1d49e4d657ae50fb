#!/usr/bin/env python
"""Pretrain AmbiSeg (mask diffusion + text cross-attention + ambiguity prior/posterior).

    accelerate launch training/train_ambiseg.py --config cpu --dataset lidc64 --output_dir runs/ambiseg
    accelerate launch training/train_ambiseg.py --config paper --dataset /data/lidc128 --output_dir runs/paper

One process on a CPU, many GPUs or nodes unchanged (accelerate DDP). Every random choice of a step is seeded by
(seed, step), so `--resume_from_checkpoint latest` continues an interrupted run exactly.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import time
from pathlib import Path

import torch
from accelerate.logging import get_logger
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ambiseg_diffusers import AmbiSegPipeline
from ambiseg_diffusers.configs import AmbiSegTrainingConfig
from ambiseg_diffusers.losses import ambiseg_loss, diffusion_target
from ambiseg_diffusers.metrics import TABLE_COLUMNS
from ambiseg_diffusers.text import PromptCache
from ambiseg_diffusers.training_utils import (
    add_config_arguments, add_run_arguments, batch_indices, build_models, build_noise_scheduler,
    build_sampling_scheduler, checkpoint_step, config_from_args, config_json, load_text_components,
    load_training_dataset, log_validation, optimizer_step, push_run, resume_path, save_checkpoint, start_run,
    step_generator, training_batch, validation_report, write_model_card,
)

logger = get_logger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--torch_compile", action="store_true")
    parser.add_argument("--save_fp16", action="store_true", help="store the final weights in fp16 (half the size)")
    add_run_arguments(parser, validation_steps=500, checkpointing_steps=500)
    add_config_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    config: AmbiSegTrainingConfig = config_from_args(args)
    output_dir = Path(args.output_dir)
    accelerator = start_run(args, config, "training_config.json")

    # Components. The text encoder is frozen: each distinct prompt is encoded once and cached.
    tokenizer, text_encoder = load_text_components(config.text_encoder)
    encode = PromptCache(tokenizer, text_encoder)
    unet, prior, posterior = build_models(config, text_encoder.config.hidden_size)
    noise_scheduler = build_noise_scheduler(config)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable = [m for m in (unet, prior, posterior) if m is not None]
    params = [p for m in trainable for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.adam_weight_decay)
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_train_steps * accelerator.num_processes,
    )
    ema_models = [
        EMAModel(m.parameters(), decay=config.ema_decay, use_ema_warmup=config.ema_warmup, model_cls=type(m), model_config=m.config)
        for m in trainable
    ]
    prepared = accelerator.prepare(*trainable, optimizer, lr_scheduler)
    trainable, optimizer, lr_scheduler = list(prepared[: len(trainable)]), prepared[-2], prepared[-1]
    for ema in ema_models:
        accelerator.register_for_checkpointing(ema)
    forward_unet = torch.compile(trainable[0]) if args.torch_compile else trainable[0]
    prior_model, posterior_model = (trainable[1], trainable[2]) if config.latent_dim else (None, None)

    dataset = load_training_dataset(args.dataset, args.train_split, args.data_dir)
    validation = load_training_dataset(args.dataset, args.validation_split, args.data_dir) if args.validation_steps else None
    per_process = config.train_batch_size // accelerator.num_processes
    if per_process < 1:
        raise ValueError("`train_batch_size` must be at least the number of processes.")

    first_step = 0
    checkpoint = resume_path(str(output_dir), args.resume_from_checkpoint)
    if checkpoint:
        accelerator.load_state(checkpoint)
        first_step = checkpoint_step(checkpoint)
        logger.info(f"resumed from {checkpoint} at step {first_step}")
    elif args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        raise FileNotFoundError(args.resume_from_checkpoint)

    if accelerator.is_main_process:
        accelerator.init_trackers("ambiseg", config={k: v for k, v in json.loads(config_json(config)).items()})
    logger.info(f"{len(dataset)} training rows, {config.max_train_steps} steps of batch {config.train_batch_size}")

    def make_pipeline(models) -> AmbiSegPipeline:
        unet_, prior_ = models[0], (models[1] if config.latent_dim else None)
        posterior_ = models[2] if config.latent_dim else None
        return AmbiSegPipeline(
            unet=unet_, prior=prior_, posterior=posterior_, text_encoder=text_encoder, tokenizer=tokenizer,
            scheduler=build_sampling_scheduler(noise_scheduler, config.sampling_scheduler),
            image_clip=config.image_clip, default_num_inference_steps=config.sampling_steps,
        )

    def ema_copies():
        """Eval copies of the models carrying the EMA weights (the training weights stay untouched)."""
        copies = []
        for model, ema in zip(trainable, ema_models):
            clone = copy.deepcopy(accelerator.unwrap_model(model)).eval()
            ema.copy_to(clone.parameters())
            copies.append(clone)
        return copies

    def validate(step: int) -> dict:
        pipeline = make_pipeline(ema_copies())
        pipeline.set_progress_bar_config(disable=True)
        metrics, grid = validation_report(
            pipeline, validation, args.num_validation_images, args.num_validation_samples, seed=args.seed
        )
        log_validation(accelerator, metrics, grid, step)
        grid.save(output_dir / f"validation-{step:06d}.png")
        logger.info("validation step %d: %s", step, {k: round(v, 4) for k, v in metrics.items()})
        return metrics

    progress = tqdm(range(first_step, config.max_train_steps), initial=first_step, total=config.max_train_steps,
                    disable=not accelerator.is_local_main_process, desc="train")
    started, ran, metrics, warm = time.time(), 0, {}, None
    for step in range(first_step, config.max_train_steps):
        for model in trainable:
            model.train()
        generator = step_generator(args.seed, step, accelerator.process_index)
        rows = batch_indices(len(dataset), config.train_batch_size, args.seed, step)
        rows = rows[accelerator.process_index * per_process : (accelerator.process_index + 1) * per_process]
        batch = training_batch(dataset, rows, config, generator)
        images = batch["pixel_values"].to(accelerator.device)
        clean = batch["mask_values"].to(accelerator.device)
        text, text_mask = encode(batch["prompts"], accelerator.device)
        noise = torch.randn(clean.shape, generator=generator).to(accelerator.device)
        timesteps = torch.randint(0, config.num_train_timesteps, (clean.shape[0],), generator=generator).to(accelerator.device)
        z_noise = torch.randn(clean.shape[0], max(config.latent_dim, 1), generator=generator).to(accelerator.device)

        with accelerator.accumulate(*trainable):
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            z = prior_dist = posterior_dist = None
            if config.latent_dim:
                posterior_dist = posterior_model(torch.cat([images, clean], 1), text, text_mask)
                prior_dist = prior_model(images, text, text_mask)
                z = posterior_dist.mean + posterior_dist.std * z_noise  # training uses z ~ q
            prediction = forward_unet(
                torch.cat([images, noisy], 1), timesteps, encoder_hidden_states=text,
                encoder_attention_mask=text_mask, class_labels=z,
            ).sample
            target = diffusion_target(noise_scheduler, clean, noise, timesteps)
            loss, parts = ambiseg_loss(prediction, target, posterior_dist, prior_dist, config.kl_weight)
            optimizer_step(accelerator, loss, params, optimizer, lr_scheduler, config.max_grad_norm)

        if accelerator.sync_gradients:
            for model, ema in zip(trainable, ema_models):
                ema.step(accelerator.unwrap_model(model).parameters())
            done = step + 1
            ran += 1
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0], **{k: v.item() for k, v in parts.items()}}
            accelerator.log(logs, step=done)
            progress.update()
            progress.set_postfix(loss=f"{logs['loss']:.4f}", kl=f"{logs.get('kl', 0):.2f}", s_per_step=f"{(time.time() - started) / ran:.2f}")
            if ran == 3:
                warm = time.time()  # the first steps pay for allocation (and compilation)

            if accelerator.is_main_process and done % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args, done)
            if validation is not None and accelerator.is_main_process and done % args.validation_steps == 0:
                metrics = validate(done)
            if args.stop_after_steps == ran:
                logger.info(f"stopping after {ran} steps (--stop_after_steps)")
                log_throughput(ran, warm if ran > 3 else None, accelerator)
                accelerator.end_training()
                return output_dir
    progress.close()
    log_throughput(ran, warm if ran > 3 else None, accelerator)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if validation is not None and not metrics:
            metrics = validate(config.max_train_steps)
        pipeline = make_pipeline(ema_copies())
        if args.save_fp16:
            pipeline.to(torch.float16)  # storage only: from_pretrained loads float32 by default
        pipeline.save_pretrained(output_dir)
        write_model_card(str(output_dir), "ambiseg.md", card_values(config, args, metrics, len(dataset)))
        if args.push_to_hub:
            push_run(args)
    accelerator.end_training()
    return output_dir


def log_throughput(ran: int, warm: float | None, accelerator) -> None:
    """One line for benchmarks/benchmark_training.py: steady-state seconds per step and peak memory."""
    per_step = (time.time() - warm) / (ran - 3) if warm else float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    logger.info(f"THROUGHPUT steps={ran} s_per_step={per_step:.3f} peak_memory_mib={peak:.0f} device={accelerator.device}")


def card_values(config: AmbiSegTrainingConfig, args, metrics: dict, num_rows: int) -> dict:
    table = "| " + " | ".join(TABLE_COLUMNS) + " |\n|" + "---|" * len(TABLE_COLUMNS) + "\n| " + " | ".join(
        f"{metrics[c]:.3f}" if c in metrics else "n/a" for c in TABLE_COLUMNS) + " |"
    return {
        "config_name": args.config, "config_json": config_json(config), "dataset": args.dataset,
        "train_split": args.train_split, "num_rows": num_rows, "max_train_steps": config.max_train_steps,
        "validation_split": args.validation_split, "num_validation_images": args.num_validation_images,
        "metrics_table": table, "hub_model_id": args.hub_model_id or Path(args.output_dir).name,
        "text_encoder": config.text_encoder,
    }


if __name__ == "__main__":
    main()
