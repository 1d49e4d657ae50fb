#!/usr/bin/env python
"""TDG-DiffDPO: Diffusion-DPO fine-tuning of an AmbiSeg reference on Dice-ranked preference pairs.

    python scripts/build_preferences.py --reference checkpoints/ambiseg-lidc64 --output_dir runs/prefs-md
    accelerate launch training/train_dpo.py --reference checkpoints/ambiseg-lidc64 --preferences runs/prefs-md \\
        --config cpu --output_dir runs/tdg-diffdpo

The policy starts from the reference; the reference stays frozen. With `--lora_rank > 0` the policy is a peft LoRA
adapter on the reference UNet and the reference is the same UNet with the adapter disabled (no second copy in
memory); the result is saved in diffusers' LoRA format (`pytorch_lora_weights.safetensors`) with `preference.json`
naming the reference (`--base_model_id` on the Hub, and its folder relative to the output for checkouts), and the
pipeline's `preference_scale` moves between reference (0) and aligned model (1). With `--lora_rank 0` the whole UNet
is fine-tuned against a frozen copy and the result is a complete pipeline.

The ambiguity latent: each mask of a pair is denoised with the posterior mean z of *that* mask, q(z | image, prompt,
mask), and policy and reference share it. z is the pretraining's "which annotation" code: given it, the denoising
error measures how well each model reconstructs that very mask, exactly the quantity pretraining optimised, and the
comparison isolates the UNets (the prior and posterior are frozen).

Pairs built with their sampling states (`build_preferences.py --record_states`) are denoised as they were sampled:
each mask at one of its own sampler steps (the UNet input and timestep the sampler gave it, the z it was sampled
with), so the preference acts where the few-step sampler decides the shape, instead of at fresh noise and a random
timestep the sampler never visits. `--init_adapter` starts the policy from an earlier round's adapter
(scripts/iterate_dpo.py runs the rounds).

`--error_space` picks the errors the loss compares (losses.dpo_errors): epsilon-space errors, as Diffusion-DPO, weight
an x0 model's errors by SNR(t), which lets the last few percent of timesteps dominate; the alternatives are min-SNR
capped, x0-space and clamped-x0 errors. `--pair_latent prior_sample` denoises a pair with one z drawn from the prior
(shared by winner and loser, as in sampling) instead of each mask's posterior mean. `--diagnostic_preferences` (pairs
built on the selection split) writes `implicit_accuracy.json` at the end: the fraction of those pairs the aligned model prefers more than the reference
does, at fixed timesteps, i.e. where along the noise levels the training moved the model.
The pairs of a global batch are split over the processes; the frozen reference runs under the same autocast as the
policy, so at step 0 policy and reference errors are equal and the loss is log 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from datasets import Dataset, load_dataset, load_from_disk
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ambiseg_diffusers import AmbiSegPipeline
from ambiseg_diffusers.configs import DPO_CONFIGS, DPOTrainingConfig
from ambiseg_diffusers.evaluation import cpu_only, validation_report
from ambiseg_diffusers.hub_utils import model_card, push_folder_to_hub
from ambiseg_diffusers.image_processing import masks_to_model_range
from ambiseg_diffusers.image_processor import AmbiSegImageProcessor
from ambiseg_diffusers.data import (
    add_data_arguments, check_prompts_for_model, data_source, default_splits, distillation_splits, load_from_args,
    model_image_processor, model_image_shape, splits_overlap,
)
from ambiseg_diffusers.lidc import FREE_TEXT, augment, pipeline_prompt_style
from ambiseg_diffusers.losses import DPO_ERROR_SPACES, diffusion_dpo_loss, dpo_errors
from ambiseg_diffusers.pipelines.pipeline_ambiseg import ADAPTER_FILE, LORA_WEIGHT_NAME, PREFERENCE_ADAPTER
from ambiseg_diffusers.text import PromptCache, sentence_encoded
from ambiseg_diffusers.training_utils import (
    LORA_TARGETS, adapter_base_matches, batch_indices, checkpoint_step, load_ema, load_trainable_adapter, log_validation,
    check_checkpoint_data, recipe_from_args, resume_checkpoint, save_checkpoint, save_ema, shard, step_generator,
    str2bool,
)

logger = get_logger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--reference", required=True, help="the pretrained AmbiSeg pipeline (folder or Hub id)")
    data.add_argument("--base_model_id", default=None,
                      help="Hub id of the reference, written into preference.json and the card (default: --reference "
                           "when it is a Hub id)")
    data.add_argument("--init_adapter", default=None,
                      help="a TDG-DiffDPO output folder whose adapter the policy starts from (a further round; the "
                           "reference stays --reference)")
    data.add_argument("--preferences", required=True, help="folder written by scripts/build_preferences.py, or a Hub dataset")
    data.add_argument("--diagnostic_preferences", default=None,
                      help="held-out pairs (e.g. built on the selection split): implicit accuracy per timestep at the end")
    add_data_arguments(data)  # the validation images (the pairs carry their own)
    data.add_argument("--validation_split", default=None,
                      help="split the validation samples (default: lidc64 'mini'; other data its 'validation' split, "
                           "else 'selection', a seeded 10%% of 'train')")

    recipe = parser.add_argument_group("recipe (default: the --config preset's value)")
    recipe.add_argument("--config", default="cpu", choices=sorted(DPO_CONFIGS), help="named recipe from configs.py")
    recipe.add_argument("--beta", type=float, help="DPO beta in Salesforce DiffusionDPO's convention (the paper's "
                        "5000 = an effective 2500 on the error difference)")
    recipe.add_argument("--error_space", choices=DPO_ERROR_SPACES,
                        help="errors the loss compares (losses.dpo_errors): epsilon, epsilon_min_snr, x0, x0_clamped")
    recipe.add_argument("--snr_gamma", type=float, help="SNR cap of --error_space epsilon_min_snr")
    recipe.add_argument("--pair_latent", choices=["posterior", "prior_sample"],
                        help="the ambiguity latent a pair is denoised with: each mask's posterior mean, or one draw "
                             "from the prior shared by winner and loser (as in sampling)")
    recipe.add_argument("--learning_rate", type=float, help="AdamW learning rate")
    recipe.add_argument("--lr_scheduler", choices=["constant", "linear", "cosine"], help="diffusers get_scheduler name")
    recipe.add_argument("--num_epochs", type=int, help="passes over the pairs (sets the step count)")
    recipe.add_argument("--max_train_steps", type=int,
                        help="optimizer steps; overrides --num_epochs (default: epochs x pairs / batch)")
    recipe.add_argument("--train_batch_size", type=int, help="preference pairs per step (global, split over processes)")
    recipe.add_argument("--max_grad_norm", type=float, help="gradient clipping norm")
    recipe.add_argument("--adam_weight_decay", type=float, help="AdamW weight decay")
    recipe.add_argument("--ema_decay", type=float, help="EMA decay of the trained weights; 0 = no EMA")
    recipe.add_argument("--ema_warmup", type=str2bool, metavar="{true,false}",
                        help="diffusers EMAModel warm-up")
    recipe.add_argument("--lora_rank", type=int, help="0 = full fine-tune; > 0 = LoRA of this rank")
    recipe.add_argument("--lora_alpha", type=int, help="LoRA alpha; 0 = the rank")

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", required=True, help="run folder: checkpoints, logs, the adapter or pipeline")
    run.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    run.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                     help="autocast precision of policy and reference (default: accelerate's config)")
    run.add_argument("--checkpointing_steps", type=int, default=50, help="save a resumable checkpoint every N steps")
    run.add_argument("--checkpoints_total_limit", type=int, default=2, help="keep at most this many checkpoints")
    run.add_argument("--resume_from_checkpoint", default=None,
                     help="a checkpoint-N folder, or 'latest' (the newest complete one in --output_dir)")
    run.add_argument("--validation_steps", type=int, default=0, help="validate every N steps (0 = only at the end)")
    run.add_argument("--num_validation_images", type=int, default=4,
                     help="images validated each time (0 = no validation); the cost is images x samples x steps")
    run.add_argument("--num_validation_samples", type=int, default=16, help="samples per validation image")
    run.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "wandb", "none"], help="tracker")
    run.add_argument("--push_to_hub", action="store_true", help="upload the adapter (or pipeline) and its card")
    run.add_argument("--hub_model_id", default=None, help="Hub repo (default: the output folder's name)")
    run.add_argument("--hub_token", default=None, help="Hub token (default: the logged-in one)")
    run.add_argument("--stop_after_steps", type=int, default=None,
                     help="stop without the final save after N steps in this process (simulates a kill; tests)")
    args = parser.parse_args(argv)
    if args.checkpointing_steps < 1:
        parser.error("--checkpointing_steps must be >= 1")
    if args.init_adapter and not os.path.isfile(os.path.join(args.init_adapter, LORA_WEIGHT_NAME)):
        parser.error(f"--init_adapter {args.init_adapter!r} holds no {LORA_WEIGHT_NAME} (a LoRA TDG-DiffDPO output folder)")
    if args.push_to_hub and args.base_model_id is None and os.path.isdir(args.reference):
        parser.error("--push_to_hub with a local --reference needs --base_model_id (the reference's Hub repo): the "
                     "published adapter must name a base model that others can download")
    return args


def check_pairs_split(args) -> None:
    """Refuses to validate on rows the pairs were built from (their build's record names its data and split; pairs
    without one, e.g. from the Hub, are not checked)."""
    record = Path(args.preferences) / "run_arguments.json"
    if not record.is_file():
        return
    built = json.loads(record.read_text())
    split = built.get("data.split", built.get("split"))
    same_data = built.get("data.source", data_source(args)) == data_source(args)
    if split is not None and same_data and splits_overlap(split, args.validation_split):
        raise ValueError(
            f"`--preferences` {args.preferences!r} were built on {split!r}, which holds the rows of --validation_split "
            f"{args.validation_split!r}: validation would score rows the pairs came from. Build the pairs on "
            f"{distillation_splits(args.dataset_name, args.train_data_dir, None, None)[0]!r} (build_preferences.py's "
            "default), or pass another --validation_split.")


def pairs_fingerprint(pairs) -> str:
    """sha256 of the pairs' images, prompts and masks: what a DPO run trains on, wherever the folder is."""
    import hashlib

    digest = hashlib.sha256()
    for start in range(0, len(pairs), 256):
        batch = pairs.with_format("numpy")[start : start + 256]
        for key in ("image", "winner", "loser"):
            digest.update(np.ascontiguousarray(batch[key]).tobytes())
        digest.update(json.dumps([str(p) for p in batch["prompt"]]).encode())
    return digest.hexdigest()


