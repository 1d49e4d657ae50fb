"""Pure helpers of the training scripts (`training/train_ambiseg.py`, `training/train_dpo.py`): flag parsing, component
building, deterministic batches, crash-safe checkpoints and the EMA in safetensors. Each script keeps its own
arguments, loop, validation and saving."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer

from .configs import AmbiSegTrainingConfig
from .image_processing import masks_to_model_range
from .image_processor import AmbiSegImageProcessor
from .lidc import augment, feret_diameter
from .models import AmbiguityEncoder, AmbiSegUNet
from .models.ambiguity_encoder import AMBIGUITY_DESIGNS
from .text import resolve_text_encoder
from .text_control import counterfactual_pair, ratings_of, training_prompt

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_FILE = "checkpoint_complete.json"  # written last: a checkpoint folder without it is incomplete


# ----------------------------------------------------------------------------------------------- flags
# The UNet layers a LoRA adapts (TDG-DiffDPO, consistency distillation): attention projections and ResNet convolutions.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj"]


def str2bool(value: str) -> bool:
    """argparse type for boolean flags: only true/false spellings, anything else is an error (not False)."""
    lowered = str(value).strip().lower()
    if lowered in ("true", "1", "yes", "y", "on"):
        return True
    if lowered in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def recipe_from_args(args: argparse.Namespace, recipes: dict):
    """The named recipe (`--config`) with every recipe flag the user passed (not None) applied on top."""
    base = recipes[args.config]
    return base.override(**{name: getattr(args, name) for name in base.__dataclass_fields__ if hasattr(args, name)})


# ----------------------------------------------------------------------------------------------- components
def load_text_components(name_or_path: str):
    """Tokenizer and frozen (eval, no grad) text encoder."""
    path = resolve_text_encoder(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # float32 whatever the stored dtype (pipelines store it in half precision to stay small)
    text_encoder = AutoModel.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
    return tokenizer, text_encoder


def build_noise_scheduler(config: AmbiSegTrainingConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
        beta_start=config.beta_start, beta_end=config.beta_end, prediction_type=config.prediction_type,
        rescale_betas_zero_snr=config.rescale_betas_zero_snr, clip_sample=True,
    )


def ambiguity_design(config: AmbiSegTrainingConfig) -> str:
    """The recipe's ambiguity design (one of `AMBIGUITY_DESIGNS`); `latent_dim == 0` means "none" whatever it says."""
    if config.ambiguity not in AMBIGUITY_DESIGNS:
        raise ValueError(f"`ambiguity` must be one of {AMBIGUITY_DESIGNS}, got {config.ambiguity!r}.")
    return "none" if config.latent_dim == 0 else config.ambiguity


def unet_latent_dim(config: AmbiSegTrainingConfig) -> int:
    """Width of the z the UNet takes: only the "latent" design feeds z to the denoiser."""
    return config.latent_dim if ambiguity_design(config) == "latent" else 0


def build_models(config: AmbiSegTrainingConfig, text_embed_dim: int, image_channels: int = 1):
    """Fresh UNet, prior and posterior (the latter two None for ambiguity "none") for images of `image_channels`
    channels. The "latent" prior reads the image, the "prediction_kl" prior the image and the denoiser's predicted
    mask; the posterior the image and the rater mask."""
    design = ambiguity_design(config)
    unet = AmbiSegUNet.from_preset(
        config.unet_preset, sample_size=config.resolution, text_embed_dim=text_embed_dim,
        latent_dim=unet_latent_dim(config), image_channels=image_channels,
    )
    if design == "none":
        return unet, None, None
    encoder = dict(latent_dim=config.latent_dim, text_embed_dim=text_embed_dim, text_pooling=config.text_pooling)
    prior = AmbiguityEncoder(in_channels=image_channels + (design != "latent"), **encoder)
    posterior = AmbiguityEncoder(in_channels=image_channels + 1, **encoder)
    if design == "prediction_kl":
        # The zero-initialised heads make q = p for every input, where the KL and its gradient vanish: a saddle no
        # other loss term pulls the two networks off. A random head starts them apart.
        prior.head[-1].reset_parameters()
        posterior.head[-1].reset_parameters()
    if config.freeze_ambiguity_encoders:
        if design != "prediction_kl":
            raise ValueError("`freeze_ambiguity_encoders` applies to ambiguity 'prediction_kl' only.")
        prior.requires_grad_(False)
        posterior.requires_grad_(False)
    return unet, prior, posterior


