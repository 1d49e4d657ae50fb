#!/usr/bin/env python
"""Consistency distillation of an AmbiSeg pipeline into a one- or two-call sampler: a LoRA on the UNet and an
`LCMScheduler`, in the shape of diffusers' `examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py`
(LCM-LoRA, Luo et al. 2023; consistency distillation, Song et al. 2023).

    accelerate launch training/train_consistency.py --teacher checkpoints/ambiseg-lidc64 --output_dir runs/lcm \\
        --max_train_steps 2000

Loaded in one line, `AmbiSegPipeline.from_pretrained("runs/lcm")` (the teacher named in `consistency.json`, the
adapter, the scheduler, the default number of calls; so `evaluate.py` and `sweep_samplers.py` take the folder too),
or the LCM-LoRA way:

    pipe = AmbiSegPipeline.from_pretrained("checkpoints/ambiseg-lidc64")
    pipe.load_lora_weights("runs/lcm", weight_name="pytorch_lora_weights.safetensors", adapter_name="consistency")
    pipe.scheduler = LCMScheduler.from_pretrained("runs/lcm", subfolder="scheduler")
    masks = pipe(image, prompt, num_samples=16, num_inference_steps=2).masks

Each step: a rater mask x0 is noised to x_t at a timestep t of the `--num_ddim_timesteps` DDIM schedule; the teacher
(the UNet with the adapter disabled) takes one deterministic DDIM step to x_{t-k} (k = 1000 / num_ddim_timesteps);
the student (the UNet with the adapter) is trained so that f(x_t, t) matches f(x_{t-k}, t-k) evaluated by itself
without gradient, where f(x, t) = c_skip(t) x + c_out(t) x0(x, t) with LCMScheduler's boundary scalings: a sample is
then the end of its teacher trajectory in one call. As in diffusers' LCM-LoRA script the student is its own target by
default; `--target_ema_decay` computes the target with an EMA of the adapter instead (the target network of
consistency models and full LCM), `--ema_decay` saves an EMA of it. On the committed teacher neither kept the run
stable: the 2-call sampler's GED on the selection split swings by 0.1 or more between snapshots a few hundred steps
apart, with or without the EMAs, so a snapshot is chosen on the selection split (`--snapshot_minutes`;
docs/results.md).

Trajectory distillation (`--trajectories`, Luhman & Luhman 2021) trains the same student, f(x_t, t) with the same
scalings, LoRA and scheduler, on recorded teacher trajectories instead (scripts/record_trajectories.py): from a
recorded state x_t of a DDIM-K trajectory (the pure noise it starts from for a `--top_state_fraction` of the rows, a
later state for the others), f must reach the mask that trajectory ends at, by plain regression (`--loss_type l2`).
No target network and no bootstrapping: the targets are fixed, which is what the consistency runs above lacked; the
price is recording the trajectories first (about 5 s per image of 16 rows for DDIM-20 on the two CPU cores).

    python scripts/record_trajectories.py --teacher checkpoints/ambiseg-lidc64 --split train_fit \\
        --num_inference_steps 20 --bf16 --output_dir runs/trajectories
    accelerate launch training/train_consistency.py --teacher checkpoints/ambiseg-lidc64 \\
        --trajectories runs/trajectories --loss_type l2 --sampling_steps 1 --output_dir runs/lcm-trajectory

The UNet's x0-predictions are clamped to the mask range [-1, 1] in training as the pipeline clamps
them in sampling (straight through for the student's gradient). Consistency mode: a teacher whose UNet takes an
ambiguity latent z gets one z from its prior per row (as in sampling), the same for teacher, student and target; data:
one random rater per slice of `--train_split` (default `train_fit`, so the `selection` patients stay unseen for the
choices made on them), augmented as in pretraining. Trajectory mode: images, prompts, z and targets are the
recording's, not augmented.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDPMScheduler, LCMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from ambiseg_diffusers import AmbiSegPipeline
from ambiseg_diffusers.configs import CONFIGS
from ambiseg_diffusers.data import (
    DATA_FLAGS, add_data_arguments, distillation_splits, load_from_args, model_image_processor, model_image_shape,
)
from ambiseg_diffusers.evaluation import cpu_only, validation_report
from ambiseg_diffusers.hub_utils import model_card, push_folder_to_hub
from ambiseg_diffusers.lidc import FREE_TEXT, eval_prompts, pipeline_prompt_style
from ambiseg_diffusers.losses import consistency_output, ddim_solver_step
from ambiseg_diffusers.pipelines.pipeline_ambiseg import CONSISTENCY_FILE, LORA_WEIGHT_NAME
from ambiseg_diffusers.run_records import RECORD_FILE, data_arguments, pipeline_fingerprint
from ambiseg_diffusers.text import PromptCache, sentence_encoded
from ambiseg_diffusers.training_utils import (
    LORA_TARGETS, TrainingClock, adapter_base_matches, generator_of, load_ema, load_trainable_adapter, log_validation,
    resume_training, save_checkpoint, save_ema, shard, step_batches, step_generator,
)

logger = get_logger(__name__)
ADAPTER_NAME = "consistency"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--teacher", required=True, help="the AmbiSeg pipeline to distil (folder or Hub id)")
    data.add_argument("--init_adapter", default=None,
                      help="start the student from this distilled sampler folder's adapter (same teacher and rank)")
    data.add_argument("--base_model_id", default=None,
                      help="Hub id of the teacher, written into consistency.json and the card (default: --teacher "
                           "when it is a Hub id); a local teacher folder is recorded by its relative path too")
    add_data_arguments(data, resolution=False)  # images are resized to the teacher's size; with --trajectories, the
    # recording's data
    data.add_argument("--train_split", default=None,
                      help="training rows (default train_fit: the selection patients stay out; with --trajectories, "
                           "the recording's split)")
    data.add_argument("--validation_split", default=None, help="split of the validation samples (default: lidc64 "
                      "selection; other data the one the teacher's training validated on)")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="processes preparing batches ahead")

    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--trajectories", default=None,
                        help="trajectory distillation: a folder of the teacher's recorded DDIM trajectories "
                             "(scripts/record_trajectories.py); the student learns to reach each trajectory's end from "
                             "its states, instead of the one-step consistency target")
    recipe.add_argument("--top_state_fraction", type=float, default=None,
                        help="trajectory distillation: share of rows trained at the first state (pure noise, what a "
                             "one-call sampler sees; default 0.5); the others at a uniformly drawn later recorded state")
    recipe.add_argument("--num_ddim_timesteps", type=int, default=None,
                        help="the teacher's DDIM schedule; its stride k is the consistency step (default 50, as "
                             "LCM; with --trajectories, the recorded number of steps)")
    recipe.add_argument("--timestep_scaling", type=float, default=10.0, help="LCMScheduler's boundary-condition scale")
    recipe.add_argument("--loss_type", default=None, choices=["huber", "l2"],
                        help="distance between f's (default: huber, as LCM-LoRA; l2, plain regression, with --trajectories)")
    recipe.add_argument("--huber_c", type=float, default=0.001, help="pseudo-Huber c (LCM-LoRA's default)")
    recipe.add_argument("--lora_rank", type=int, default=16, help="rank of the student's LoRA")
    recipe.add_argument("--learning_rate", type=float, default=1e-4, help="AdamW learning rate")
    recipe.add_argument("--lr_scheduler", default="constant", choices=["constant", "linear", "cosine"])
    recipe.add_argument("--max_train_steps", type=int, default=2000, help="optimizer steps")
    recipe.add_argument("--train_batch_size", type=int, default=32, help="rows per step (global)")
    recipe.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm")
    recipe.add_argument("--target_ema_decay", type=float, default=0.0,
                        help="compute the consistency target f(x_{t-k}, t-k) with an EMA of the student's adapter of "
                             "this decay (the target network of consistency models and full LCM, e.g. 0.95); 0 = with "
                             "the student itself, as LCM-LoRA does (docs/results.md: neither kept this run stable); "
                             "diffusers' EMAModel ramps the decay in as min(decay, (1 + step) / (10 + step))")
    recipe.add_argument("--ema_decay", type=float, default=0.0,
                        help="snapshots and the final adapter carry an EMA of the student's adapter of this decay "
                             "(e.g. 0.99, ramped in as above); 0 = the raw adapter")
    recipe.add_argument("--sampling_steps", type=int, default=2,
                        help="the distilled pipeline's default number of calls (choose it on the selection split: "
                             "scripts/sweep_samplers.py --configs lcm:1 lcm:2 ... on the output folder)")

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", required=True, help="run folder: checkpoints, logs, the adapter and scheduler")
    run.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    run.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="accelerate's")
    run.add_argument("--max_train_minutes", type=float, default=None, help="stop after this much training time")
    run.add_argument("--snapshot_minutes", type=float, default=None,
                     help="every this many minutes of training, save the distilled sampler to snapshots/step-N (a "
                          "folder like the final one: the candidates compared on the selection split)")
    run.add_argument("--checkpointing_steps", type=int, default=100, help="save a resumable checkpoint every N steps")
    run.add_argument("--checkpoints_total_limit", type=int, default=2, help="keep at most this many checkpoints")
    run.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    run.add_argument("--validation_steps", type=int, default=0, help="validate every N steps (0 = only at the end)")
    run.add_argument("--num_validation_images", type=int, default=4, help="images of --validation_split (0 = none)")
    run.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "wandb", "none"], help="tracker")
    run.add_argument("--push_to_hub", action="store_true", help="upload the adapter, scheduler and card")
    run.add_argument("--hub_model_id", default=None, help="Hub repo (default: the output folder's name)")
    run.add_argument("--hub_token", default=None, help="Hub token (default: the logged-in one)")
    run.add_argument("--stop_after_steps", type=int, default=None,
                     help="stop without the final save after N steps in this process (simulates a kill; tests)")
    args = parser.parse_args(argv)
    if args.trajectories:
        recorded = Path(args.trajectories) / RECORD_FILE
        if not recorded.is_file():
            parser.error(f"--trajectories {args.trajectories!r} holds no {RECORD_FILE} (record it with "
                         "scripts/record_trajectories.py)")
        recording = json.loads(recorded.read_text())
        recording.setdefault("dataset_name", recording.get("dataset", "lidc64"))  # recordings before the data flags
        taken = {"num_ddim_timesteps": "num_inference_steps", "train_split": "split",
                 **{name: name for name in DATA_FLAGS if name not in ("resolution", "data_dir", "train_data_dir")}}
        for folder in ("data_dir", "train_data_dir"):  # a given one wins: the folder may have moved
            setattr(args, folder, getattr(args, folder) or recording.get(folder))
        for name, key in taken.items():
            value = recording.get(key, parser.get_default(name))
            if getattr(args, name) not in (parser.get_default(name), value):
                parser.error(f"--{name} {getattr(args, name)!r} differs from the recording's {value!r} in "
                             f"--trajectories {args.trajectories!r}; leave it out")
            setattr(args, name, value)  # so the run's record and card say what was trained on
        if args.target_ema_decay:
            parser.error("--target_ema_decay has no target network to act on with --trajectories (fixed targets)")
        args.top_state_fraction = 0.5 if args.top_state_fraction is None else args.top_state_fraction
        if not 0 <= args.top_state_fraction <= 1:
            parser.error(f"--top_state_fraction must be in [0, 1], got {args.top_state_fraction}")
        args.loss_type = args.loss_type or "l2"
    else:
        if args.top_state_fraction is not None:
            parser.error("--top_state_fraction applies to trajectory distillation only (--trajectories)")
        for name, default in (("num_ddim_timesteps", 50), ("loss_type", "huber")):
            if getattr(args, name) is None:  # a given 0 stays 0, for the check below to refuse
                setattr(args, name, default)
    if not args.trajectories or args.num_validation_images:  # else no data is read (a GPU box may hold only the
        # recorded shards): the splits are looked up only where they are used
        args.train_split, args.validation_split = distillation_splits(args.dataset_name, args.train_data_dir,
                                                                      args.train_split, args.validation_split)
    for name in ("num_ddim_timesteps", "lora_rank", "max_train_steps", "train_batch_size", "checkpointing_steps",
                 "sampling_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("target_ema_decay", "ema_decay"):
        if not 0 <= getattr(args, name) < 1:
            parser.error(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if args.sampling_steps > args.num_ddim_timesteps:
        parser.error(f"--sampling_steps ({args.sampling_steps}) cannot exceed --num_ddim_timesteps "
                     f"({args.num_ddim_timesteps}): LCMScheduler samples a subset of the distilled schedule")
    if args.init_adapter and not os.path.isfile(os.path.join(args.init_adapter, CONSISTENCY_FILE)):
        parser.error(f"--init_adapter {args.init_adapter!r} holds no {CONSISTENCY_FILE} (a train_consistency.py output)")
    if args.push_to_hub and args.base_model_id is None and os.path.isdir(args.teacher):
        parser.error("--push_to_hub with a local --teacher needs --base_model_id (the teacher's Hub repo): the "
                     "uploaded adapter must name a base that others can download")
    return args


def check_same_teacher(folder: str, teacher: str) -> None:
    """Refuses an `--init_adapter` distilled from another teacher than `--teacher` (its `consistency.json`)."""
    if not adapter_base_matches(folder, CONSISTENCY_FILE, teacher):
        info = json.loads((Path(folder) / CONSISTENCY_FILE).read_text())
        raise ValueError(f"`--init_adapter` {folder!r} was distilled from "
                         f"{info.get('base_model_path') or info.get('base_model')!r} ({CONSISTENCY_FILE}), not from "
                         f"`--teacher` {teacher!r}.")


def load_checkpointed_ema(ema, folder: str, name: str) -> None:
    """`load_ema`, with a clear error for a checkpoint of a run that had this EMA off."""
    if not (Path(folder) / f"{name}.safetensors").is_file():
        raise ValueError(f"{folder} was saved without the {name} (`--{name}_decay` 0): resume with the same "
                         f"`--{name}_decay` as the run that wrote it.")
    load_ema(ema, folder, name)


def recorded_arguments(args) -> dict:
    """The arguments as written into the run folder and the card: everything but the Hub token."""
    return {k: v for k, v in vars(args).items() if k != "hub_token"}


def load_trajectories(folder: str, teacher: AmbiSegPipeline, schedule: torch.Tensor) -> dict:
    """The shards of scripts/record_trajectories.py in one dict of tensors (states stay float16: 20 states of 8,000
    rows of 64x64 are 1.3 GB so, 2.6 GB in float32), after checking they were recorded from this teacher on `schedule`."""
    import numpy as np

    folder = Path(folder)
    recorded_from = json.loads((folder / RECORD_FILE).read_text()).get("teacher_sha256")
    if recorded_from != pipeline_fingerprint(teacher):
        raise ValueError(f"`--trajectories` {str(folder)!r} were recorded from another teacher than `--teacher` (its "
                         f"{RECORD_FILE} holds another weight fingerprint).")
    paths = sorted(folder.glob("shard-*.npz"))
    if not paths:
        raise ValueError(f"`--trajectories` {str(folder)!r} holds no shard-*.npz; record them first.")
    with np.load(paths[0]) as first:
        timesteps, keys = torch.from_numpy(first["timesteps"]).long(), set(first.files)
    if not torch.equal(timesteps, schedule.flip(0)):
        raise ValueError(f"`--trajectories` were recorded at timesteps {timesteps.tolist()}, not the DDIM schedule "
                         f"the LCMScheduler samples from ({schedule.flip(0).tolist()}): record with a number of steps "
                         "that divides the teacher's training timesteps.")
    joined = {key: join_shards(paths, key) for key in ("images", "states", "final", "prompts", "z") if key in keys}
    return {
        "images": torch.from_numpy(joined["images"]).float(), "states": torch.from_numpy(joined["states"]),
        "final": torch.from_numpy(joined["final"]).float(), "prompts": joined["prompts"].tolist(),
        "z": torch.from_numpy(joined["z"]).float() if "z" in joined else None, "timesteps": timesteps,
    }


def join_shards(paths: list[Path], key: str):
    """One array of every shard's `key`, filled shard by shard: the recording is held once in memory, not twice."""
    import numpy as np

    total, joined, offset = 0, None, 0
    for path in paths:
        with np.load(path) as shard:
            total += len(shard["positions"])
    for path in paths:
        with np.load(path) as shard:
            part = shard[key]
        if joined is None:  # strings (the prompts) vary in width from shard to shard: kept as objects
            joined = np.empty((total, *part.shape[1:]), dtype=object if part.dtype.kind == "U" else part.dtype)
        joined[offset: offset + len(part)] = part
        offset += len(part)
    return joined