def load_preferences(name: str):
    """A folder written by build_preferences.py, or a Hub dataset id."""
    return load_from_disk(name) if os.path.isdir(name) else load_dataset(name, split="train")


def pair_batch(pairs: Dataset, indices: list[int], image_processor: AmbiSegImageProcessor,
               generator: torch.Generator) -> dict:
    """Augmented pairs: image `(B, C, H, W)` normalised by the reference's `image_processor` into [-1, 1] (pairs are
    built at its size), winner/loser `(B, 1, H, W)` in {-1, 1}, prompts. Pairs built
    with their sampling states (`build_preferences(record_states=True)`) are not augmented (a turned state is not one
    the sampler gives the turned image: the UNet is not rotation-equivariant) and also carry winner_states /
    loser_states `(B, S, H, W)`, state_timesteps `(B, S)` and, where recorded, winner_z / loser_z `(B, latent_dim)`."""
    rows = pairs[indices]
    with_states = "winner_states" in rows
    images, masks_of_rows = [], []
    for i, image in enumerate(rows["image"]):
        image = torch.as_tensor(np.asarray(image), dtype=torch.float32)
        image = image[None] if image.ndim == 2 else image
        planes = [np.asarray(rows["winner"][i])[None], np.asarray(rows["loser"][i])[None]]
        if with_states:
            planes += [np.asarray(rows["winner_states"][i]), np.asarray(rows["loser_states"][i])]
        masks = torch.as_tensor(np.concatenate(planes), dtype=torch.float32)
        if not with_states:
            image, masks = augment(image, masks, generator)
        images.append(image)
        masks_of_rows.append(masks)
    stacked = torch.stack(masks_of_rows)
    batch = {"pixel_values": image_processor.normalize(torch.stack(images)),
             "winner": masks_to_model_range(stacked[:, :1]), "loser": masks_to_model_range(stacked[:, 1:2]),
             "prompts": list(rows["prompt"])}
    if with_states:
        num_states = (stacked.shape[1] - 2) // 2
        batch.update(winner_states=stacked[:, 2 : 2 + num_states], loser_states=stacked[:, 2 + num_states :],
                     state_timesteps=torch.as_tensor(np.asarray(rows["state_timesteps"]), dtype=torch.long))
        if "winner_z" in rows:
            batch.update(winner_z=torch.as_tensor(np.asarray(rows["winner_z"]), dtype=torch.float32),
                         loser_z=torch.as_tensor(np.asarray(rows["loser_z"]), dtype=torch.float32))
    return batch


