"""Sampling a pipeline over dataset rows and scoring the samples: shared by evaluation, validation during training,
the examples and the benchmarks (inference only; nothing here imports training code)."""

from __future__ import annotations

import contextlib
import inspect
import os

import numpy as np
import torch
from datasets import Dataset
from diffusers.utils import logging
from diffusers import (
    DDIMScheduler, DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
    LCMScheduler, UniPCMultistepScheduler,
)

from .lidc import eval_prompts
from .data import rater_masks
from .metrics import compute_metrics_rows
from .visualization import sample_grid

SAMPLING_SCHEDULERS = {
    "ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler,
    "euler": EulerDiscreteScheduler, "deis": DEISMultistepScheduler,
    "lcm": LCMScheduler,  # for a distilled sampler (training/train_consistency.py), whose config it keeps
    "dpm_sde": DPMSolverMultistepScheduler,  # DPM-Solver++ SDE: the multistep solver with fresh noise each step
}
SAMPLER_OPTIONS = {"dpm_sde": {"algorithm_type": "sde-dpmsolver++"}}
logger = logging.get_logger(__name__)
_THRESHOLDING = ("dpm", "dpm_sde", "unipc", "deis")  # clip x0-predictions via dynamic thresholding (no clip_sample)


def cpu_only() -> bool:
    """True when no accelerator is present (or ACCELERATE_USE_CPU is set). accelerate joins several processes
    (torchrun, `accelerate launch --multi_gpu`) over gloo on the CPU only when told `cpu=True`; without it each
    process would run alone and do all the work."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):
        return True
    mps = getattr(torch.backends, "mps", None)
    return not (torch.cuda.is_available() or (mps is not None and mps.is_available()))


def warn_if_emulated_bf16(enabled: bool) -> None:
    """`--bf16` on hardware without native bf16 (an AVX2 CPU, a pre-Ampere GPU) is emulated: about 30x slower than
    float32 for this UNet on a 2-core AVX2 CPU (measured: 301 s against 10 s for one 4-image call). Say so."""
    from .pipelines.pipeline_ambiseg import native_bf16

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if enabled and not native_bf16(device):
        logger.warning(f"--bf16 on a {device.type} without native bf16 (no AVX512-BF16 / AMX, or a pre-Ampere GPU): "
                       "emulated, far slower than float32 here; drop --bf16")


def build_sampling_scheduler(noise_scheduler, name: str = "ddim", clip: bool = True):
    """A sampler on the training noise schedule of `noise_scheduler` (its betas, timesteps and prediction type); every
    option this function controls is set explicitly, so the result does not depend on which sampler
    `noise_scheduler` itself was. `clip`: the solver clips each x0 it derives to the mask range [-1, 1] (`clip_sample`,
    or thresholding at 1.0 for the multistep solvers). For an x0-predicting model ("sample") the pipeline clamps the
    prediction itself before every step (a predicted mask lives in [-1, 1]), so there `clip` changes nothing; it
    matters for epsilon and v models."""
    if name not in SAMPLING_SCHEDULERS:
        raise ValueError(f"`scheduler` must be one of {sorted(SAMPLING_SCHEDULERS)}, got {name!r}.")
    cls = SAMPLING_SCHEDULERS[name]
    defaults = inspect.signature(cls.__init__).parameters
    extra = {}
    if "thresholding" in defaults:
        extra["thresholding"] = clip and name in _THRESHOLDING
        extra["sample_max_value"] = 1.0
    if "clip_sample" in defaults:
        extra.update(clip_sample=clip and name not in _THRESHOLDING, clip_sample_range=1.0)
    if "timestep_spacing" in defaults:
        # DDIM starts at t = T - 1, where the training noise is; the others keep their own default
        extra["timestep_spacing"] = "trailing" if name == "ddim" else defaults["timestep_spacing"].default
    if "algorithm_type" in defaults:
        extra["algorithm_type"] = defaults["algorithm_type"].default  # "dpm" is DPM-Solver++ 2M whatever was saved
    extra.update(SAMPLER_OPTIONS.get(name, {}))
    return cls.from_config(noise_scheduler.config, **extra)


def largest_consensus_slices(dataset: Dataset | dict) -> list[int]:
    """One slice per nodule, as results are read: the dataset position of the slice where the raters' 50% consensus
    (pixels marked by at least half of the raters who read the nodule, and by one at least) covers the most pixels;
    ties go to the first. lidc64's `mini` split is this view of `validate`. Needs the columns masks `(M, H, W)` (M
    may differ per row), annotator_valid `(M,)` and nodule_id (a `datasets.Dataset` or a dict of columns)."""
    consensus = consensus_areas(dataset)
    best: dict[str, int] = {}
    for position, nodule in enumerate(dataset["nodule_id"]):
        if nodule not in best or consensus[position] > consensus[best[nodule]]:
            best[nodule] = position
    return sorted(best.values())


def consensus_areas(dataset: Dataset | dict) -> np.ndarray:
    """Pixels of each row's 50% consensus (marked by at least half of the raters who read it, and by one at least);
    slots without a reading (`annotator_valid` False) count nothing. `(B,)` int."""
    areas = []
    for masks, valid in zip(dataset["masks"], dataset["annotator_valid"]):
        valid = np.asarray(valid, dtype=bool)
        read = np.asarray(masks, dtype=np.int32)[valid]
        areas.append(int((read.sum(0) >= max(np.ceil(valid.sum() / 2), 1)).sum()))
    return np.asarray(areas)


def sample_rows(
    pipeline, rows: dict, indices: list[int], num_samples: int = 16, prompts: str = "annotator", seed: int = 0,
    num_inference_steps: int | None = None, deterministic: bool = False, **call_kwargs,
) -> np.ndarray:
    """Samples for a dict-of-lists chunk of dataset `rows` (at dataset positions `indices`): `(B, N, H, W)` bool.

    Image `i` always uses a generator seeded `(seed, i)`, so its samples do not depend on batching, resuming or the
    process that draws them. `deterministic`: the baseline of one sample at the prior mean, repeated `num_samples`
    times.
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