def warm_start(name_or_path: str, config: AmbiSegTrainingConfig, image_channels: int = 1):
    """The UNet, prior and posterior of a saved pipeline, to continue training from (`--init_from`). Their
    architecture is the saved one; it must match the recipe's ambiguity design and the data's `image_channels`."""
    from .pipelines import AmbiSegPipeline

    pipe = AmbiSegPipeline.from_pretrained(name_or_path)
    design = ambiguity_design(config)
    prior = pipe.prior if design != "none" else None
    saved = dict(image_channels=pipe.unet.image_channels, unet_latent_dim=pipe.unet.latent_dim,
                 prior_channels=prior and prior.config.in_channels,
                 latent_dim=prior and prior.config.latent_dim, text_pooling=prior and prior.config.text_pooling)
    wanted = dict(image_channels=image_channels, unet_latent_dim=unet_latent_dim(config),
                  prior_channels=None if design == "none" else image_channels + (design != "latent"),
                  latent_dim=config.latent_dim if design != "none" else None,
                  text_pooling=config.text_pooling if design != "none" else None)
    if saved != wanted:
        raise ValueError(f"`--init_from` {name_or_path!r} holds {saved}; the recipe (ambiguity {design!r}) needs "
                         f"{wanted}: pass the saved run's --ambiguity, --latent_dim and --text_pooling (and data with "
                         "its number of image channels).")
    if config.freeze_ambiguity_encoders:
        pipe.prior.requires_grad_(False)
        pipe.posterior.requires_grad_(False)
    return pipe.unet.train(), pipe.prior, pipe.posterior


# ----------------------------------------------------------------------------------------------- data
def step_generator(seed: int, step: int, process_index: int = 0) -> torch.Generator:
    """Every random choice of one training step comes from (seed, step, process): a resumed run repeats it exactly."""
    state = int(np.random.default_rng([seed, step, process_index]).integers(2**63 - 1))
    return torch.Generator().manual_seed(state)