def denoising_errors(unet, inputs: dict, noise_scheduler, config: DPOTrainingConfig) -> torch.Tensor:
    """Per-row errors `(2B,)` of `unet` on the stacked winner and loser rows, in `config.error_space`."""
    output = unet(inputs["model_input"], inputs["timesteps"], encoder_hidden_states=inputs["text"],
                  encoder_attention_mask=inputs["text_mask"], class_labels=inputs["z"]).sample
    return dpo_errors(noise_scheduler, output, inputs["noisy"], inputs["noise"], inputs["clean"], inputs["timesteps"],
                      config.error_space, config.snr_gamma)


def pair_inputs(batch, posterior, encode, noise_scheduler, generator, device, timesteps=None, prior=None) -> dict:
    """Winner and loser rows noised with the same noise and timestep (random, or the given `(B,)` ones), with each
    mask's posterior-mean z, or (given `prior`) one z drawn from p(z | image, prompt) per pair and shared by winner
    and loser, as in sampling. Pairs with sampling states (and no given `timesteps`) are denoised as they were
    sampled instead: `trajectory_inputs`."""
    if "winner_states" in batch and timesteps is None:
        return trajectory_inputs(batch, encode, noise_scheduler, generator, device)
    size = batch["pixel_values"].shape[0]
    images = batch["pixel_values"].to(device).repeat(2, 1, 1, 1)
    masks = torch.cat([batch["winner"], batch["loser"]]).to(device)  # winners first, then losers
    text, text_mask = encode(batch["prompts"], device)
    text, text_mask = text.repeat(2, 1, 1), text_mask.repeat(2, 1)
    noise = torch.randn(batch["winner"].shape, generator=generator).repeat(2, 1, 1, 1).to(device)
    if timesteps is None:
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (size,), generator=generator)
    timesteps = timesteps.repeat(2).to(device)
    z = None
    if prior is not None:
        with torch.no_grad():
            draw = torch.randn(size, prior.config.latent_dim, generator=generator).to(device)
            z = prior(images[:size], text[:size], text_mask[:size]).sample(noise=draw).repeat(2, 1)
    elif posterior is not None:
        with torch.no_grad():
            z = posterior(torch.cat([images, masks], 1), text, text_mask).mean
    noisy = noise_scheduler.add_noise(masks, noise, timesteps)
    return {"model_input": torch.cat([images, noisy], 1), "timesteps": timesteps, "text": text, "text_mask": text_mask,
            "z": z, "noisy": noisy, "noise": noise, "clean": masks}