@contextlib.contextmanager
def _only_bar(pipeline, active: bool):
    """While a loop shows its own bar over images, the pipeline's per-step bar is silenced (and restored after)."""
    if not active:
        yield
        return
    saved = dict(getattr(pipeline, "_progress_bar_config", {}))
    pipeline.set_progress_bar_config(**{**saved, "disable": True})
    try:
        yield
    finally:
        pipeline._progress_bar_config = saved


def evaluate_pipeline(
    pipeline, dataset, num_samples: int = 16, num_inference_steps: int | None = None, prompts: str = "annotator",
    seed: int = 0, images_per_call: int = 4, max_images: int | None = None, progress: bool = False, **call_kwargs,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Samples `num_samples` masks for each row (see `sample_rows`) and scores them against all the rater masks.

    Each row is scored against its own raters (their count may differ per row; nothing is padded). Returns
    per-image metrics `{name: (B,)}` and the samples `(B, N, H, W)` bool. `progress`: a bar over images,
    the only one (the pipeline's per-step bar is silenced for the loop and restored after).
    """
    from tqdm.auto import tqdm

    from .data import check_prompts_for_model

    check_prompts_for_model(pipeline, dataset, prompts)  # a text model on data without its text: refused
    total = len(dataset) if max_images is None else min(max_images, len(dataset))
    per_image: dict[str, list] = {}
    all_samples = []
    with tqdm(total=total, desc="images", unit="image", disable=not progress) as bar, _only_bar(pipeline, progress):
        for start in range(0, total, images_per_call):
            indices = list(range(start, min(start + images_per_call, total)))
            rows = dataset[indices]
            masks = sample_rows(pipeline, rows, indices, num_samples, prompts, seed, num_inference_steps, **call_kwargs)
            for key, values in compute_metrics_rows(masks, rater_masks(rows)).items():
                per_image.setdefault(key, []).extend(values.tolist())
            all_samples.append(masks)
            bar.update(len(indices))
    return {k: np.asarray(v) for k, v in per_image.items()}, np.concatenate(all_samples)


def validation_report(pipeline, dataset, num_images: int, num_samples: int = 16, seed: int = 0, **kwargs):
    """Metrics summary (means) and a sample grid for the first `num_images` rows: what training logs."""
    per_image, samples = evaluate_pipeline(pipeline, dataset, num_samples, max_images=num_images, seed=seed, **kwargs)
    subset = dataset[: len(samples)]
    raters = rater_masks(subset)
    grid = sample_grid(np.asarray(subset["image"])[:4], raters[:4], samples[:4])
    means = {k: float(v.mean()) for k, v in per_image.items()}
    means["sample_foreground"] = float(samples.mean())
    means["rater_foreground"] = float(np.mean([r.mean() for r in raters]))
    return means, grid
