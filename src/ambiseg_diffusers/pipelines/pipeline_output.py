"""The pipelines' output: `AmbiSegPipelineOutput`, its formats (`output_type`) and version 0.1.0's tuple order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput, logging

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("np", "pt", "pil", "latent")


@dataclass
class AmbiSegPipelineOutput(BaseOutput):
    """
    Args:
        probabilities: float in [0, 1], `(batch, num_samples, H, W)`: each sample before thresholding. First, as
            diffusers' `images` are: `output[0]` is the pipeline's continuous output.
        masks: bool `(batch, num_samples, H, W)`: the sampled segmentations (`probabilities > threshold`). With
            `output_type="latent"`: the final denoised samples `(batch * num_samples, mask_channels, H, W)` in [-1, 1],
            before thresholding (then the only field, so also `output[0]`).
        pixel_mean: float in [0, 1] `(batch, H, W)`: mean of `probabilities` over the samples.
        pixel_variance: float in [0, 0.25] `(batch, H, W)`: variance of `probabilities` over the samples, an
            uncertainty map (largest where the samples disagree).
    """

    probabilities: Union[np.ndarray, torch.Tensor, list, None] = None
    masks: Union[np.ndarray, torch.Tensor, list, None] = None
    pixel_mean: Union[np.ndarray, torch.Tensor, None] = None
    pixel_variance: Union[np.ndarray, torch.Tensor, None] = None


# Version 0.1.0's `return_dict=False` tuple began with the masks; 0.2.0 puts the probabilities first (diffusers'
# order: the continuous output first) and accepts `masks_first=True` for the old order until this version.
MASKS_FIRST_REMOVAL = "0.3.0"
_tuple_order_told = False


def tuple_order(call_kwargs: dict, return_dict: bool) -> bool:
    """Pops the deprecated `masks_first` keyword of a call (refusing any other unknown one) -> whether the tuple
    starts with the masks. A plain `return_dict=False` call says once per process that the order changed."""
    global _tuple_order_told
    masks_first = bool(call_kwargs.pop("masks_first", False))
    if call_kwargs:
        raise TypeError(f"unexpected keyword argument(s) {sorted(call_kwargs)}.")
    if masks_first:
        from ..deprecation import deprecate

        deprecate("masks_first", MASKS_FIRST_REMOVAL, "Since 0.2.0 `return_dict=False` gives (probabilities, masks, "
                  "pixel_mean, pixel_variance); unpack it in that order, or read the output's named fields.")
    elif not return_dict and not _tuple_order_told:
        _tuple_order_told = True
        logger.warning("since ambiseg-diffusers 0.2.0 `return_dict=False` gives (probabilities, masks, pixel_mean, "
                       "pixel_variance), the masks second; code written for 0.1.0 (masks first) may pass "
                       f"`masks_first=True` until {MASKS_FIRST_REMOVAL} (CHANGELOG.md).")
    return masks_first


def format_samples(probabilities, masks, output_type: str, return_dict: bool, masks_first: bool = False):
    """Probabilities in [0, 1] and bool masks, `(batch, num_samples, H, W)` tensors or a list of `(num_samples, H_b,
    W_b)` per image (images of several sizes) -> the pipeline output of `output_type` (`masks_first`: version
    0.1.0's tuple order, deprecated)."""
    per_image = isinstance(probabilities, list)
    probabilities, masks = list(probabilities), list(masks)  # one (num_samples, H_b, W_b) entry per image
    pixel_mean = [p.mean(dim=0) for p in probabilities]
    pixel_variance = [p.var(dim=0, unbiased=False) for p in probabilities]
    if output_type == "pil":
        masks = [[PIL.Image.fromarray(m.cpu().numpy().astype(np.uint8) * 255) for m in per] for per in masks]
        probabilities = [[PIL.Image.fromarray((p.cpu().numpy() * 255).round().astype(np.uint8)) for p in per]
                         for per in probabilities]
    elif output_type == "np":
        masks, probabilities = [m.cpu().numpy() for m in masks], [p.cpu().numpy() for p in probabilities]
    if output_type in ("np", "pil"):
        pixel_mean, pixel_variance = [m.cpu().numpy() for m in pixel_mean], [v.cpu().numpy() for v in pixel_variance]
    if not per_image:  # one size: stacked arrays, as before
        stack = np.stack if output_type in ("np", "pil") else torch.stack
        pixel_mean, pixel_variance = stack(pixel_mean), stack(pixel_variance)
        if output_type != "pil":
            probabilities, masks = stack(probabilities), stack(masks)
    if not return_dict:
        first, second = (masks, probabilities) if masks_first else (probabilities, masks)
        return first, second, pixel_mean, pixel_variance
    return AmbiSegPipelineOutput(probabilities=probabilities, masks=masks, pixel_mean=pixel_mean, pixel_variance=pixel_variance)
