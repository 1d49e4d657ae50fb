"""`AmbiSegImageProcessor`: what training decided about images and masks, applied the same way everywhere.

A pipeline component saved in its own folder (`image_processor/preprocessor_config.json`), as diffusers pipelines
carry a `feature_extractor`: training resizes its batches with it, evaluation and preference building read data at
its size, and `__call__` resizes any accepted image to it and hands probabilities and masks back at each input's own
size (transformers' `post_process_semantic_segmentation(target_sizes=...)`).

Why a diffusers `ConfigMixin` that is also a transformers `ImageProcessingMixin`: the config is diffusers' (declared
in `__init__`, `processor.config.size`, `from_config`), but diffusers' pipeline loader only saves and loads components
whose class derives from one it knows (`LOADABLE_CLASSES`), and `ConfigMixin` is not among them while transformers'
`ImageProcessingMixin` is. Deriving from it (its `save_pretrained` / `from_pretrained` replaced by the config's) lets
`DiffusionPipeline.from_pretrained` and this package's loaders read and write the folder with no hook.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import logging
from transformers.image_processing_base import ImageProcessingMixin

from .image_processing import ImageInput, normalize_image, prepare_image, prepare_images

logger = logging.get_logger(__name__)

IMAGE_MODES = ("bilinear", "bicubic", "nearest", "nearest-exact", "area")
MASK_MODES = ("nearest", "nearest-exact")


class AmbiSegImageProcessor(ConfigMixin, ImageProcessingMixin):
    r"""Resizes and normalises images for the model, and brings its samples back to each image's size.

    Args:
        size (`int`, 64): the side of the square crops the model was trained on (its UNet's `sample_size`).
        image_channels (`int`, 1): the channels of the images the model reads.
        do_resize (`bool`, True): resize inputs of another size to `size` (False: sample at the input's size, which
            must then be a multiple of the UNet's downsampling factor).
        resample (`str`, "bilinear"): `torch.nn.functional.interpolate` mode for images (and for probabilities on
            the way back).
        mask_resample (`str`, "nearest-exact"): the mode for binary rater masks (training data), which must stay
            binary; "nearest-exact" samples each output pixel's centre, so a 2x resize keeps a mask in place.
        do_normalize (`bool`, True): per-image z-score clipped to +-`image_clip`, into [-1, 1] ([`normalize_image`]).
        image_clip (`float`, 3.0): the clip of that normalisation.
        min_scale, max_scale (`float`, 0.5 and 4.0): input sides outside [`min_scale` x `size`, `max_scale` x `size`]
            are resized with a warning: a side under half the training size has lost detail the model saw, and one
            over four times it is most likely a larger field of view (a whole CT slice) than the crop the model
            expects, which no resize repairs.
    """

    config_name = "preprocessor_config.json"

    @register_to_config
    def __init__(
        self,
        size: int = 64,
        image_channels: int = 1,
        do_resize: bool = True,
        resample: str = "bilinear",
        mask_resample: str = "nearest-exact",
        do_normalize: bool = True,
        image_clip: float = 3.0,
        min_scale: float = 0.5,
        max_scale: float = 4.0,
    ):
        if int(size) < 2:
            raise ValueError(f"`size` must be at least 2 pixels, got {size}.")
        if resample not in IMAGE_MODES:
            raise ValueError(f"`resample` must be one of {IMAGE_MODES}, got {resample!r}.")
        if mask_resample not in MASK_MODES:
            raise ValueError(f"`mask_resample` must be one of {MASK_MODES} (masks must stay binary), got "
                             f"{mask_resample!r}.")
        if image_clip <= 0:
            raise ValueError(f"`image_clip` must be > 0, got {image_clip}.")
        if not 0 < min_scale <= 1 <= max_scale:
            raise ValueError(f"`min_scale` must be in (0, 1] and `max_scale` >= 1, got {min_scale} and {max_scale}.")

    # ------------------------------------------------------------------------------------------ saving, loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        **kwargs) -> "AmbiSegImageProcessor":
        """Reads `preprocessor_config.json` from a folder (diffusers' pipeline loader calls this per component)."""
        return cls.from_config(cls.load_config(pretrained_model_name_or_path, subfolder=subfolder, **kwargs))

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Writes `preprocessor_config.json` into `save_directory`."""
        self.save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def for_unet(cls, unet, image_clip: float | None = None) -> "AmbiSegImageProcessor":
        """The processor of a pipeline folder saved before processors existed, from its model: the UNet's
        `sample_size` (a model whose config has none, the Probabilistic U-Net's, keeps each input's size, as version
        0.1 did), its image channels and the image clip the folder recorded (else 3.0)."""
        legacy = unet.config.get("_pipeline_settings") or {}  # the private record of version 0.1
        clip = image_clip if image_clip is not None else legacy.get("image_clip", 3.0)
        size = unet.config.get("sample_size")
        channels = unet.config.get("image_channels") or unet.image_channels  # AmbiSegUNet: a property
        return cls(size=int(size or 64), do_resize=size is not None, image_channels=int(channels), image_clip=float(clip))

    # ------------------------------------------------------------------------------------------ images in
    def check_size(self, height: int, width: int) -> None:
        """Warns, naming what the model expects, when an input is not square or its sides are far from `size`."""
        size, low, high = self.config.size, self.config.min_scale, self.config.max_scale
        expects = (f"this model expects {size}x{size} crops centred on the structure to segment (a "
                   f"{self.config.image_channels}-channel image; AmbiSegImageProcessor.config.size)")
        if height != width and self.config.do_resize:
            logger.warning(f"`image` is {height}x{width} (height x width), not square: resizing it to {size}x{size} "
                           f"stretches it; {expects}. Crop it square first; masks come back at {height}x{width}.")
        if min(height, width) < low * size or max(height, width) > high * size:
            logger.warning(f"`image` is {height}x{width} pixels, outside {int(low * size)}-{int(high * size)} "
                           f"({low}x-{high}x the training size); {expects}. Crop the region of interest first.")

    def resize(self, images: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Images `(B, C, H, W)` (values as stored) -> `(B, C, *size)` by `resample` (default size: the model's)."""
        size = size or (self.config.size, self.config.size)
        if tuple(images.shape[-2:]) == tuple(size):
            return images
        return F.interpolate(images.float(), size=size, **_mode(self.config.resample))

    def resize_masks(self, masks: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Binary masks `(B, M, H, W)` in {0, 1} -> `(B, M, *size)` by `mask_resample`, still in {0, 1}."""
        size = size or (self.config.size, self.config.size)
        if tuple(masks.shape[-2:]) == tuple(size):
            return masks
        return F.interpolate(masks.float(), size=size, mode=self.config.mask_resample).to(masks.dtype)

    def resize_pair(self, image: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A dataset row's image `(H, W)` / `(C, H, W)` and its masks `(M, H, W)` {0, 1} at the model's size, as
        training reads them (values as stored, uint8 masks)."""
        picture = torch.as_tensor(np.asarray(image), dtype=torch.float32)
        picture = self.resize(picture[None, None] if picture.ndim == 2 else picture[None])[0]
        raters = self.resize_masks(torch.as_tensor(np.asarray(masks), dtype=torch.float32)[None])[0]
        return (picture[0] if np.ndim(image) == 2 else picture).numpy(), raters.to(torch.uint8).numpy()

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """`(B, C, H, W)` as stored -> the model's range [-1, 1] (unchanged when `do_normalize` is False)."""
        return normalize_image(images, self.config.image_clip) if self.config.do_normalize else images.float()

    def preprocess(self, image: ImageInput) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Any accepted input ([`prepare_image`]; a list may mix sizes) -> the model's input `(B, C, size, size)`
        in [-1, 1] and each image's own `(H, W)`, for `postprocess`.

        Raises `ValueError` naming the channels the model expects when an image has others.
        """
        singles = prepare_images(image, self.config.image_channels)
        sizes = [tuple(single.shape[-2:]) for single in singles]
        for height, width in dict.fromkeys(sizes):
            self.check_size(height, width)
        if not self.config.do_resize:
            if len(set(sizes)) > 1:
                raise ValueError(f"`image` holds images of several sizes {sorted(set(sizes))}; with `do_resize=False` "
                                 "every image must have one size.")
            return self.normalize(torch.stack(singles)), sizes
        return self.normalize(torch.cat([self.resize(single[None]) for single in singles])), sizes

    # ------------------------------------------------------------------------------------------ samples out
    def postprocess(
        self, probabilities: torch.Tensor, sizes: list[tuple[int, int]], threshold: float = 0.5,
    ) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor | list[torch.Tensor]]:
        """Samples `(B, N, h, w)` in [0, 1] at the model's size -> probabilities and bool masks at each image's size.

        The probabilities are resized by `resample` (bilinear: smooth, still in [0, 1]) and the masks are those
        resized probabilities `> threshold`, so a mask's boundary falls between pixels where the probability crosses
        the threshold rather than on the model's coarser grid. Returns tensors `(B, N, H, W)` when every image has
        one size, else a list of `(N, H_b, W_b)` per image.
        """
        resized = [self.resize(p[None], size)[0].clamp(0.0, 1.0) for p, size in zip(probabilities.float(), sizes)]
        masks = [p > threshold for p in resized]
        if len(set(sizes)) == 1:
            return torch.stack(resized), torch.stack(masks)
        return resized, masks


def _mode(mode: str) -> dict:
    """`interpolate` keyword arguments of a mode (`align_corners` exists for the linear ones only)."""
    return {"mode": mode, "align_corners": False} if mode in ("bilinear", "bicubic") else {"mode": mode}
