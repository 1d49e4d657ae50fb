"""Pieces shared by the training scripts (pretraining and DPO): component loading, deterministic batches,
validation, checkpoint bookkeeping and model cards."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler,
)
from transformers import AutoModel, AutoTokenizer

from .configs import CONFIGS, AmbiSegTrainingConfig
from .image_processing import masks_to_model_range, normalize_image
from .lidc import augment, eval_prompts, load_lidc64
from .metrics import compute_metrics_batch
from .models import AmbiguityEncoder, AmbiSegUNet
from .text import resolve_text_encoder
from .visualization import sample_grid

SAMPLING_SCHEDULERS = {
    "ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}


# ----------------------------------------------------------------------------------------------- configuration
def add_config_arguments(parser: argparse.ArgumentParser, configs: dict = CONFIGS) -> None:
    """`--config NAME` plus one flag per config field (default: the named config's value)."""
    parser.add_argument("--config", default="cpu", choices=sorted(configs), help="training recipe (configs.py)")
    for f in fields(next(iter(configs.values()))):
        kind = type(f.default)
        if kind is bool:
            parser.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), default=None)
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=None)


def config_from_args(args: argparse.Namespace, configs: dict = CONFIGS):
    base = configs[args.config]
    return base.override(**{f.name: getattr(args, f.name) for f in fields(base)})