def ddim_timesteps(num_train_timesteps: int, num_ddim_timesteps: int) -> torch.Tensor:
    """The teacher's schedule as LCMScheduler's `original_inference_steps` builds it: k-1, 2k-1, ..., n·k-1 with
    k = T // n (T-1 at the top when n divides T)."""
    stride = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1) * stride - 1


def distance(prediction: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: float) -> torch.Tensor:
    """Mean L2, or the pseudo-Huber loss sqrt(d^2 + c^2) - c of LCM-LoRA, over all elements."""
    if loss_type == "l2":
        return F.mse_loss(prediction.float(), target.float())
    return (torch.sqrt((prediction.float() - target.float()) ** 2 + huber_c**2) - huber_c).mean()


def use_adapters(unet, names: list[str]) -> None:
    """Only the LoRA adapters `names` act (diffusers' `set_adapters`); only the student's (`ADAPTER_NAME`) trains,
    whatever peft's activation made trainable."""
    unet.set_adapters(names)
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_(f".{ADAPTER_NAME}." in name)


def main(argv=None) -> Path:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, log_with=None if args.report_to == "none" else args.report_to,
        cpu=cpu_only(), project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "consistency_config.json").write_text(json.dumps(recorded_arguments(args), indent=2))

    teacher = AmbiSegPipeline.from_pretrained(args.teacher, dtype=torch.float32).to(accelerator.device)
    teacher.set_progress_bar_config(disable=True)
    if teacher.scheduler.config.prediction_type != "sample":
        raise ValueError("consistency distillation here needs an x0-predicting teacher (`prediction_type='sample'`, "
                         f"every AmbiSeg recipe's); {args.teacher!r} predicts {teacher.scheduler.config.prediction_type!r}.")
    noise_scheduler = DDPMScheduler.from_config(teacher.scheduler.config)
    lcm = LCMScheduler.from_config(teacher.scheduler.config, original_inference_steps=args.num_ddim_timesteps,
                                   timestep_scaling=args.timestep_scaling, clip_sample=True, set_alpha_to_one=True)
    if args.num_ddim_timesteps > noise_scheduler.config.num_train_timesteps:
        raise ValueError(f"`--num_ddim_timesteps` ({args.num_ddim_timesteps}) exceeds the teacher's "
                         f"{noise_scheduler.config.num_train_timesteps} training timesteps.")
    schedule = ddim_timesteps(noise_scheduler.config.num_train_timesteps, args.num_ddim_timesteps)
    if args.trajectories and args.train_batch_size % accelerator.num_processes:  # before minutes of loading
        raise ValueError(f"`--train_batch_size` ({args.train_batch_size}) must split evenly over the "
                         f"{accelerator.num_processes} processes.")
    recorded = load_trajectories(args.trajectories, teacher, schedule) if args.trajectories else None
    stride = noise_scheduler.config.num_train_timesteps // args.num_ddim_timesteps
    encode = PromptCache(teacher.tokenizer, teacher.text_encoder,
                         by_sentence=sentence_encoded(pipeline_prompt_style(teacher)))
    prior = teacher.prior.requires_grad_(False).eval() if teacher.unet.latent_dim else None

    from peft import LoraConfig

    unet = teacher.unet.requires_grad_(False)
    # An aligned teacher (a TDG-DiffDPO folder) carries its own adapter: the teacher is the UNet with it, the student
    # the UNet with it and the new one, as loading the result turns both on.
    teacher_adapters = list(getattr(unet, "peft_config", None) or {})
    if args.init_adapter:  # go on from an earlier distilled sampler (e.g. a chosen snapshot, at a lower rate)
        check_same_teacher(args.init_adapter, args.teacher)
        load_trainable_adapter(teacher, args.init_adapter, ADAPTER_NAME, args.lora_rank)
    else:
        unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS), adapter_name=ADAPTER_NAME)
    use_adapters(unet, teacher_adapters + [ADAPTER_NAME])
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=0,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    # EMAs of the adapter: the target network, and the weights that are saved; both go into checkpoints as safetensors
    emas = {name: EMAModel(params, decay=decay) for name, decay in
            (("target_ema", args.target_ema_decay), ("ema", args.ema_decay)) if decay > 0}
    accelerator.register_save_state_pre_hook(
        lambda models, weights, folder: [save_ema(ema, folder, name) for name, ema in emas.items()])
    accelerator.register_load_state_pre_hook(
        lambda models, folder: [load_checkpointed_ema(ema, folder, name) for name, ema in emas.items()])

    style = pipeline_prompt_style(teacher)
    data_config = dataclasses.replace(
        CONFIGS["cpu"], train_batch_size=args.train_batch_size, resolution=model_image_processor(teacher).config.size,
        prompt_dropout=0.0, image_clip=model_image_processor(teacher).config.image_clip, prompt_style=style,
    )
    processor = model_image_processor(teacher)  # the teacher's training size and resizing
    size = processor.config.size
    dataset = None if recorded else load_from_args(args, args.train_split, style, image_processor=processor)
    validation = (load_from_args(args, args.validation_split, style, image_processor=processor)
                  if args.num_validation_images else None)
    trained_on = (data_arguments(args, dataset, args.train_split) if dataset is not None  # resumes on it alone
                  else {"trajectories": str(Path(args.trajectories).resolve()), **{
                      k: v for k, v in json.loads((Path(args.trajectories) / RECORD_FILE).read_text()).items()
                      if k.startswith("data.")}})
    first_step, seconds = resume_training(accelerator, output_dir, args.resume_from_checkpoint, trained_on)
    clock = TrainingClock(args.max_train_minutes, args.snapshot_minutes, seconds)
    if accelerator.is_main_process:
        accelerator.init_trackers("ambiseg-consistency",
                                  config={k: v for k, v in recorded_arguments(args).items() if v is not None})
    if recorded:
        logger.info(f"{len(recorded['final'])} recorded teacher trajectories of DDIM-{args.num_ddim_timesteps}, "
                    f"{args.max_train_steps} steps of batch {args.train_batch_size}")
    else:
        logger.info(f"{len(dataset)} training rows, {args.max_train_steps} steps of batch {args.train_batch_size}, "
                    f"teacher DDIM-{args.num_ddim_timesteps} (stride {stride})")

    def unet_x0(model, noisy, timesteps, images, text, text_mask, z, straight_through: bool = False) -> torch.Tensor:
        """The clamped x0-prediction, as sampling clamps it; for the student the clamp passes the gradient straight
        through, so a prediction outside [-1, 1] is still pulled towards its target."""
        output = model(torch.cat([images, noisy], 1), timesteps, encoder_hidden_states=text,
                       encoder_attention_mask=text_mask, class_labels=z).sample.float()
        clamped = output.clamp(-1.0, 1.0)
        return output + (clamped - output).detach() if straight_through else clamped

    def scalings(timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return lcm.get_scalings_for_boundary_condition_discrete(timesteps.float())

    def step_loss(batch: dict, generator: torch.Generator) -> torch.Tensor:
        device = accelerator.device
        images, clean = batch["pixel_values"].to(device), batch["mask_values"].to(device)
        text, text_mask = encode(batch["prompts"], device)
        size = clean.shape[0]
        noise = torch.randn(clean.shape, generator=generator).to(device)
        start = schedule[torch.randint(0, args.num_ddim_timesteps, (size,), generator=generator)].to(device)
        end = (start - stride).clamp(min=0)
        z = None
        if prior is not None:  # one prior z per row, as sampling draws it
            draw = torch.randn(size, prior.config.latent_dim, generator=generator).to(device)
            with torch.no_grad():
                z = prior(images, text, text_mask).sample(noise=draw)
        noisy = noise_scheduler.add_noise(clean, noise, start)
        model = accelerator.unwrap_model(unet)
        with accelerator.autocast():
            prediction = consistency_output(scalings(start), noisy,
                                            unet_x0(unet, noisy, start, images, text, text_mask, z, straight_through=True))
            with torch.no_grad():
                if teacher_adapters:
                    use_adapters(model, teacher_adapters)
                else:
                    model.disable_adapters()
                try:
                    teacher_x0 = unet_x0(model, noisy, start, images, text, text_mask, z)
                finally:
                    if teacher_adapters:
                        use_adapters(model, teacher_adapters + [ADAPTER_NAME])
                    else:
                        model.enable_adapters()
                previous = ddim_solver_step(noise_scheduler, teacher_x0, noisy.float(), start, end)
                with adapter_weights(emas.get("target_ema")):
                    target = consistency_output(scalings(end), previous,
                                                unet_x0(model, previous, end, images, text, text_mask, z))
        return distance(prediction, target, args.loss_type, args.huber_c)

    def trajectory_loss(step: int) -> torch.Tensor:
        """f(x_t, t) from recorded states x_t against the end of their trajectories: the teacher's DDIM sample."""
        device, size = accelerator.device, args.train_batch_size
        generator = step_generator(args.seed, step)  # the global batch: the same for any number of processes
        rows = torch.randint(0, len(recorded["final"]), (size,), generator=generator)
        top = torch.rand(size, generator=generator) < args.top_state_fraction
        index = torch.where(top, 0, torch.randint(1, len(schedule), (size,), generator=generator))
        mine = shard(list(range(size)), accelerator.process_index, accelerator.num_processes)
        rows, index = rows[mine], index[mine]
        noisy = recorded["states"][rows, index].float().to(device)
        timesteps = recorded["timesteps"][index].to(device)
        images, clean = recorded["images"][rows].to(device), recorded["final"][rows].to(device)
        text, text_mask = encode([recorded["prompts"][i] for i in rows.tolist()], device)
        z = None if recorded["z"] is None else recorded["z"][rows].to(device)
        with accelerator.autocast():
            x0 = unet_x0(unet, noisy, timesteps, images, text, text_mask, z, straight_through=True)
            prediction = consistency_output(scalings(timesteps), noisy, x0)
        return distance(prediction, clean, args.loss_type, args.huber_c)

    @contextlib.contextmanager
    def adapter_weights(ema):
        """The adapter carries `ema`'s weights inside the block (the training weights are restored after)."""
        if ema is None:
            yield
            return
        ema.store(params)
        try:
            ema.copy_to(params)
            yield
        finally:
            ema.restore(params)

    def student_pipeline() -> AmbiSegPipeline:
        pipe = AmbiSegPipeline(**{**teacher.components, "unet": accelerator.unwrap_model(unet), "scheduler": lcm},
                               autocast=teacher.config.autocast, prompt_style=style)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def validate(step: int) -> dict:
        """The saved weights (the EMA's) sampled on the first validation images."""
        with adapter_weights(emas.get("ema")), accelerator.autocast():
            metrics, grid = validation_report(student_pipeline(), validation, args.num_validation_images, 16,
                                              seed=args.seed, num_inference_steps=args.sampling_steps)
        log_validation(accelerator, metrics, grid, step)
        grid.save(output_dir / f"validation-{step:06d}.png")
        logger.info("validation step %d (%d-call sampler): %s", step, args.sampling_steps,
                    {k: round(v, 4) for k, v in metrics.items()})
        return metrics

    batches = (itertools.repeat(None) if recorded else
               step_batches(dataset, data_config, args.seed, accelerator, first_step,
                            max(args.max_train_steps - first_step, 0), args.dataloader_num_workers))
    progress = clock.progress_bar(first_step, args.max_train_steps, disable=not accelerator.is_local_main_process)
    ran, metrics, metrics_step, done = 0, {}, None, first_step
    for step, batch in zip(range(first_step, args.max_train_steps), batches):
        if clock.expired_everywhere(accelerator):
            logger.info(f"stopping at step {step}: --max_train_minutes {args.max_train_minutes} spent")
            break
        started = time.time()
        unet.train()
        loss = trajectory_loss(step) if recorded else step_loss(batch, generator_of(batch))
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        for ema in emas.values():
            ema.step(params)
        snapshot_due = clock.add(time.time() - started)
        done, ran = step + 1, ran + 1
        logs = {"loss": accelerator.reduce(loss.detach(), reduction="mean").item(), "lr": lr_scheduler.get_last_lr()[0]}
        accelerator.log(logs, step=done)
        progress.set_postfix(loss=f"{logs['loss']:.5f}")
        if accelerator.is_main_process and done % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, output_dir, done, args.checkpoints_total_limit, clock.seconds, trained_on)
        if accelerator.is_main_process and snapshot_due:
            snapshot = output_dir / "snapshots" / f"step-{done:06d}"
            partial = snapshot.with_name(f".{snapshot.name}.partial")  # a killed save leaves no half-written candidate
            shutil.rmtree(partial, ignore_errors=True)
            with adapter_weights(emas.get("ema")):
                save_distilled(accelerator.unwrap_model(unet), lcm, args, partial, done, {})
            shutil.rmtree(snapshot, ignore_errors=True)  # a resumed run saves the same step again (resume is exact)
            partial.rename(snapshot)
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
        if validation is not None and metrics_step != done:
            metrics = validate(done)
        with adapter_weights(emas.get("ema")):
            save_distilled(accelerator.unwrap_model(unet), lcm, args, output_dir, done, metrics)
        repo_id = args.hub_model_id or output_dir.name
        results = ("## Validation at the end of training\n\n"
                   + (f"```json\n{json.dumps({k: round(v, 4) for k, v in metrics.items()}, indent=2)}\n```"
                      if metrics else "None ran (`--num_validation_images 0`): score it with scripts/sweep_samplers.py."))
        example = str(recorded["prompts"][0]) if recorded else eval_prompts(dataset[0], "annotator")[0]
        distilled_card(output_dir, repo_id, results, style, size, example, model_image_shape(teacher)).save(
            output_dir / "README.md")
        if args.push_to_hub:
            push_folder_to_hub(output_dir, repo_id, token=args.hub_token)
    accelerator.end_training()
    return output_dir


