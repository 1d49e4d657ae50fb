"""Sampling a pipeline over dataset rows and scoring the samples: shared by evaluation, validation during training,
the examples and the benchmarks (inference only; nothing here imports training code)."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
from diffusers import (
    DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler,
)

from .lidc import eval_prompts
from .metrics import compute_metrics_batch
from .visualization import sample_grid

SAMPLING_SCHEDULERS = {
    "ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}


def cpu_only() -> bool:
    """True when no accelerator is present (or ACCELERATE_USE_CPU is set). accelerate joins several processes
    (torchrun, `accelerate launch --multi_gpu`) over gloo on the CPU only when told `cpu=True`; without it each
    process would run alone and do all the work."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):
        return True
    mps = getattr(torch.backends, "mps", None)
    return not (torch.cuda.is_available() or (mps is not None and mps.is_available()))


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

    Returns per-image metrics `{name: (B,)}` and the samples `(B, N, H, W)` bool. `progress`: a bar over images,
    the only one (the pipeline's per-step bar is silenced for the loop and restored after).
    """
    from tqdm.auto import tqdm

    total = len(dataset) if max_images is None else min(max_images, len(dataset))
    per_image: dict[str, list] = {}
    all_samples = []
    with tqdm(total=total, desc="images", unit="image", disable=not progress) as bar, _only_bar(pipeline, progress):
        for start in range(0, total, images_per_call):
            indices = list(range(start, min(start + images_per_call, total)))
            rows = dataset[indices]
            masks = sample_rows(pipeline, rows, indices, num_samples, prompts, seed, num_inference_steps, **call_kwargs)
            annotations = np.stack([np.asarray(m) for m in rows["masks"]]).astype(bool)
            for key, values in compute_metrics_batch(masks, annotations).items():
                per_image.setdefault(key, []).extend(values.tolist())
            all_samples.append(masks)
            bar.update(len(indices))
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
