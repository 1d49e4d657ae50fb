#!/usr/bin/env python
"""TDG-DiffDPO: Diffusion-DPO fine-tuning of an AmbiSeg reference on Dice-ranked preference pairs.

    python training/build_preferences.py --reference checkpoints/ambiseg-lidc64 --output_dir runs/prefs-md
    accelerate launch training/train_dpo.py --reference checkpoints/ambiseg-lidc64 --preferences runs/prefs-md \\
        --config cpu --output_dir runs/tdg-diffdpo

The policy starts from the reference; the reference stays frozen. With `--lora_rank > 0` the policy is a peft LoRA
adapter on the reference UNet and the reference is the same UNet with the adapter disabled (no second copy in
memory); the result is saved as the adapter plus a pointer to the reference folder, and the pipeline's
`preference_scale` moves between reference (0) and aligned model (1).

The ambiguity latent: each mask of a pair is denoised with the posterior mean z of *that* mask, q(z | image, prompt,
mask), and policy and reference share it. z is the pretraining's "which annotation" code: given it, the denoising
error measures how well each model reconstructs that very mask, exactly the quantity pretraining optimised, and the
comparison isolates the UNets (the prior and posterior are frozen).

Errors are measured in epsilon space whatever the model predicts (x0 errors are weighted by SNR(t), which is exact),
so beta = 5000 means what the paper means.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.logging import get_logger
from datasets import load_dataset, load_from_disk
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ambiseg_diffusers import AmbiSegPipeline
from ambiseg_diffusers.configs import DPO_CONFIGS, DPOTrainingConfig
from ambiseg_diffusers.image_processing import masks_to_model_range, normalize_image
from ambiseg_diffusers.lidc import augment
from ambiseg_diffusers.losses import diffusion_dpo_loss, predicted_noise
from ambiseg_diffusers.pipelines.pipeline_ambiseg import PREFERENCE_ADAPTER, PREFERENCE_FILE
from ambiseg_diffusers.text import PromptCache
from ambiseg_diffusers.training_utils import (
    add_config_arguments, add_run_arguments, batch_indices, checkpoint_step, config_from_args, config_json,
    load_training_dataset, log_validation, optimizer_step, push_run, resume_path, save_checkpoint, start_run,
    step_generator, validation_report, write_model_card,
)

logger = get_logger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="the pretrained AmbiSeg pipeline (folder or Hub id)")
    parser.add_argument("--preferences", required=True, help="folder written by build_preferences.py (or a Hub dataset)")
    add_run_arguments(parser, validation_steps=0, checkpointing_steps=50)
    add_config_arguments(parser, DPO_CONFIGS)
    return parser.parse_args(argv)


def load_preferences(name: str):
    """A folder written by build_preferences.py, or a Hub dataset id."""
    return load_from_disk(name) if os.path.isdir(name) else load_dataset(name, split="train")


def pair_batch(pairs, indices, image_clip: float, generator) -> dict:
    """Augmented pairs: image `(B, 1, H, W)` in [-1, 1], winner/loser `(B, 1, H, W)` in {-1, 1}, prompts."""
    rows = pairs[indices]
    images, winners, losers = [], [], []
    for image, winner, loser in zip(rows["image"], rows["winner"], rows["loser"]):
        image = torch.as_tensor(np.asarray(image), dtype=torch.float32)[None]
        masks = torch.as_tensor(np.stack([np.asarray(winner), np.asarray(loser)]), dtype=torch.float32)
        image, masks = augment(image, masks, generator)
        images.append(image)
        winners.append(masks[:1])
        losers.append(masks[1:])
    return {"pixel_values": normalize_image(torch.stack(images), image_clip),
            "winner": masks_to_model_range(torch.stack(winners)), "loser": masks_to_model_range(torch.stack(losers)),
            "prompts": list(rows["prompt"])}


def main(argv=None) -> Path:
    args = parse_args(argv)
    config: DPOTrainingConfig = config_from_args(args, DPO_CONFIGS)
    output_dir = Path(args.output_dir)
    accelerator = start_run(args, config, "dpo_config.json")

    reference = AmbiSegPipeline.from_pretrained(args.reference, dtype=torch.float32)
    noise_scheduler = reference.scheduler
    encode = PromptCache(reference.tokenizer, reference.text_encoder)
    posterior = reference.posterior.requires_grad_(False).eval() if reference.posterior is not None else None
    unet = reference.unet
    if config.lora_rank > 0:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(
            r=config.lora_rank, lora_alpha=config.lora_alpha or config.lora_rank, init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj"],
        ), adapter_name=PREFERENCE_ADAPTER)
        reference_unet = None  # the same UNet with the adapter disabled
    else:
        reference_unet = copy.deepcopy(unet).requires_grad_(False).eval()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.adam_weight_decay)

    pairs = load_preferences(args.preferences)
    steps_per_epoch = max(len(pairs) // config.train_batch_size, 1)
    max_steps = steps_per_epoch * config.num_epochs
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_training_steps=max_steps)
    ema = EMAModel(params, decay=config.ema_decay, use_ema_warmup=config.ema_warmup) if config.ema_decay > 0 else None
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    validation = load_training_dataset(args.dataset, args.validation_split, args.data_dir)

    first_step = 0
    checkpoint = resume_path(str(output_dir), args.resume_from_checkpoint)
    if checkpoint:
        accelerator.load_state(checkpoint)
        first_step = checkpoint_step(checkpoint)
    if accelerator.is_main_process:
        accelerator.init_trackers("tdg-diffdpo", config=json.loads(config_json(config)))
    logger.info(f"{len(pairs)} pairs, {max_steps} steps ({config.num_epochs} epochs of batch {config.train_batch_size})")

    def errors(model, inputs, timesteps, text, text_mask, z, noisy, noise):
        """Per-row epsilon-space MSE `(2B,)` of `model` on the stacked winner and loser rows."""
        output = model(inputs, timesteps, encoder_hidden_states=text, encoder_attention_mask=text_mask, class_labels=z).sample
        eps = predicted_noise(noise_scheduler, output.float(), noisy, timesteps)
        return ((eps - noise) ** 2).mean(dim=(1, 2, 3))

    def reference_errors(*inputs):
        with torch.no_grad():
            if reference_unet is not None:
                return errors(reference_unet, *inputs)
            model = accelerator.unwrap_model(unet)
            model.disable_adapters()
            try:
                return errors(model, *inputs)
            finally:
                model.enable_adapters()

    def aligned_pipeline() -> AmbiSegPipeline:
        model = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.store(params)
            ema.copy_to(params)
        pipe = AmbiSegPipeline(**{**reference.components, "unet": model}, image_clip=reference.config.image_clip,
                               default_num_inference_steps=reference.config.default_num_inference_steps)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def validate(step: int) -> dict:
        pipe = aligned_pipeline()
        metrics, grid = validation_report(pipe, validation, args.num_validation_images, args.num_validation_samples, seed=args.seed)
        if ema is not None:
            ema.restore(params)
        log_validation(accelerator, metrics, grid, step)
        grid.save(output_dir / f"validation-{step:06d}.png")
        logger.info("validation step %d: %s", step, {k: round(v, 4) for k, v in metrics.items()})
        return metrics

    progress = tqdm(range(first_step, max_steps), initial=first_step, total=max_steps,
                    disable=not accelerator.is_local_main_process, desc="dpo")
    ran, metrics, started = 0, {}, time.time()
    for step in range(first_step, max_steps):
        unet.train()
        generator = step_generator(args.seed, step, accelerator.process_index)
        rows = batch_indices(len(pairs), config.train_batch_size, args.seed, step)
        batch = pair_batch(pairs, rows, reference.config.image_clip, generator)
        images = batch["pixel_values"].to(accelerator.device)
        masks = torch.cat([batch["winner"], batch["loser"]]).to(accelerator.device)  # winners first, then losers
        size = images.shape[0]
        text, text_mask = encode(batch["prompts"], accelerator.device)
        text, text_mask, images2 = text.repeat(2, 1, 1), text_mask.repeat(2, 1), images.repeat(2, 1, 1, 1)
        noise = torch.randn(batch["winner"].shape, generator=generator).repeat(2, 1, 1, 1).to(accelerator.device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (size,), generator=generator).repeat(2).to(accelerator.device)
        z = None
        if posterior is not None:
            with torch.no_grad():
                z = posterior(torch.cat([images2, masks], 1), text, text_mask).mean
        noisy = noise_scheduler.add_noise(masks, noise, timesteps)
        inputs = (torch.cat([images2, noisy], 1), timesteps, text, text_mask, z, noisy, noise)

        with accelerator.accumulate(unet):
            policy = errors(unet, *inputs)
            ref = reference_errors(*inputs)
            loss, logs = diffusion_dpo_loss(policy[:size], policy[size:], ref[:size], ref[size:], beta=config.beta)
            optimizer_step(accelerator, loss, params, optimizer, lr_scheduler, config.max_grad_norm)

        if accelerator.sync_gradients:
            if ema is not None:
                ema.step(params)
            done, ran = step + 1, ran + 1
            logs = {"loss": loss.item(), **{k: v.item() for k, v in logs.items()}}
            accelerator.log(logs, step=done)
            progress.update()
            progress.set_postfix(loss=f"{logs['loss']:.4f}", acc=f"{logs['implicit_accuracy']:.2f}",
                                 s_per_step=f"{(time.time() - started) / ran:.2f}")
            if accelerator.is_main_process and done % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args, done)
            if args.validation_steps and accelerator.is_main_process and done % args.validation_steps == 0:
                metrics = validate(done)
            if args.stop_after_steps == ran:
                accelerator.end_training()
                return output_dir
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if not metrics:
            metrics = validate(max_steps)
        save_aligned(aligned_pipeline(), args, config, output_dir)
        write_model_card(str(output_dir), "tdg-diffdpo.md", {
            "reference": args.reference, "preferences": args.preferences, "num_pairs": len(pairs),
            "config_json": config_json(config), "hub_model_id": args.hub_model_id or output_dir.name,
            "metrics": json.dumps({k: round(v, 4) for k, v in metrics.items()}, indent=2),
        })
        if args.push_to_hub:
            push_run(args)
    accelerator.end_training()
    return output_dir


def save_aligned(pipe: AmbiSegPipeline, args, config: DPOTrainingConfig, output_dir: Path) -> None:
    """LoRA: the adapter and a pointer to the reference (relative when both are folders). Full: the whole pipeline."""
    if config.lora_rank > 0:
        pipe.unet.save_lora_adapter(str(output_dir / "unet_lora"), adapter_name=PREFERENCE_ADAPTER)
        reference = args.reference
        if os.path.isdir(reference):
            reference = os.path.relpath(os.path.abspath(reference), os.path.abspath(output_dir))
        (output_dir / PREFERENCE_FILE).write_text(json.dumps({"reference": reference, "adapter": PREFERENCE_ADAPTER}, indent=2))
    else:
        pipe.save_pretrained(output_dir)


if __name__ == "__main__":
    main()