def save_distilled(unet, lcm: LCMScheduler, args, output_dir: Path, steps: int, metrics: dict) -> None:
    """The adapter in diffusers' LoRA format, the LCMScheduler in `scheduler/`, and `consistency.json` naming the
    teacher (its Hub id, or its folder relative to the output) and the default number of calls."""
    from peft.utils import get_peft_model_state_dict

    output_dir.mkdir(parents=True, exist_ok=True)
    AmbiSegPipeline.save_lora_weights(
        output_dir, unet_lora_layers=get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME),
        weight_name=LORA_WEIGHT_NAME, unet_lora_adapter_metadata=unet.peft_config[ADAPTER_NAME].to_dict(),
    )
    lcm.save_pretrained(output_dir / "scheduler")
    info = {"adapter_name": ADAPTER_NAME, "num_inference_steps": args.sampling_steps, "train_steps": steps,
            "num_ddim_timesteps": args.num_ddim_timesteps,
            "method": "trajectory" if args.trajectories else "consistency",
            "validation": {k: round(v, 4) for k, v in metrics.items()},
            "base_model": args.base_model_id or (None if os.path.isdir(args.teacher) else args.teacher),
            "config": recorded_arguments(args)}
    if os.path.isdir(args.teacher):
        info["base_model_path"] = os.path.relpath(os.path.abspath(args.teacher), os.path.abspath(output_dir))
    (output_dir / CONSISTENCY_FILE).write_text(json.dumps(info, indent=2))


def distilled_card(folder: Path, repo_id: str, results: str, prompt_style: str, image_size: int, example_prompt: str,
                   image_shape: str | None = None):
    """The model card of a distilled sampler folder (from its `consistency.json`), with `results` (markdown) as the
    measurements section; its snippet prompts as the teacher was trained (`prompt_style`; "free": `example_prompt`,
    a text of the data)."""
    info = json.loads((Path(folder) / CONSISTENCY_FILE).read_text())
    config = info["config"]
    return model_card(
        "consistency.md", repo_id, base_model=info.get("base_model"), lidc=prompt_style != FREE_TEXT,
        prompt_style=prompt_style, image_size=image_size, example_prompt=example_prompt,
        image_shape=image_shape or f"{image_size}, {image_size}",
        extra_tags=[f"{info.get('method', 'consistency')}-distillation", "lcm", "lora"], teacher=config["teacher"],
        method=info.get("method", "consistency"),
        num_ddim_timesteps=info["num_ddim_timesteps"], train_steps=info["train_steps"],
        num_inference_steps=info["num_inference_steps"], results=results, config_json=json.dumps(config, indent=2),
    )


if __name__ == "__main__":
    main()