def batch_indices(num_rows: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Rows of step `step`: epochs are seeded permutations, so the data order depends only on (seed, step)."""
    per_epoch = max(num_rows // batch_size, 1)
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_rows)
    return order[position * batch_size : (position + 1) * batch_size].tolist()


def shard(rows: list[int], process_index: int, num_processes: int) -> list[int]:
    """This process's equal share of a global batch (the global batch must divide evenly)."""
    if len(rows) % num_processes:
        raise ValueError(f"a batch of {len(rows)} rows does not split over {num_processes} processes; make "
                         "`--train_batch_size` a multiple of the number of processes.")
    per_process = len(rows) // num_processes
    return rows[process_index * per_process : (process_index + 1) * per_process]


def training_image_processor(config, image_channels: int = 1) -> AmbiSegImageProcessor:
    """The image processor of a training recipe (its `resolution` and `image_clip`): what `training_batch` resizes
    and normalises with, saved with the trained pipeline so that its calls do the same."""
    return AmbiSegImageProcessor(size=config.resolution, image_channels=image_channels, image_clip=config.image_clip)


def training_batch(dataset, indices: list[int], config: AmbiSegTrainingConfig, generator: torch.Generator,
                   image_processor: AmbiSegImageProcessor | None = None) -> dict:
    """Augmented, normalised batch with one random rater per image and that rater's prompt (or "" on dropout).

    `dataset` holds the rows of `data.load_multirater` (each row's rater count its own). Images and masks of another
    size are resized by `image_processor` (default: `training_image_processor(config)`), the images normalised by it.
    Returns pixel_values `(B, C, R, R)` in [-1, 1], mask_values `(B, 1, R, R)` in {-1, 1}, prompts (list of str).
    """
    processor = image_processor or training_image_processor(config)
    rows = dataset[indices]
    images, masks, prompts = [], [], []
    for i in range(len(indices)):
        image = torch.as_tensor(np.asarray(rows["image"][i]), dtype=torch.float32)
        image = image[None] if image.ndim == 2 else image
        raters = torch.as_tensor(np.asarray(rows["masks"][i]), dtype=torch.float32)
        image, raters = augment(image, raters, generator)
        image, raters = processor.resize(image[None])[0], processor.resize_masks(raters[None])[0]
        rater = int(torch.randint(0, raters.shape[0], (1,), generator=generator))
        mask, prompt = raters[rater : rater + 1], rows["prompts"][i][rater]
        # (the Probabilistic U-Net's recipe has no prompts to restate)
        if getattr(config, "prompt_style", None) == "slice" and rows["annotator_valid"][i][rater]:
            # stored size / training size: the pixel spacing of the resized crop
            spacing = float(rows["pixel_spacing_mm"][i]) * np.asarray(rows["image"][i]).shape[-1] / config.resolution
            mask, prompt = restated_pair(mask, rows["ratings"][i][rater], spacing, config, generator)
        images.append(image)
        masks.append(mask)
        drop = float(torch.rand(1, generator=generator)) < config.prompt_dropout
        prompts.append("" if drop or not config.use_text else prompt)
    return {
        "pixel_values": processor.normalize(torch.stack(images)),
        "mask_values": masks_to_model_range(torch.stack(masks)),
        "prompts": prompts,
    }


def restated_pair(mask: torch.Tensor, ratings, pixel_spacing_mm: float, config: AmbiSegTrainingConfig,
                  generator: torch.Generator) -> tuple[torch.Tensor, str]:
    """A rater's mask `(1, R, R)` {0, 1} and its prompt in style "slice", stating the mask's diameter on this slice:
    with probability `config.counterfactual_rate` the mask is first edited (text_control.counterfactual_pair), and
    with probability `config.plain_prompt_rate` the prompt is a plain sentence. Every draw comes from `generator`."""
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    binary, ratings = mask[0].numpy() > 0.5, ratings_of(ratings)
    if binary.any() and rng.uniform() < config.counterfactual_rate:
        binary, ratings, diameter = counterfactual_pair(binary, ratings, pixel_spacing_mm, rng,
                                                        config.counterfactual_shape_rate)
        mask = torch.from_numpy(binary[None].astype(np.float32))
    else:
        diameter = feret_diameter(binary, pixel_spacing_mm)
    return mask, training_prompt(ratings, diameter, rng, config.plain_prompt_rate)


class StepBatches(torch.utils.data.Dataset):
    """Item `i` is this process's batch of micro-step `first_micro_step + i`, built from (seed, micro-step, process)
    alone (`batch_indices`, `shard`, `training_batch` with the step's generator), so `DataLoader` workers can augment
    the next batches while the model trains and a resumed run sees exactly the data an uninterrupted one saw. Each
    batch carries `generator_state`: the step generator's state after the batch was drawn, from which the loss goes on
    drawing its noise (`generator_of`)."""

    def __init__(self, dataset, config, seed: int, process_index: int, num_processes: int, first_micro_step: int,
                 num_micro_steps: int):
        self.dataset, self.config, self.seed = dataset, config, seed
        self.process_index, self.num_processes = process_index, num_processes
        self.first_micro_step, self.num_micro_steps = first_micro_step, num_micro_steps

    def __len__(self) -> int:
        return self.num_micro_steps

    def __getitem__(self, index: int) -> dict:
        micro_step = self.first_micro_step + index
        generator = step_generator(self.seed, micro_step, self.process_index)
        rows = shard(batch_indices(len(self.dataset), self.config.train_batch_size, self.seed, micro_step),
                     self.process_index, self.num_processes)
        batch = training_batch(self.dataset, rows, self.config, generator)
        batch["generator_state"] = generator.get_state()
        return batch


def step_batches(dataset, config, seed: int, accelerator, first_micro_step: int, num_micro_steps: int,
                 num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A `DataLoader` over `StepBatches` in micro-step order, `num_workers` processes preparing batches ahead.

    Not passed through `accelerator.prepare`: its batches are already this process's share of each global batch,
    and accelerate's sharding would split them again across the processes."""
    batches = StepBatches(dataset, config, seed, accelerator.process_index, accelerator.num_processes,
                          first_micro_step, num_micro_steps)
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, num_workers=num_workers,
                                       persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None)


def generator_of(batch: dict) -> torch.Generator:
    """The step generator of a `StepBatches` batch, where the batch left it (popped from the batch)."""
    generator = torch.Generator()
    generator.set_state(batch.pop("generator_state"))
    return generator


# ----------------------------------------------------------------------------------------------- checkpoints
def checkpoint_step(path: str | os.PathLike) -> int:
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if not match:
        raise ValueError(f"`--resume_from_checkpoint` must name a checkpoint-<step> folder or 'latest', got {str(path)!r}.")
    return int(match.group(1))


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE_FILE).is_file()