def trajectory_inputs(batch: dict, encode: PromptCache, noise_scheduler: DDPMScheduler, generator: torch.Generator,
                      device: torch.device) -> dict:
    """Each mask of a pair at one of its own sampling steps (the same step index for winner and loser, drawn per
    pair): the UNet input the sampler gave it there, that step's timestep, the z it was sampled with (if any), and
    the noise that input implies given the mask (x_t = a x0 + s eps), so every `--error_space` applies."""
    size, num_states = batch["winner_states"].shape[:2]
    images = batch["pixel_values"].to(device).repeat(2, 1, 1, 1)
    masks = torch.cat([batch["winner"], batch["loser"]]).to(device)
    text, text_mask = encode(batch["prompts"], device)
    text, text_mask = text.repeat(2, 1, 1), text_mask.repeat(2, 1)
    step = torch.randint(0, num_states, (size,), generator=generator)
    rows = torch.arange(size)
    noisy = torch.cat([batch["winner_states"][rows, step], batch["loser_states"][rows, step]])[:, None].to(device)
    timesteps = batch["state_timesteps"][rows, step].repeat(2).to(device)
    alpha_bar = noise_scheduler.alphas_cumprod.to(device)[timesteps].float().view(-1, 1, 1, 1)
    noise = (noisy - alpha_bar.sqrt() * masks) / (1 - alpha_bar).sqrt()
    z = torch.cat([batch["winner_z"], batch["loser_z"]]).to(device) if "winner_z" in batch else None
    return {"model_input": torch.cat([images, noisy], 1), "timesteps": timesteps, "text": text, "text_mask": text_mask,
            "z": z, "noisy": noisy, "noise": noise, "clean": masks}


