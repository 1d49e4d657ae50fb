"""ProbUNetPipeline: the Probabilistic U-Net baseline, loaded, saved and called like `AmbiSegPipeline`."""

from __future__ import annotations

import functools
import os

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from ..hub_utils import (
    check_finite_weights, check_pipeline_class, check_weight_files, download_kwargs_of, resolve_pretrained_path,
)
from ..image_processing import ImageInput
from ..image_processor import AmbiSegImageProcessor
from ..models.prob_unet import ProbUNetModel
from .custom_code import CustomCodeLayoutMixin
from .pipeline_output import OUTPUT_TYPES, AmbiSegPipelineOutput, format_samples, tuple_order
from .prompt_handling import PromptInput

logger = logging.get_logger(__name__)


class ProbUNetPipeline(CustomCodeLayoutMixin, DiffusionPipeline):
    r"""Samples plausible masks from a Probabilistic U-Net (Kohl et al. 2018): one U-Net pass per image, then one
    cheap 1x1 "fcomb" pass per latent z ~ p(z | image). The baseline of the comparison tables in docs/results.md.

    Args:
        prob_unet ([`ProbUNetModel`]): the U-Net with its prior and posterior nets.
        image_processor ([`AmbiSegImageProcessor`], optional): the training size, resizing and normalisation;
            `None` = version 0.1's behaviour (each image at its own size, the clip recorded on the model, else 3.0).
        image_clip (`float`, optional): version 0.1's setting (old `model_index.json` files), read into the default
            image processor only.
    """

    model_cpu_offload_seq = "prob_unet"
    _optional_components = ["image_processor"]

    def __init__(self, prob_unet: ProbUNetModel, image_processor: AmbiSegImageProcessor | None = None,
                 image_clip: float | None = None):
        super().__init__()
        if image_processor is None and image_clip is not None and prob_unet is not None:  # a version-0.1 folder
            image_processor = AmbiSegImageProcessor.for_unet(prob_unet, image_clip)
        self.register_modules(prob_unet=prob_unet, image_processor=image_processor)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "ProbUNetPipeline":
        """Loads from a local folder or a Hub repo id (fetched whole with `snapshot_download`, which honours
        `HF_HUB_OFFLINE` and the cache), as float32 unless `dtype` is given; weight files are checked before
        loading and every weight is checked finite after."""
        download_kwargs = download_kwargs_of(kwargs)
        if "torch_dtype" not in kwargs:
            kwargs.setdefault("dtype", torch.float32)
        path = resolve_pretrained_path(pretrained_model_name_or_path, **download_kwargs)
        check_pipeline_class(path, cls)
        check_weight_files(path)
        pipe = super().from_pretrained(path, **kwargs)
        check_finite_weights(pipe, path)
        return pipe

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """Images as stored (any range) -> the model's normalised input `(B, C, size, size)` in [-1, 1]."""
        return self._image_processor().preprocess(image)[0]

    def _image_processor(self) -> AmbiSegImageProcessor:
        return self.image_processor or AmbiSegImageProcessor.for_unet(self.prob_unet)

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput,
        prompt: PromptInput = None,
        num_samples: int = 16,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prior_temperature: float = 1.0,
        threshold: float = 0.5,
        num_inference_steps: int | None = None,
        batch_size: int | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        **kwargs,
    ) -> AmbiSegPipelineOutput | tuple:
        r"""
        Args:
            image: one image or a batch, as [`prepare_image`] documents; stored values (the pipeline normalises).
            prompt: accepted for a drop-in swap with [`AmbiSegPipeline`] and **ignored**: the Probabilistic U-Net
                has no text input (a warning says so when a non-empty prompt is given).
            num_samples (`int`): masks per image, each from its own z ~ p(z | image).
            generator: one `torch.Generator`, or one per image (then each image's samples do not depend on the
                others in the batch).
            prior_temperature (`float` >= 0): scale of the prior's standard deviation; 0 gives the prior mean.
            threshold (`float` in (0, 1)): probability above which a pixel is foreground.
            num_inference_steps: must be `None` (there are no denoising steps); accepted so that evaluation code
                written for diffusion pipelines runs unchanged.
            batch_size: samples decoded per 1x1-head call (memory only; default: all of an image's at once).
            output_type: "np" (default), "pt" or "pil".
            return_dict: an [`AmbiSegPipelineOutput`] (True) or a tuple `(probabilities, masks, pixel_mean,
                pixel_variance)` (`masks_first=True`: version 0.1.0's order, deprecated, until 0.3.0).

        Returns:
            [`AmbiSegPipelineOutput`]: `probabilities` in [0, 1] `(batch, num_samples, H, W)`, `masks` bool of the
            same shape, `pixel_mean` and `pixel_variance` `(batch, H, W)`.
        """
        masks_first = tuple_order(kwargs, return_dict)
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"`num_samples` must be a positive integer, got {num_samples!r}.")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"`threshold` must be in (0, 1), got {threshold!r}.")
        if prior_temperature < 0:
            raise ValueError(f"`prior_temperature` must be >= 0, got {prior_temperature!r}.")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size!r}.")
        if num_inference_steps is not None:
            raise ValueError("`num_inference_steps` must be None: the Probabilistic U-Net samples in one pass.")
        if output_type not in OUTPUT_TYPES or output_type == "latent":
            raise ValueError(f"`output_type` must be 'np', 'pt' or 'pil', got {output_type!r}.")
        if prompt not in (None, "") and any(p for p in _flatten(prompt)):
            _warn_prompt_ignored()

        model = self.prob_unet
        device = self._execution_device
        images, image_sizes = self._image_processor().preprocess(image)
        images = images.to(device=device, dtype=model.dtype)
        batch = images.shape[0]
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"`generator` is a list of {len(generator)}; expected one per image ({batch}).")
        generators = generator if isinstance(generator, list) else [generator] * batch

        features = model.features(images)
        prior = model.prior_distribution(images)
        probabilities = []
        for i in range(batch):
            noise = randn_tensor((num_samples, model.config.latent_dim), generator=generators[i], device=device,
                                 dtype=images.dtype)
            z = prior.mean[i] + prior_temperature * prior.std[i] * noise
            chunks = z.split(batch_size or num_samples)
            logits = torch.cat([model.decode(features[i : i + 1].expand(len(c), -1, -1, -1), c) for c in chunks])
            probabilities.append(torch.sigmoid(logits.float())[:, 0])
        probabilities, masks = self._image_processor().postprocess(torch.stack(probabilities), image_sizes, threshold)
        return format_samples(probabilities, masks, output_type, return_dict, masks_first)


@functools.lru_cache(maxsize=1)
def _warn_prompt_ignored() -> None:
    """Once per process: evaluation code passes prompts on every call."""
    logger.warning("ProbUNetPipeline ignores `prompt`: the Probabilistic U-Net sees the image only.")


def _flatten(prompt) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    return [p for item in prompt for p in _flatten(item)]