def _checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(folders, key=checkpoint_step)


def resume_checkpoint(output_dir: str | os.PathLike, resume_from_checkpoint: str | None) -> Path | None:
    """`latest` -> the newest *complete* `checkpoint-N` in `output_dir` (None when there is none; newer incomplete
    ones are reported and skipped); a path -> that checkpoint, which must exist and be complete."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint != "latest":
        path = Path(resume_from_checkpoint)
        checkpoint_step(path)
        if not path.is_dir():
            raise FileNotFoundError(f"`--resume_from_checkpoint` {str(path)!r} does not exist.")
        if not is_complete(path):
            raise ValueError(f"`--resume_from_checkpoint` {str(path)!r} is incomplete (no {COMPLETE_FILE}: the run "
                             "stopped while writing it); pass 'latest' to take the newest complete one.")
        return path
    for path in reversed(_checkpoints(output_dir)):
        if is_complete(path):
            return path
        logger.warning(f"skipping {path}: incomplete checkpoint (no {COMPLETE_FILE}; the run stopped while writing it)")
    return None


def save_checkpoint(
    accelerator, output_dir: str | os.PathLike, step: int, total_limit: int | None, train_seconds: float = 0.0,
    data: dict | None = None,
) -> Path:
    """`accelerator.save_state` into a temporary folder, marked complete and renamed `checkpoint-<step>` only once
    everything is written; only after that are incomplete checkpoints and the oldest beyond `total_limit` removed.
    `train_seconds` (the training time so far, for `--max_train_minutes`) and `data` (what the run trains on,
    `run_records.data_arguments`; a resume compares it) are recorded in the completion file."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f".checkpoint-{step}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    accelerator.save_state(str(partial))
    record = {"step": step, "train_seconds": train_seconds, **({} if data is None else {"data": data})}
    (partial / COMPLETE_FILE).write_text(json.dumps(record, default=str))
    if final.exists():  # an incomplete leftover of the same step
        shutil.rmtree(final)
    os.replace(partial, final)
    # Only now that a complete checkpoint exists: drop incomplete leftovers and what exceeds the limit.
    complete = [p for p in _checkpoints(output_dir) if is_complete(p) and p != final]
    stale = [p for p in _checkpoints(output_dir) if not is_complete(p)]
    if total_limit:
        stale += [p for p in complete if checkpoint_step(p) < step][: max(len(complete) - (total_limit - 1), 0)]
    for path in stale:
        logger.info(f"removing {path}")
        shutil.rmtree(path)
    return final