# Where the diagnostic looks, as fractions of the training timesteps: 0, 5, 20, ..., 999 of 1000.
DIAGNOSTIC_FRACTIONS = (0, 0.005, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0)


def diagnostic_timesteps(num_train_timesteps: int) -> list[int]:
    return sorted({min(round(f * num_train_timesteps), num_train_timesteps - 1) for f in DIAGNOSTIC_FRACTIONS})


def summarize_deltas(deltas: dict[int, torch.Tensor], beta: float) -> dict:
    """Per timestep: the implicit accuracy (fraction of pairs with delta < 0) and the median |0.5 * beta * delta|."""
    steps = sorted(deltas)
    return {"timesteps": steps, "pairs": int(deltas[steps[0]].numel()),
            "implicit_accuracy": [float((deltas[t] < 0).float().mean()) for t in steps],
            "median_scaled_delta": [float((0.5 * beta * deltas[t]).abs().median()) for t in steps]}


def main(argv=None) -> Path:
    args = parse_args(argv)
    config: DPOTrainingConfig = recipe_from_args(args, DPO_CONFIGS)
    if args.init_adapter and config.lora_rank == 0:
        raise ValueError("`--init_adapter` continues a LoRA policy: it needs `--lora_rank` > 0.")
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, log_with=None if args.report_to == "none" else args.report_to,
        cpu=cpu_only(), project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    repo_id = args.hub_model_id or output_dir.name
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "dpo_config.json").write_text(json.dumps(asdict(config), indent=2))
        if args.push_to_hub:  # before training, as diffusers' examples do: a Hub problem must not cost a run
            from huggingface_hub import create_repo

            repo_id = create_repo(repo_id, exist_ok=True, token=args.hub_token).repo_id  # with its namespace

    # Every frozen module the steps, validation and saving touch lives on the accelerator's device.
    reference = AmbiSegPipeline.from_pretrained(args.reference, dtype=torch.float32).to(accelerator.device)
    reference.set_progress_bar_config(disable=True)
    # The training noising process, whatever sampler the reference was saved with (an Euler scheduler's add_noise is
    # variance-exploding: the UNet never saw such inputs), as diffusers' DPO example does.
    noise_scheduler = DDPMScheduler.from_config(reference.scheduler.config)
    encode = PromptCache(reference.tokenizer, reference.text_encoder,
                         by_sentence=sentence_encoded(pipeline_prompt_style(reference)))
    # Only a UNet that takes z needs one per pair (a "prediction_kl" or "none" reference denoises without).
    takes_z = bool(reference.unet.latent_dim)
    posterior = reference.posterior.requires_grad_(False).eval() if takes_z and reference.posterior is not None else None
    pair_prior = None
    if takes_z and config.pair_latent == "prior_sample" and reference.prior is not None:
        pair_prior = reference.prior.requires_grad_(False).eval()
    unet = reference.unet
    if config.lora_rank > 0 and args.init_adapter:  # a further round: the policy goes on from the last one's adapter
        check_adapter_base(args.init_adapter, args.reference)
        unet.requires_grad_(False)
        load_trainable_adapter(reference, args.init_adapter, PREFERENCE_ADAPTER, config.lora_rank)
        reference_unet = None
    elif config.lora_rank > 0:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or config.lora_rank,
                                    init_lora_weights="gaussian", target_modules=LORA_TARGETS),
                         adapter_name=PREFERENCE_ADAPTER)
        reference_unet = None  # the same UNet with the adapter disabled
    else:
        reference_unet = copy.deepcopy(unet).requires_grad_(False).eval()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.adam_weight_decay)

    pairs = load_preferences(args.preferences)
    if len(pairs) == 0:
        raise ValueError(f"`--preferences` {args.preferences!r} holds no pair (every image's candidates tied when they "
                         "were built): rebuild them with more --num_candidates, another --strategy or split.")
    if "winner_states" in pairs.column_names:
        if takes_z and "winner_z" not in pairs.column_names:
            raise ValueError(f"{args.preferences} holds sampling states without the z each mask was sampled with, but "
                             "the reference's UNet takes z: rebuild the pairs with this reference.")
        logger.info("pairs with sampling states: each is denoised as it was sampled (its own states, timesteps and "
                    "z); --pair_latent does not apply")
    max_steps = config.max_train_steps or max(len(pairs) // config.train_batch_size, 1) * config.num_epochs
    # accelerate steps a prepared scheduler once per process per optimizer step.
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=0,
                                 num_training_steps=max_steps * accelerator.num_processes)
    ema = EMAModel(params, decay=config.ema_decay, use_ema_warmup=config.ema_warmup) if config.ema_decay > 0 else None
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_save_state_pre_hook(lambda models, weights, folder: save_ema(ema, folder))
        accelerator.register_load_state_pre_hook(lambda models, folder: load_ema(ema, folder))
    validation = None
    if args.num_validation_images:
        _, args.validation_split = default_splits(args.dataset_name, args.train_data_dir, None, args.validation_split)
        check_pairs_split(args)
        validation = load_from_args(args, args.validation_split, pipeline_prompt_style(reference),
                                    image_processor=model_image_processor(reference))
        check_prompts_for_model(reference, validation, opt_in=None)  # before training, not at the first validation

    first_step = 0
    checkpoint = resume_checkpoint(output_dir, args.resume_from_checkpoint)
    trained_on = {"preferences_sha256": pairs_fingerprint(pairs)}  # the pairs by content: a moved folder resumes
    if checkpoint:
        check_checkpoint_data(checkpoint, trained_on)  # a resume on other pairs is refused
        accelerator.load_state(str(checkpoint))
        first_step = checkpoint_step(checkpoint)
        logger.info(f"resumed from {checkpoint} at step {first_step}")
    if accelerator.is_main_process:
        accelerator.init_trackers("tdg-diffdpo", config=asdict(config))
    logger.info(f"{len(pairs)} pairs, {max_steps} steps of batch {config.train_batch_size} on "
                f"{accelerator.num_processes} process(es)")

    def reference_errors(inputs: dict) -> torch.Tensor:
        with torch.no_grad(), accelerator.autocast():
            if reference_unet is not None:
                return denoising_errors(reference_unet, inputs, noise_scheduler, config)
            model = accelerator.unwrap_model(unet)
            model.disable_adapters()
            try:
                return denoising_errors(model, inputs, noise_scheduler, config)
            finally:
                model.enable_adapters()

    @torch.no_grad()
    def implicit_accuracy(pairs_path: str, batch_size: int = 16) -> dict:
        """Deltas of the aligned model on held-out pairs at fixed timesteps, with seeded noise and augmentation."""
        held_out = load_preferences(pairs_path)
        model = accelerator.unwrap_model(unet).eval()
        deltas = {}
        for t in diagnostic_timesteps(noise_scheduler.config.num_train_timesteps):
            parts = []
            for start in range(0, len(held_out), batch_size):
                rows = list(range(start, min(start + batch_size, len(held_out))))
                generator = torch.Generator().manual_seed(args.seed * 1000 + start)
                batch = pair_batch(held_out, rows, model_image_processor(reference), generator)
                inputs = pair_inputs(batch, posterior, encode, noise_scheduler, generator, accelerator.device,
                                     timesteps=torch.full((len(rows),), t), prior=pair_prior)
                with accelerator.autocast():
                    policy = denoising_errors(model, inputs, noise_scheduler, config)
                ref = reference_errors(inputs)
                parts.append((policy[: len(rows)] - ref[: len(rows)]) - (policy[len(rows):] - ref[len(rows):]))
            deltas[t] = torch.cat(parts).float().cpu()
        return summarize_deltas(deltas, config.beta)

    def aligned_pipeline() -> AmbiSegPipeline:
        """The reference's components with the policy UNet (carrying the EMA weights while validating)."""
        pipe = AmbiSegPipeline(**{**reference.components, "unet": accelerator.unwrap_model(unet)},
                               autocast=reference.config.autocast, prompt_style=pipeline_prompt_style(reference))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def validate(step: int) -> dict:
        logger.info(f"validating {args.num_validation_images} images x {args.num_validation_samples} samples "
                    "(--num_validation_images 0 skips it)")
        if ema is not None:
            ema.store(params)
            ema.copy_to(params)
        try:
            with accelerator.autocast():
                metrics, grid = validation_report(aligned_pipeline(), validation, args.num_validation_images,
                                                  args.num_validation_samples, seed=args.seed)
        finally:
            if ema is not None:
                ema.restore(params)
        log_validation(accelerator, metrics, grid, step)
        grid.save(output_dir / f"validation-{step:06d}.png")
        logger.info("validation step %d: %s", step, {k: round(v, 4) for k, v in metrics.items()})
        return metrics

    progress = tqdm(range(first_step, max_steps), initial=first_step, total=max_steps,
                    disable=not accelerator.is_local_main_process, desc="dpo")
    ran, metrics, metrics_step, started = 0, {}, None, time.time()
    for step in range(first_step, max_steps):
        unet.train()
        generator = step_generator(args.seed, step, accelerator.process_index)
        rows = shard(batch_indices(len(pairs), config.train_batch_size, args.seed, step), accelerator.process_index,
                     accelerator.num_processes)
        batch = pair_batch(pairs, rows, model_image_processor(reference), generator)
        inputs = pair_inputs(batch, posterior, encode, noise_scheduler, generator, accelerator.device, prior=pair_prior)
        size = len(rows)
        with accelerator.accumulate(unet):
            policy = denoising_errors(unet, inputs, noise_scheduler, config)
            ref = reference_errors(inputs)
            loss, logs = diffusion_dpo_loss(policy[:size], policy[size:], ref[:size], ref[size:], beta=config.beta)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()

        if ema is not None:
            ema.step(params)
        done, ran = step + 1, ran + 1
        # the mean over the processes, not rank 0's share of the batch
        logs = {"loss": accelerator.reduce(loss.detach(), reduction="mean").item(), "lr": lr_scheduler.get_last_lr()[0],
                **{k: v.item() for k, v in logs.items()}}
        accelerator.log(logs, step=done)
        progress.update()
        progress.set_postfix(loss=f"{logs['loss']:.4f}", acc=f"{logs['implicit_accuracy']:.2f}",
                             s_per_step=f"{(time.time() - started) / ran:.2f}")
        if accelerator.is_main_process and done % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, output_dir, done, args.checkpoints_total_limit, data=trained_on)
        if validation is not None and args.validation_steps and done % args.validation_steps == 0:
            if accelerator.is_main_process:
                metrics, metrics_step = validate(done), done
            accelerator.wait_for_everyone()
        if args.stop_after_steps == ran:
            logger.info(f"stopping after {ran} steps (--stop_after_steps)")
            accelerator.end_training()
            return output_dir
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if validation is not None and metrics_step != max_steps:  # the card reports the final weights
            metrics = validate(max_steps)
        if ema is not None:
            ema.copy_to(params)
        if args.diagnostic_preferences:
            diagnostic = implicit_accuracy(args.diagnostic_preferences)
            (output_dir / "implicit_accuracy.json").write_text(json.dumps(diagnostic, indent=2))
            logger.info("implicit accuracy on %s by timestep: %s", args.diagnostic_preferences,
                        dict(zip(diagnostic["timesteps"], [round(a, 2) for a in diagnostic["implicit_accuracy"]])))
        base_model_id = save_aligned(aligned_pipeline(), args, config, output_dir)
        model_card(
            "tdg-diffdpo.md", repo_id, base_model=base_model_id, extra_tags=["tdg-diffdpo", "diffusion-dpo", "lora"],
            lidc=pipeline_prompt_style(reference) != FREE_TEXT, prompt_style=pipeline_prompt_style(reference),
            image_size=reference.unet.config.sample_size, image_shape=model_image_shape(reference),
            example_prompt=pairs[0]["prompt"] if len(pairs) else "", reference=args.reference,
            preferences=Path(args.preferences).name if os.path.isdir(args.preferences) else args.preferences, num_pairs=len(pairs), config_json=json.dumps(asdict(config), indent=2),
            metrics="```json\n" + json.dumps({k: round(v, 4) for k, v in metrics.items()}, indent=2) + "\n```" if metrics else
            "(no validation in this run: `--num_validation_images 0`)",
        ).save(output_dir / "README.md")
        if args.push_to_hub:
            push_adapter(output_dir, repo_id, args.hub_token)
    accelerator.end_training()
    return output_dir


