"""Image and mask conversions shared by the pipeline, the datasets and the training scripts."""

from __future__ import annotations

from typing import Union

import numpy as np
import PIL.Image
import torch

ImageInput = Union[np.ndarray, torch.Tensor, PIL.Image.Image, list]


def normalize_image(image: torch.Tensor, clip: float = 3.0) -> torch.Tensor:
    """Per-image z-score, clipped to +-`clip` and divided by `clip`: `(B, C, H, W)` any range -> [-1, 1].

    Independent of the stored value range (Hounsfield units, z-scores or 0-255 grey levels all land in the same
    place), so the pipeline can take images exactly as a dataset stores them. A constant image maps to 0.
    """
    if clip <= 0:
        raise ValueError(f"`clip` must be > 0, got {clip}.")
    image = image.float()
    mean = image.mean(dim=(-3, -2, -1), keepdim=True)
    std = image.std(dim=(-3, -2, -1), keepdim=True, unbiased=False)
    return ((image - mean) / std.clamp_min(1e-6)).clamp(-clip, clip) / clip


def masks_to_model_range(masks: torch.Tensor) -> torch.Tensor:
    """Binary masks {0, 1} -> the diffusion model's {-1, +1}."""
    return masks.float() * 2.0 - 1.0


def _to_array(image) -> np.ndarray | torch.Tensor:
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("L") if image.mode not in ("L", "I", "F", "I;16") else image, dtype=np.float32)
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return image
    raise ValueError(f"`image` must be a numpy array, torch tensor or PIL image (or a list of them), got {type(image)}.")


def _as_single(image: torch.Tensor, channels: int) -> torch.Tensor:
    """(H, W), (C, H, W) or (H, W, C) -> (C, H, W)."""
    if image.ndim == 2 and channels == 1:
        return image[None]
    if image.ndim == 3:
        if image.shape[0] == channels:
            return image
        if image.shape[-1] == channels:
            return image.permute(2, 0, 1)
    raise ValueError(f"each `image` must be (H, W), ({channels}, H, W) or (H, W, {channels}), got {tuple(image.shape)}.")


def prepare_image(image: ImageInput, channels: int = 1) -> torch.Tensor:
    """Any supported image input -> float32 tensor `(B, channels, H, W)`, values unchanged.

    Accepted: one image as (H, W) (single channel only), (C, H, W) or (H, W, C); a batch as (B, H, W)
    (single channel), (B, C, H, W) or (B, H, W, C); or a list of single images of one size. numpy, torch and PIL.
    Raises `ValueError` for other shapes, channel counts, an empty list, or NaN/inf values.
    """
    if isinstance(image, (list, tuple)):
        if len(image) == 0:
            raise ValueError("`image` is an empty list; expected at least one image.")
        singles = [_as_single(torch.as_tensor(_to_array(item)).float(), channels) for item in image]
        if len({tuple(s.shape) for s in singles}) != 1:
            raise ValueError(f"all images in `image` must have one shape, got {sorted({tuple(s.shape) for s in singles})}.")
        batch = torch.stack(singles)
    else:
        array = torch.as_tensor(_to_array(image)).float()
        if array.ndim == 2 or (array.ndim == 3 and (array.shape[0] == channels or array.shape[-1] == channels)):
            batch = _as_single(array, channels)[None]
        elif array.ndim == 3 and channels == 1:
            batch = array[:, None]
        elif array.ndim == 4 and array.shape[1] == channels:
            batch = array
        elif array.ndim == 4 and array.shape[-1] == channels:
            batch = array.permute(0, 3, 1, 2)
        else:
            raise ValueError(
                f"`image` must be (H, W), (C, H, W), (H, W, C) or batched (B, H, W), (B, C, H, W), (B, H, W, C) "
                f"with C = {channels}; got shape {tuple(array.shape)}."
            )
    if not torch.isfinite(batch).all():
        raise ValueError("`image` contains NaN or inf values.")
    return batch.contiguous()
