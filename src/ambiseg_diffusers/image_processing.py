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
    """Binary masks {0, 1} (or bool) -> the diffusion model's {-1, +1}. Other values (0/255 masks, probabilities)
    raise ValueError rather than becoming targets outside the model's range (`data.load_multirater` reads 0/255)."""
    if masks.dtype != torch.bool and not ((masks == 0) | (masks == 1)).all():
        values = torch.unique(masks)[:6].tolist()
        raise ValueError(f"masks must be binary (0/1 or bool), got values such as {values}; load data through "
                         "ambiseg_diffusers.data.load_multirater, which reads 0/255 masks as 0/1.")
    return masks.float() * 2.0 - 1.0


# PIL modes read as they are; any other (RGB, RGBA, P, ...) is converted to greyscale for a single-channel model.
GREY_MODES = ("L", "I", "F", "I;16")


def _to_tensor(image, channels: int) -> torch.Tensor:
    """numpy / torch / PIL -> float32 tensor with the values unchanged (PIL colour -> grey for 1-channel models)."""
    if isinstance(image, PIL.Image.Image):
        if image.mode not in GREY_MODES and channels == 1:
            image = image.convert("L")  # documented: colour PIL images are read as greyscale
        image = np.asarray(image, dtype=np.float32)
    if isinstance(image, np.ndarray):
        if not (np.issubdtype(image.dtype, np.number) or image.dtype == bool) or np.iscomplexobj(image):
            raise ValueError(f"`image` must hold real numbers, got an array of dtype {image.dtype}.")
        return torch.from_numpy(np.ascontiguousarray(image)).float()
    if isinstance(image, torch.Tensor):
        if image.is_complex():
            raise ValueError(f"`image` must hold real numbers, got a tensor of dtype {image.dtype}.")
        return image.detach().cpu().float()
    raise ValueError(f"`image` must be a numpy array, torch tensor or PIL image (or a list of them), got {type(image)}.")


def _refuse_colour(shape: tuple, channels: int) -> None:
    """A trailing axis of 3 or 4 behind two larger ones is an RGB(A) image, not a batch or a 4-pixel-wide image."""
    if channels == 1 and len(shape) in (3, 4) and shape[-1] in (3, 4) and min(shape[-3:-1]) > 4:
        layout = "(H, W, C)" if len(shape) == 3 else "(B, H, W, C)"
        raise ValueError(
            f"`image` of shape {shape} looks like a colour image in {layout} layout with {shape[-1]} channels; this "
            "model takes single-channel (grey) images. Convert it first, e.g. `image[..., :3].mean(-1)` or a PIL "
            "image (colour PIL images are converted to grey)."
        )


def _as_single(image: torch.Tensor, channels: int) -> torch.Tensor:
    """(H, W), (C, H, W) or (H, W, C) -> (C, H, W)."""
    _refuse_colour(tuple(image.shape), channels)
    if image.ndim == 2 and channels == 1:
        return image[None]
    if image.ndim == 3:
        if image.shape[0] == channels:
            return image
        if image.shape[-1] == channels:
            return image.permute(2, 0, 1)
    raise ValueError(f"each `image` must be (H, W), ({channels}, H, W) or (H, W, {channels}) (this model reads "
                     f"{channels} channel(s)), got {tuple(image.shape)}.")


def prepare_images(image: ImageInput, channels: int = 1) -> list[torch.Tensor]:
    """Any supported image input -> one float32 tensor `(channels, H, W)` per image, values unchanged; the images of
    a list may differ in size (`AmbiSegImageProcessor` resizes each). The contract is [`prepare_image`]'s."""
    if isinstance(image, (list, tuple)):
        if len(image) == 0:
            raise ValueError("`image` is an empty list; expected at least one image.")
        singles = [_as_single(_to_tensor(item, channels), channels) for item in image]
    else:
        array = _to_tensor(image, channels)
        shape = tuple(array.shape)
        if 0 in shape:
            raise ValueError(f"`image` is empty: shape {shape} has a zero-length axis.")
        _refuse_colour(shape, channels)
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
                f"with C = {channels} (the channels this model reads); got shape {shape}."
            )
        singles = list(batch)
    for single in singles:
        if min(single.shape[-2:]) < 2:
            raise ValueError(f"`image` is degenerate: height and width must be at least 2 pixels, got "
                             f"{tuple(single.shape[-2:])}.")
        if not torch.isfinite(single).all():
            raise ValueError("`image` contains NaN or inf values.")
    return [single.contiguous() for single in singles]


def prepare_image(image: ImageInput, channels: int = 1) -> torch.Tensor:
    """Any supported image input -> float32 tensor `(B, channels, H, W)`, values unchanged.

    The image contract (numpy, torch or PIL; values as stored, any range; the pipeline normalises):

    | input | read as |
    |---|---|
    | `(H, W)` | one image (single-channel models) |
    | `(C, H, W)` or `(H, W, C)`, C = the model's channels | one image |
    | `(B, H, W)` | a batch (single-channel models) |
    | `(B, C, H, W)` or `(B, H, W, C)` | a batch |
    | a list of single images | a batch (here of one size; [`prepare_images`] and the pipeline take mixed sizes) |
    | PIL image | one image; colour modes (RGB, RGBA, P, ...) are converted to greyscale for single-channel models |

    Raises `ValueError` naming the layout for: colour arrays `(H, W, 3|4)` / `(B, H, W, 3|4)` given to a
    single-channel model (convert to grey first), empty or degenerate shapes (no images, fewer than 2 pixels a side),
    other ranks or channel counts, non-numeric data, and NaN or inf values.
    """
    singles = prepare_images(image, channels)
    if len({tuple(s.shape) for s in singles}) != 1:
        raise ValueError(f"all images in `image` must have one shape, got {sorted({tuple(s.shape) for s in singles})}.")
    return torch.stack(singles)