def push_adapter(output_dir: Path, repo_id: str, token: str | None) -> None:
    """Uploads the output folder with `preference.json` naming the reference by Hub id only: the local paths it keeps
    for checkouts and further rounds mean nothing on the Hub (and tell of the trainer's folders)."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as staging:
        shutil.copytree(output_dir, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            "checkpoint-*", ".checkpoint-*", "logs", "snapshots"))
        info_file = Path(staging) / ADAPTER_FILE
        if info_file.is_file():
            info = json.loads(info_file.read_text())
            info_file.write_text(json.dumps({k: v for k, v in info.items() if k not in ("base_model_path", "init_adapter")},
                                            indent=2))
        push_folder_to_hub(staging, repo_id, token=token)


def check_adapter_base(adapter: str, reference: str) -> None:
    """Refuses an `--init_adapter` trained on another reference than `--reference` (its `preference.json`)."""
    if not adapter_base_matches(adapter, ADAPTER_FILE, reference):
        info = json.loads((Path(adapter) / ADAPTER_FILE).read_text())
        trained_on = info.get("base_model_path") or info.get("base_model")
        raise ValueError(f"`--init_adapter` {adapter!r} was trained on {trained_on!r} (its {ADAPTER_FILE}), not on "
                         f"`--reference` {reference!r}.")


def save_aligned(pipe: AmbiSegPipeline, args, config: DPOTrainingConfig, output_dir: Path) -> str | None:
    """LoRA: the adapter in diffusers' format and `preference.json` naming the reference (its Hub id, and its folder
    relative to the output for checkouts). Full fine-tune: the whole pipeline. Returns the reference's Hub id."""
    from huggingface_hub.utils import validate_repo_id

    base_model_id = args.base_model_id
    if base_model_id is None and not os.path.isdir(args.reference):
        validate_repo_id(args.reference)
        base_model_id = args.reference
    if config.lora_rank == 0:
        pipe.to("cpu").save_pretrained(output_dir)
        return base_model_id
    from peft.utils import get_peft_model_state_dict

    unet = pipe.unet
    AmbiSegPipeline.save_lora_weights(
        output_dir, unet_lora_layers=get_peft_model_state_dict(unet, adapter_name=PREFERENCE_ADAPTER),
        weight_name=LORA_WEIGHT_NAME, unet_lora_adapter_metadata=unet.peft_config[PREFERENCE_ADAPTER].to_dict(),
    )
    info = {"adapter_name": PREFERENCE_ADAPTER, "base_model": base_model_id}
    # Local folders relative to the output, for checkouts and further rounds (an upload drops them: push_adapter)
    if args.init_adapter:  # the round it went on from
        info["init_adapter"] = os.path.relpath(os.path.abspath(args.init_adapter), os.path.abspath(output_dir))
    if os.path.isdir(args.reference):
        info["base_model_path"] = os.path.relpath(os.path.abspath(args.reference), os.path.abspath(output_dir))
    (output_dir / ADAPTER_FILE).write_text(json.dumps(info, indent=2))
    return base_model_id


if __name__ == "__main__":
    main()