def checkpoint_train_seconds(checkpoint: str | os.PathLike) -> float:
    """The training time recorded in a complete checkpoint (0 for checkpoints written before it was recorded)."""
    return float(json.loads((Path(checkpoint) / COMPLETE_FILE).read_text()).get("train_seconds", 0.0))


def check_checkpoint_data(checkpoint: str | os.PathLike, data: dict | None) -> None:
    """Raises a ValueError naming what differs when `checkpoint` was trained on other data than `data` (its
    completion file's record; checkpoints written before data was recorded are not checked)."""
    stored = json.loads((Path(checkpoint) / COMPLETE_FILE).read_text()).get("data")
    if stored is None or data is None:
        return
    data = json.loads(json.dumps(data, default=str))
    changed = sorted(k for k in set(stored) | set(data) if stored.get(k) != data.get(k))
    if changed:
        details = "; ".join(f"{k}: {stored.get(k)!r} -> {data.get(k)!r}" for k in changed)
        raise ValueError(f"`--resume_from_checkpoint` {str(checkpoint)!r} was trained on other data ({details}): "
                         "resume with the data flags it was trained with, or train into another --output_dir.")


def resume_training(accelerator, output_dir: str | os.PathLike, resume_from_checkpoint: str | None,
                    data: dict | None = None) -> tuple[int, float]:
    """Loads the checkpoint `resume_from_checkpoint` names (see `resume_checkpoint`) into `accelerator`: returns the
    step to continue from and the training seconds spent so far, `(0, 0.0)` when there is nothing to resume. A
    checkpoint trained on other `data` than this run's is refused (`check_checkpoint_data`)."""
    checkpoint = resume_checkpoint(output_dir, resume_from_checkpoint)
    if checkpoint is None:
        return 0, 0.0
    check_checkpoint_data(checkpoint, data)
    accelerator.load_state(str(checkpoint))
    step, seconds = checkpoint_step(checkpoint), checkpoint_train_seconds(checkpoint)
    logger.info(f"resumed from {checkpoint} at step {step} ({seconds / 60:.1f} min of training)")
    return step, seconds