# ----------------------------------------------------------------------------------------------- components
def load_text_components(name_or_path: str):
    """Tokenizer and frozen (eval, no grad) text encoder."""
    path = resolve_text_encoder(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    text_encoder = AutoModel.from_pretrained(path).eval().requires_grad_(False)
    return tokenizer, text_encoder


def build_noise_scheduler(config: AmbiSegTrainingConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
        beta_start=config.beta_start, beta_end=config.beta_end, prediction_type=config.prediction_type,
        rescale_betas_zero_snr=config.rescale_betas_zero_snr, clip_sample=True,
    )


def build_sampling_scheduler(noise_scheduler, name: str = "ddim"):
    """A sampler on the training noise schedule, clipping to the mask range [-1, 1] where the scheduler can."""
    if name not in SAMPLING_SCHEDULERS:
        raise ValueError(f"`scheduler` must be one of {sorted(SAMPLING_SCHEDULERS)}, got {name!r}.")
    extra = {"thresholding": True, "sample_max_value": 1.0} if name in ("dpm", "unipc") else {"clip_sample": True}
    if name == "euler":
        extra = {}  # no clipping option; the pipeline clamps x0-predictions itself
    if name == "ddim":
        extra["timestep_spacing"] = "trailing"  # starts at t = T - 1, where the training noise is
    return SAMPLING_SCHEDULERS[name].from_config(noise_scheduler.config, **extra)


def build_models(config: AmbiSegTrainingConfig, text_embed_dim: int):
    """Fresh UNet, prior and posterior (the latter two None when `latent_dim == 0`)."""
    unet = AmbiSegUNet.from_preset(
        config.unet_preset, sample_size=config.resolution, text_embed_dim=text_embed_dim, latent_dim=config.latent_dim
    )
    if config.latent_dim == 0:
        return unet, None, None
    prior = AmbiguityEncoder(in_channels=1, latent_dim=config.latent_dim, text_embed_dim=text_embed_dim)
    posterior = AmbiguityEncoder(in_channels=2, latent_dim=config.latent_dim, text_embed_dim=text_embed_dim)
    return unet, prior, posterior


# ----------------------------------------------------------------------------------------------- data
def load_training_dataset(name: str, split: str, data_dir: str | None):
    """`lidc64` (the shared crops) or a folder written by `Dataset.save_to_disk` (e.g. by prepare_lidc.py)."""
    if name == "lidc64":
        return load_lidc64(split, data_dir)
    from datasets import load_from_disk

    dataset = load_from_disk(name)
    return dataset[split] if hasattr(dataset, "keys") else dataset


def step_generator(seed: int, step: int, process_index: int = 0) -> torch.Generator:
    """Every random choice of one training step comes from (seed, step, process): a resumed run repeats it exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + process_index)


def batch_indices(num_rows: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Rows of step `step`: epochs are seeded permutations, so the data order depends only on (seed, step)."""
    per_epoch = max(num_rows // batch_size, 1)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + 7919 * epoch))
    return order[position * batch_size : (position + 1) * batch_size].tolist()


def training_batch(dataset, indices: list[int], config: AmbiSegTrainingConfig, generator: torch.Generator) -> dict:
    """Augmented, normalised batch with one random rater per image and that rater's prompt (or "" on dropout).

    Returns pixel_values `(B, 1, R, R)` in [-1, 1], mask_values `(B, 1, R, R)` in {-1, 1}, prompts (list of str).
    """
    rows = dataset[indices]
    images, masks, prompts = [], [], []
    for i in range(len(indices)):
        image = torch.as_tensor(np.asarray(rows["image"][i]), dtype=torch.float32)[None]
        raters = torch.as_tensor(np.asarray(rows["masks"][i]), dtype=torch.float32)
        image, raters = augment(image, raters, generator)
        if image.shape[-1] != config.resolution:
            image = torch.nn.functional.interpolate(image[None], size=config.resolution, mode="bilinear")[0]
            raters = torch.nn.functional.interpolate(raters[None], size=config.resolution, mode="nearest")[0]
        rater = int(torch.randint(0, raters.shape[0], (1,), generator=generator))
        images.append(image)
        masks.append(raters[rater : rater + 1])
        drop = float(torch.rand(1, generator=generator)) < config.prompt_dropout
        prompt = rows["prompts"][i][rater] if "prompts" in rows else ""
        prompts.append("" if drop or not config.use_text else prompt)
    return {
        "pixel_values": normalize_image(torch.stack(images), config.image_clip),
        "mask_values": masks_to_model_range(torch.stack(masks)),
        "prompts": prompts,
    }


# ----------------------------------------------------------------------------------------------- evaluation
def sample_rows(
    pipeline, rows: dict, indices: list[int], num_samples: int = 16, prompts: str = "annotator", seed: int = 0,
    num_inference_steps: int | None = None, deterministic: bool = False, **call_kwargs,
) -> np.ndarray:
    """Samples for a dict-of-lists chunk of dataset `rows` (at dataset positions `indices`): `(B, N, H, W)` bool.

    Image `i` always uses a generator seeded `seed + i`, so its samples do not depend on batching or resuming.
    `deterministic`: the baseline of one sample at the prior mean, repeated `num_samples` times.
    """
    count = len(rows["image"])
    examples = [{k: rows[k][i] for k in rows} for i in range(count)]
    prompt_lists = [eval_prompts(e, prompts) if "prompts" in e else [""] for e in examples]
    out = pipeline(
        np.stack([np.asarray(e["image"], np.float32) for e in examples]), prompt_lists,
        num_samples=1 if deterministic else num_samples, num_inference_steps=num_inference_steps,
        generator=[torch.Generator().manual_seed(seed + i) for i in indices],
        **({"prior_temperature": 0.0} if deterministic else {}), **call_kwargs,
    )
    return np.repeat(out.masks, num_samples, axis=1) if deterministic else out.masks


def evaluate_pipeline(
    pipeline, dataset, num_samples: int = 16, num_inference_steps: int | None = None, prompts: str = "annotator",
    seed: int = 0, images_per_call: int = 4, max_images: int | None = None, **call_kwargs,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Samples `num_samples` masks for each row (see `sample_rows`) and scores them against all the rater masks.

    Returns per-image metrics `{name: (B,)}` and the samples `(B, N, H, W)` bool.
    """
    total = len(dataset) if max_images is None else min(max_images, len(dataset))
    per_image: dict[str, list] = {}
    all_samples = []
    for start in range(0, total, images_per_call):
        indices = list(range(start, min(start + images_per_call, total)))
        rows = dataset[indices]
        masks = sample_rows(pipeline, rows, indices, num_samples, prompts, seed, num_inference_steps, **call_kwargs)
        annotations = np.stack([np.asarray(m) for m in rows["masks"]]).astype(bool)
        for key, values in compute_metrics_batch(masks, annotations).items():
            per_image.setdefault(key, []).extend(values.tolist())
        all_samples.append(masks)
    return {k: np.asarray(v) for k, v in per_image.items()}, np.concatenate(all_samples)


def validation_report(pipeline, dataset, num_images: int, num_samples: int = 16, seed: int = 0, **kwargs):
    """Metrics summary (means) and a sample grid for the first `num_images` rows: what training logs."""
    per_image, samples = evaluate_pipeline(pipeline, dataset, num_samples, max_images=num_images, seed=seed, **kwargs)
    subset = dataset[: len(samples)]
    grid = sample_grid(np.asarray(subset["image"])[:4], np.asarray(subset["masks"])[:4], samples[:4])
    means = {k: float(v.mean()) for k, v in per_image.items()}
    means["sample_foreground"] = float(samples.mean())
    means["rater_foreground"] = float(np.asarray(subset["masks"]).mean())
    return means, grid


def log_validation(accelerator, metrics: dict, grid, step: int) -> None:
    accelerator.log({f"validation/{k}": v for k, v in metrics.items()}, step=step)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation/samples", np.asarray(grid), step, dataformats="HWC")


# ----------------------------------------------------------------------------------------------- checkpoints
def resume_path(output_dir: str, resume_from_checkpoint: str | None) -> str | None:
    """`latest` -> the newest `checkpoint-N` folder in `output_dir` (None when there is none), else the path."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint != "latest":
        return resume_from_checkpoint
    checkpoints = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return str(checkpoints[-1]) if checkpoints else None


def checkpoint_step(path: str) -> int:
    match = re.search(r"checkpoint-(\d+)$", str(path).rstrip("/"))
    if not match:
        raise ValueError(f"`--resume_from_checkpoint` must name a checkpoint-<step> folder, got {path!r}.")
    return int(match.group(1))


def prune_checkpoints(output_dir: str, total_limit: int | None) -> None:
    """Keep at most `total_limit - 1` old checkpoints, so that the one about to be saved makes `total_limit`."""
    if not total_limit:
        return
    checkpoints = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in checkpoints[: max(len(checkpoints) - total_limit + 1, 0)]:
        shutil.rmtree(old)


# ----------------------------------------------------------------------------------------------- model cards
MODEL_CARDS_DIR = Path(__file__).resolve().parents[2] / "model_cards"


def write_model_card(output_dir: str, template: str, values: dict) -> Path:
    """Fills `model_cards/<template>` (`{name}` placeholders) and writes `output_dir/README.md`."""
    template_path = Path(template) if Path(template).is_file() else MODEL_CARDS_DIR / template
    if not template_path.is_file():
        raise FileNotFoundError(f"model card template {template!r} not found (looked in {MODEL_CARDS_DIR})")
    text = template_path.read_text().format(**values)
    path = Path(output_dir) / "README.md"
    path.write_text(text)
    return path


def config_json(config) -> str:
    return json.dumps(asdict(config), indent=2)


# ----------------------------------------------------------------------------------------------- run plumbing
def add_run_arguments(parser: argparse.ArgumentParser, validation_steps: int, checkpointing_steps: int) -> None:
    """The flags every training script shares: output, seed, precision, checkpoints, validation, tracking, Hub."""
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--checkpointing_steps", type=int, default=checkpointing_steps)
    parser.add_argument("--checkpoints_total_limit", type=int, default=2)
    parser.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint-N folder or 'latest'")
    parser.add_argument("--dataset", default="lidc64", help="'lidc64' or a folder saved with Dataset.save_to_disk")
    parser.add_argument("--data_dir", default=None, help="folder holding lidc64/ (default: $AMBISEG_DATA_DIR, ../shared/data)")
    parser.add_argument("--validation_split", default="mini")
    parser.add_argument("--validation_steps", type=int, default=validation_steps, help="0 = only at the end")
    parser.add_argument("--num_validation_images", type=int, default=8)
    parser.add_argument("--num_validation_samples", type=int, default=16)
    parser.add_argument("--report_to", default="tensorboard")
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id", default=None)
    parser.add_argument("--stop_after_steps", type=int, default=None,
                        help="exit without saving once this many steps ran in this process (simulates a kill; tests)")


def start_run(args: argparse.Namespace, config, config_file: str):
    """The Accelerator (DDP, mixed precision, trackers' folder), logging, the seed, and the recipe saved beside
    the run."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.report_to != "none" else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    import logging

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / config_file).write_text(config_json(config))
    return accelerator


def save_checkpoint(accelerator, args: argparse.Namespace, step: int) -> None:
    prune_checkpoints(args.output_dir, args.checkpoints_total_limit)
    accelerator.save_state(str(Path(args.output_dir) / f"checkpoint-{step}"))


def push_run(args: argparse.Namespace) -> None:
    """Uploads the finished run folder (pipeline or adapter, model card; no checkpoints or logs) to the Hub."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(args.hub_model_id or Path(args.output_dir).name, exist_ok=True).repo_id
    upload_folder(repo_id=repo_id, folder_path=args.output_dir, ignore_patterns=["checkpoint-*", "logs/*"])


def optimizer_step(accelerator, loss, params, optimizer, lr_scheduler, max_grad_norm: float) -> None:
    """Backward, clip (when gradients sync), step the optimizer and the lr schedule, clear gradients."""
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad()