class TrainingClock:
    """Training time (the steps only: validation and saving are not counted), carried across resumes through the
    checkpoints, for a wall-clock budget (`--max_train_minutes`) and timed pipeline snapshots (`--snapshot_minutes`)
    from which a checkpoint is chosen on the selection split afterwards."""

    def __init__(self, max_minutes: float | None = None, snapshot_minutes: float | None = None, seconds: float = 0.0):
        for name, value in (("--max_train_minutes", max_minutes), ("--snapshot_minutes", snapshot_minutes)):
            if value is not None and value <= 0:
                raise ValueError(f"`{name}` must be > 0, got {value}.")
        self.max_minutes, self.snapshot_minutes, self.seconds = max_minutes, snapshot_minutes, seconds
        self.bar = None

    def progress_bar(self, first_step: int, max_steps: int, disable: bool = False):
        """The run's bar, advanced by `add`: over the steps, or on a budget over its minutes (a budget run passes a
        step cap far beyond what it reaches, whose ETA would be thousands of hours)."""
        from tqdm.auto import tqdm

        if self.max_minutes is None:
            self.bar = tqdm(total=max_steps, initial=first_step, desc="train", unit="step", disable=disable)
        else:
            self.bar = tqdm(total=self.max_minutes, initial=round(self.seconds / 60, 2), desc="train", unit="min",
                            disable=disable, bar_format="{l_bar}{bar}| {n:.1f}/{total:g} min [{elapsed}<{remaining}{postfix}]")
        return self.bar

    def add(self, seconds: float) -> bool:
        """Counts one step's time (and advances the progress bar); True when it crossed a multiple of
        `snapshot_minutes` (time for a snapshot)."""
        if self.bar is not None:
            self.bar.update(1 if self.max_minutes is None else min(seconds / 60, self.max_minutes - self.bar.n))
        before, self.seconds = self.seconds, self.seconds + seconds
        if not self.snapshot_minutes:
            return False
        period = 60.0 * self.snapshot_minutes
        return int(before // period) != int(self.seconds // period)

    @property
    def expired(self) -> bool:
        return self.max_minutes is not None and self.seconds >= 60.0 * self.max_minutes

    def expired_everywhere(self, accelerator) -> bool:
        """`expired`, decided once for every process: each rank times its own steps, and one that stopped a step
        before the others would leave them waiting in the gradient all-reduce forever. The main process decides."""
        if self.max_minutes is None:
            return False
        from accelerate.utils import broadcast

        flag = torch.tensor([float(self.expired)], device=accelerator.device)
        return bool(broadcast(flag, from_process=0).item())


def save_ema(ema, folder: str | os.PathLike, name: str = "ema") -> None:
    """An `EMAModel`'s state as safetensors (shadow weights) + JSON (decay and step counters): nothing pickled."""
    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    save_file({f"{i}": p.detach().contiguous().clone() for i, p in enumerate(shadow)}, str(Path(folder) / f"{name}.safetensors"))
    (Path(folder) / f"{name}.json").write_text(json.dumps(state, indent=2))


def load_ema(ema, folder: str | os.PathLike, name: str = "ema") -> None:
    """Restores what `save_ema` wrote, on the device of the EMA's current shadow weights."""
    state = json.loads((Path(folder) / f"{name}.json").read_text())
    tensors = load_file(str(Path(folder) / f"{name}.safetensors"))
    device = ema.shadow_params[0].device if ema.shadow_params else "cpu"
    state["shadow_params"] = [tensors[f"{i}"].to(device) for i in range(len(tensors))]
    ema.load_state_dict(state)


def log_validation(accelerator, metrics: dict, grid, step: int) -> None:
    accelerator.log({f"validation/{k}": v for k, v in metrics.items()}, step=step)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation/samples", np.asarray(grid), step, dataformats="HWC")


def adapter_base_matches(folder: str | os.PathLike, info_file: str, base: str) -> bool:
    """Whether the adapter folder `folder` (its `info_file`: preference.json or consistency.json) was trained on the
    pipeline `base` (a folder, compared as a file, or a Hub id / path compared by name)."""
    info = json.loads((Path(folder) / info_file).read_text())
    local = os.path.join(folder, info["base_model_path"]) if info.get("base_model_path") else None
    if local is not None and os.path.isdir(local) and os.path.isdir(base):
        return os.path.samefile(local, base)
    named = [n for n in (info.get("base_model"), info.get("config", {}).get("teacher")) if n]
    return os.path.normpath(base) in {os.path.normpath(n) for n in named}


def load_trainable_adapter(pipe, folder: str | os.PathLike, adapter_name: str, rank: int) -> None:
    """`--init_adapter`: the LoRA of a saved adapter folder onto `pipe.unet` under `adapter_name`, its weights the only
    trainable ones; an adapter of another rank than the recipe's `rank` is refused."""
    from .pipelines.pipeline_ambiseg import LORA_WEIGHT_NAME

    pipe.load_lora_weights(folder, weight_name=LORA_WEIGHT_NAME, adapter_name=adapter_name)
    loaded = pipe.unet.peft_config[adapter_name].r
    if loaded != rank:
        raise ValueError(f"`--init_adapter` {str(folder)!r} has LoRA rank {loaded}, the recipe {rank}: pass "
                         f"`--lora_rank {loaded}`.")
    for name, parameter in pipe.unet.named_parameters():
        parameter.requires_grad_("lora_" in name)
