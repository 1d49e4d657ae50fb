"""AmbiSegPipeline: sample a distribution of plausible segmentation masks for an image and a prompt.

This file holds the pipeline's components, its configuration and the sampling loop, written out in `__call__` as
diffusers' `pipeline_stable_diffusion.py` writes its own; beside it: input checking (`input_checks.py`), prompt
handling (`prompt_handling.py`), the output (`pipeline_output.py`) and loading and saving (`pipeline_loading.py`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from ..image_processing import ImageInput
from ..image_processor import AmbiSegImageProcessor
from ..lidc import RECORDED_PROMPT_STYLES
from ..models import AmbiguityEncoder, AmbiSegUNet
from .custom_code import CustomCodeLayoutMixin
from .input_checks import SAMPLE_PREDICTION_SCHEDULERS, InputChecksMixin  # noqa: F401  (re-exported)
from .pipeline_loading import (  # noqa: F401  (re-exported: their names in version 0.1)
    ADAPTER_FILE, CONSISTENCY_FILE, LORA_WEIGHT_NAME, PREFERENCE_ADAPTER, AmbiSegLoadingMixin, recommended_steps,
)
from .pipeline_output import (  # noqa: F401  (re-exported)
    MASKS_FIRST_REMOVAL, OUTPUT_TYPES, AmbiSegPipelineOutput, format_samples, tuple_order,
)
from .pipeline_settings import legacy_settings
from .prompt_handling import PromptEncodingMixin, PromptInput, rows_of

logger = logging.get_logger(__name__)

# The recommended number of denoising steps of the committed checkpoint with its scheduler (UniPC, 6 steps: the
# default-quality sweep of issue 40, docs/results.md); `__call__`'s default.
DEFAULT_NUM_INFERENCE_STEPS = 6
AUTOCAST_MODES = ("auto", "bf16", "no")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively, so autocast speeds it up instead of emulating."""
    if device.type == "cuda":
        # Ampere (compute capability 8.0) and newer compute bf16 natively; `torch.cuda.is_bf16_supported()` also
        # counts the emulated bf16 of older GPUs (T4, V100), which is slower than float32 there.
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    logger.warning(message)


class AmbiSegPipeline(AmbiSegLoadingMixin, PromptEncodingMixin, InputChecksMixin, CustomCodeLayoutMixin, DiffusionPipeline,
                      StableDiffusionLoraLoaderMixin):
    r"""Ambiguous segmentation by mask diffusion (AmbiSeg).

    The image is a fixed condition concatenated to the noisy mask; the prompt steers the denoiser through
    cross-attention; each sample draws its own ambiguity latent `z ~ p(z | image, prompt)` from the prior.

    Components (`unet`, `scheduler`, `text_encoder` and `tokenizer` are required arguments, the others optional; any
    may be `None`, and `__call__` says which one it needs):
        unet ([`AmbiSegUNet`]): the mask denoiser.
        scheduler: a diffusers scheduler of the model's prediction type: for the x0-predicting checkpoints one of
            `SAMPLE_PREDICTION_SCHEDULERS` (DDIM, DDPM, DPM-Solver++, UniPC, DEIS, Euler, Heun, LMS, LCM, TCD, ...).
        text_encoder ([`~transformers.PreTrainedModel`]): frozen BERT-style encoder; its last hidden states are used.
        tokenizer ([`~transformers.PreTrainedTokenizer`]).
        prior ([`AmbiguityEncoder`], optional): p(z | image, prompt); a UNet that takes an ambiguity latent samples
            with it (or with given `ambiguity_latents`).
        posterior ([`AmbiguityEncoder`], optional): q(z | image, prompt, mask), used by training only.
        image_processor ([`AmbiSegImageProcessor`], optional): what training decided about images (size, resizing,
            normalisation, channels); `None` = calls use one built from the UNet (`AmbiSegImageProcessor.for_unet`:
            its `sample_size` and channels, the normalisation of version 0.1); a folder saved by version 0.1 (no
            processor, an `image_clip` in its `model_index.json`) gets that one as its component.

    Configuration (`model_index.json`; `from_pipe` carries it, `AmbiSegPipeline(**pipe.components, ...)` takes it as
    keywords, as diffusers pipelines take theirs):
        autocast (`str`, "auto"): the default precision of a call: "auto" (bf16 autocast where the hardware computes
            bf16 natively: CUDA GPUs that support it, CPUs with AVX512-BF16 or AMX; float32 elsewhere), "bf16" or "no".
        prompt_style (`str`, "paper"): the form of the prompts the model was trained on: "paper", "ratings",
            "short" or "slice" (LIDC ratings as text, see [`ratings_to_prompt`]; data loaders and scripts build LIDC
            prompts in it), or "free" (a dataset's own text, used as stored).

    The recommended number of denoising steps is `__call__`'s default. `image_clip` and `default_num_inference_steps`
    (version 0.1's settings, in old `model_index.json` files and UNet configs) are still read: the clip into the
    default image processor, the step count compared with `__call__`'s default (a warning names one that differs).

    LoRA adapters load the diffusers way (`load_lora_weights`, `set_adapters`, `fuse_lora`, `unload_lora_weights`).
    A TDG-DiffDPO checkpoint is such an adapter, named "preference"; `preference_scale` sets its weight.

    Samples, not images per prompt: where diffusers pipelines take `num_images_per_prompt`, this one takes
    `num_samples`, and its outputs keep them on their own axis, `(batch, num_samples, H, W)`, because every metric of
    ambiguous segmentation (GED, coverage, ...) is computed over one image's set of samples.
    """

    model_cpu_offload_seq = "text_encoder->prior->unet"
    # What sampling runs without. The first four are required arguments (diffusers reads a defaulted one as
    # configuration); each may still be None, and a call says which one it is missing.
    _optional_components = ["prior", "posterior", "image_processor"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds", "ambiguity_latents"]

    def __init__(
        self,
        unet: AmbiSegUNet | None,
        scheduler: KarrasDiffusionSchedulers | None,
        text_encoder,
        tokenizer,
        prior: AmbiguityEncoder | None = None,
        posterior: AmbiguityEncoder | None = None,
        image_processor: AmbiSegImageProcessor | None = None,
        autocast: str | None = None,
        prompt_style: str | None = None,
        image_clip: float | None = None,
        default_num_inference_steps: int | None = None,
    ):
        super().__init__()
        # `None`: what a version-0.1 UNet recorded (`_pipeline_settings`), else the defaults
        legacy = legacy_settings(unet, image_clip=image_clip, default_num_inference_steps=default_num_inference_steps)
        autocast = autocast or legacy.get("autocast", "auto")
        prompt_style = prompt_style or legacy.get("prompt_style", "paper")
        if autocast not in AUTOCAST_MODES:
            raise ValueError(f"`autocast` must be one of {AUTOCAST_MODES}, got {autocast!r}.")
        if prompt_style not in RECORDED_PROMPT_STYLES:
            raise ValueError(f"`prompt_style` must be one of {RECORDED_PROMPT_STYLES}, got {prompt_style!r}.")
        steps = legacy.get("default_num_inference_steps")
        if steps is not None and int(steps) != DEFAULT_NUM_INFERENCE_STEPS:
            logger.warning(f"this pipeline recorded {steps} default denoising steps (version 0.1's "
                           f"`default_num_inference_steps`); `__call__` now defaults to {DEFAULT_NUM_INFERENCE_STEPS}: "
                           f"pass `num_inference_steps={steps}` to sample as before.")
        if image_processor is None and image_clip is not None and unet is not None:  # a version-0.1 folder
            image_processor = AmbiSegImageProcessor.for_unet(unet, image_clip)
        if (unet is not None and text_encoder is not None and unet.dtype == torch.float32
                and text_encoder.dtype in (torch.float16, torch.bfloat16)
                and not getattr(text_encoder, "is_quantized", False)):  # a quantized encoder cannot be cast
            # Checkpoints store the frozen encoder in half precision to stay small; a float32 UNet reads float32
            # text states whichever loader built the pipeline (DiffusionPipeline.from_pretrained keeps stored dtypes).
            text_encoder = text_encoder.to(torch.float32)
        self.register_modules(
            unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer, prior=prior,
            posterior=posterior, image_processor=image_processor,
        )
        self.register_to_config(autocast=autocast, prompt_style=prompt_style)

    # ---------------------------------------------------------------------------------------------- properties
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def cross_attention_kwargs(self) -> dict | None:
        return getattr(self, "_cross_attention_kwargs", None)

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # ---------------------------------------------------------------------------------------------- building blocks
    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """Images as stored (any range, any accepted size) -> the model's input `(B, C, size, size)` in [-1, 1], as
        the image processor makes it (resized to the training size, normalised)."""
        return self._image_processor().preprocess(image)[0]

    def _image_processor(self) -> AmbiSegImageProcessor:
        """The pipeline's image processor, or the UNet's default where it was set to None."""
        if self.image_processor is not None:
            return self.image_processor
        return AmbiSegImageProcessor.for_unet(self.unet)

    def prepare_ambiguity_latents(
        self, images: torch.Tensor, prompt_embeds: torch.Tensor, prompt_attention_mask: torch.Tensor,
        num_samples: int, prior_temperature: float, generator,
    ) -> torch.Tensor:
        """One `z ~ p(z | image, prompt)` per sample row: `(batch * num_samples, latent_dim)`.

        The prior depends only on (image, prompt), so it runs once per distinct pair, not once per sample.
        """
        if self.prior is None:
            raise ValueError("this UNet is conditioned on an ambiguity latent but the pipeline has no `prior`; "
                             "set `pipe.prior` or pass `ambiguity_latents`.")
        rows = images.shape[0] * num_samples
        text_key = torch.cat([prompt_embeds.flatten(1), prompt_attention_mask.to(prompt_embeds.dtype)], dim=1)
        _, prompt_id = torch.unique(text_key, dim=0, return_inverse=True)
        pair = torch.arange(images.shape[0], device=images.device).repeat_interleave(num_samples) * rows + prompt_id
        pairs, pair_of_row = torch.unique(pair, return_inverse=True)
        first_row = torch.zeros_like(pairs).scatter_(0, pair_of_row, torch.arange(rows, device=images.device))
        prior = self.prior(images[pairs // rows], prompt_embeds[first_row], prompt_attention_mask[first_row])
        # Under a device_map the prior may sit on another GPU, and accelerate's hooks do not move a dataclass output
        # back: index and sample where the prior's output is, then bring z to the UNet's inputs.
        rows_prior = prior.select(pair_of_row.to(prior.mean.device))
        noise_shape, where = (num_samples, rows_prior.mean.shape[1]), dict(device=rows_prior.mean.device,
                                                                          dtype=rows_prior.mean.dtype)
        if isinstance(generator, list) and len({id(g) for g in generator}) == rows:  # one per sample: its own z
            noise = torch.cat([randn_tensor((1, noise_shape[1]), generator=g, **where) for g in generator])
        elif isinstance(generator, list):  # per row: image b's block of samples from its own generator in one draw,
            # as a call on image b alone draws it (torch draws fewer than 16 normals another way than a block)
            noise = torch.cat([randn_tensor(noise_shape, generator=generator[b * num_samples], **where)
                               for b in range(images.shape[0])])
        else:
            noise = randn_tensor((rows, noise_shape[1]), generator=generator, **where)
        return rows_prior.sample(noise=noise, temperature=prior_temperature).to(images.device)

    def prepare_latents(self, shape: tuple, dtype, device, generator, latents: torch.Tensor | None = None) -> torch.Tensor:
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def prepare_extra_step_kwargs(self, generator, eta: float) -> dict:
        # Only some schedulers take `eta` (DDIM) or a `generator` (the stochastic ones).
        params = set(inspect.signature(self.scheduler.step).parameters)
        extra = {}
        if "eta" in params:
            extra["eta"] = eta
        if "generator" in params:
            extra["generator"] = generator
        return extra

    def _row_generators(self, generator, batch: int, num_samples: int):
        """A per-image generator list becomes a per-row list, so each image's samples are independent of batching;
        a list of one per sample (diffusers' habit: one per output) is already per row."""
        if isinstance(generator, list):
            if len(generator) == batch * num_samples and batch * num_samples != batch:
                return list(generator)
            if len(generator) != batch:
                raise ValueError(f"`generator` is a list of {len(generator)}; expected one per image ({batch}) or one "
                                 f"per sample ({batch * num_samples}).")
            return [g for g in generator for _ in range(num_samples)]
        return generator

    def _denoise_rows(self, latent_input, t, images, embeds, mask, z, negative_embeds, negative_mask) -> torch.Tensor:
        """One UNet evaluation for a chunk of rows, with classifier-free guidance when negative embeddings are given."""
        if negative_embeds is not None:
            # Unconditional rows (negative prompt, same image and z) after the conditional ones.
            latent_input, images = torch.cat([latent_input, latent_input]), torch.cat([images, images])
            embeds, mask = torch.cat([embeds, negative_embeds]), torch.cat([mask, negative_mask])
            z = None if z is None else torch.cat([z, z])
        output = self.unet(
            torch.cat([images, latent_input], dim=1), t, encoder_hidden_states=embeds, encoder_attention_mask=mask,
            class_labels=z, cross_attention_kwargs=self.cross_attention_kwargs,
        ).sample
        if negative_embeds is not None:
            conditional, unconditional = output.chunk(2)
            output = unconditional + self.guidance_scale * (conditional - unconditional)
        return output

    # ---------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput = None,
        prompt: PromptInput = None,
        num_samples: int = 16,
        num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS,
        guidance_scale: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        prior_temperature: float = 1.0,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        ambiguity_latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        threshold: float = 0.5,
        batch_size: int = 64,
        preference_scale: float | None = None,
        autocast: str | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, Any, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        **kwargs,
    ) -> AmbiSegPipelineOutput | tuple:
        r"""
        Args:
            image: one image or a batch, numpy / torch / PIL, shaped (H, W), (1, H, W), (H, W, 1), (B, H, W),
                (B, 1, H, W), (B, H, W, 1) or a list of images (of any sizes); any value range. The image processor
                resizes each to the size the model was trained at and normalises it as training did; the outputs
                come back at each image's own size. The model expects the field of view it was trained on (LIDC
                checkpoints: a 64-pixel crop centred on the nodule at the scan's own pixel spacing); non-square
                images and sides outside 0.5x-4x the training size are segmented with a warning
                ([`AmbiSegImageProcessor`]).
            prompt: a string for every image, a list with one string per image, or a list of lists (several
                prompts per image; sample `s` uses prompt `s % len(prompts)`). `None` = the empty prompt.
            num_samples: masks to sample per image (>= 1); diffusers' `num_images_per_prompt` for this task.
            num_inference_steps: denoising steps; the default is the committed checkpoint's recommendation with its
                scheduler (UniPC, 6; `None` also means it). A distilled sampler states its own (its card).
            guidance_scale: classifier-free guidance on the text (1 = off; needs a model trained with prompt dropout).
            negative_prompt: the unconditional prompt of guidance (default: the empty prompt).
            prior_temperature: scales the prior's standard deviation (0 = always the prior mean).
            eta: DDIM's eta (ignored by other schedulers).
            generator: a `torch.Generator`, or one per image: then image `b`'s samples are those of a call on image
                `b` alone with `[generator[b]]`, whatever the batch (diffusers' batch-vs-single convention); or one
                per sample (`batch * num_samples`, row `b * num_samples + s`), diffusers' one per output.
            latents: pre-drawn initial noise `(batch * num_samples, mask_channels, size, size)` at the model's size
                (`image_processor.config.size`), row `b * num_samples + s` for sample `s` of image `b`; `None` = drawn
                from `generator`.
            ambiguity_latents: the ambiguity latents `z` `(batch * num_samples, latent_dim)`; `None` = drawn from the
                prior with `generator` (before `latents`, so a given generator reproduces both).
            prompt_embeds, prompt_attention_mask: pre-computed text states `(rows, L, D)` and mask `(rows, L)`, rows
                one per image or one per sample (as `encode_prompt` returns); instead of `prompt`.
            negative_prompt_embeds, negative_prompt_attention_mask: the same for the guidance's unconditional branch.
            threshold: on the [0, 1] probabilities, after they are resized to each image's size.
            batch_size: rows (image x sample) per UNet call; lower it to save memory (results do not change).
            preference_scale: for a TDG-DiffDPO checkpoint (a "preference" LoRA adapter on the UNet), the knob between
                the reference model (0) and the aligned model (1), for this call; values above 1 extrapolate. `None` =
                the adapters as they are (weight 1 after loading, or what `set_adapters` set).
            cross_attention_kwargs: passed to the UNet's attention processors, as in diffusers; `{"scale": s}` scales
                every LoRA adapter on the UNet for this call (with the preference adapter alone: `preference_scale`;
                diffusers resets `set_adapters` weights after a call at scale 0: use `preference_scale=0` there).
            autocast: "auto", "bf16" or "no" for this call; `None` = the pipeline's `autocast` config ("auto": bf16
                where the hardware computes it natively). Applies to float32 weights; half-precision weights
                (`from_pretrained(..., torch_dtype=torch.float16)`) compute in their own dtype. Results are bit-reproducible for a given generator and mode.
            output_type: "np", "pt", "pil" (a list per image of `PIL.Image` masks) or "latent" (the raw samples, at
                the model's size). With images of several sizes, "np" and "pt" give a list per image for each field.
            return_dict: an [`AmbiSegPipelineOutput`] (True) or a tuple `(probabilities, masks, pixel_mean,
                pixel_variance)` (since 0.2.0; `masks_first=True` gives version 0.1.0's order, masks first, until
                0.3.0, with a `FutureWarning`).
            callback_on_step_end: called after every denoising step as `callback(pipe, step, timestep, kwargs)` with
                `kwargs` holding the tensors named in `callback_on_step_end_tensor_inputs` (a diffusers
                `PipelineCallback` names its own); the dict it returns may replace them. Set `pipe._interrupt = True`
                in it to skip the remaining steps. A callback that turns guidance off (`pipe._guidance_scale` <= 1,
                diffusers' `SDCFGCutoffCallback`) ends the unconditional branch, each sample keeping its prompt.

        Returns:
            [`AmbiSegPipelineOutput`] (or a tuple `(probabilities, masks, pixel_mean, pixel_variance)`).
        """
        masks_first = tuple_order(kwargs, return_dict)
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Check inputs. Raise an error naming the argument if not correct.
        self.check_inputs(
            image, prompt, num_samples, num_inference_steps, output_type, batch_size, threshold, prior_temperature,
            prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask,
            callback_on_step_end_tensor_inputs, generator, negative_prompt, guidance_scale, ambiguity_latents, eta,
            cross_attention_kwargs,
        )
        num_samples = int(num_samples)
        self._guidance_scale = guidance_scale
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False

        # 1. Define call parameters.
        device = self._execution_device
        mode = autocast or self.config.get("autocast", "auto")
        if mode not in AUTOCAST_MODES:
            raise ValueError(f"`autocast` must be one of {AUTOCAST_MODES}, got {mode!r}.")
        # Autocast is for float32 weights; fp16 / bf16 weights (`torch_dtype=...`) compute in their own dtype (bf16
        # autocast over fp16 weights would mix the two in BERT's LayerNorm and fail).
        use_bf16 = (mode == "bf16" or (mode == "auto" and native_bf16(device))) and self.unet.dtype == torch.float32
        if self.unet.dtype == torch.float16 and device.type == "cpu":
            _warn_once("float16 weights on a CPU: CPUs emulate half precision, about 35x slower than float32 here; "
                       "load with `dtype=torch.float32` (from_pretrained's default), which bf16 autocast speeds up "
                       "where the CPU has native bf16.")
        with self._preference_scale(preference_scale), torch.autocast(device.type, torch.bfloat16, enabled=use_bf16):
            dtype = self.unet.dtype
            images, image_sizes = self._image_processor().preprocess(image)
            images = images.to(device=device, dtype=dtype)
            batch, _, height, width = images.shape
            self.check_model_size(height, width)
            rows = batch * num_samples
            row_images = images.repeat_interleave(num_samples, dim=0)
            generator = self._row_generators(generator, batch, num_samples)

            # 2. Encode the prompts (each distinct prompt once), or bring the given embeddings to one row per sample.
            prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask = (
                self.prepare_prompt_embeds(prompt, negative_prompt, prompt_embeds, prompt_attention_mask,
                                           negative_prompt_embeds, negative_prompt_attention_mask, batch, num_samples,
                                           device, dtype))

            # 3. Prepare timesteps.
            steps = num_inference_steps or DEFAULT_NUM_INFERENCE_STEPS
            self.scheduler.set_timesteps(steps, device=device)
            timesteps = self.scheduler.timesteps
            self._num_timesteps = len(timesteps)

            # 4. One ambiguity latent per sample, from the prior.
            if ambiguity_latents is not None:
                ambiguity_latents = rows_of(ambiguity_latents, "ambiguity_latents", batch, num_samples).to(device, dtype)
            elif self.unet.latent_dim:
                ambiguity_latents = self.prepare_ambiguity_latents(
                    images, prompt_embeds, prompt_attention_mask, num_samples, prior_temperature, generator
                )

            # 5. Initial noise for every row at once, so results do not depend on `batch_size`.
            shape = (rows, self.unet.mask_channels, height, width)
            if latents is not None and tuple(latents.shape) != shape:
                raise ValueError(f"`latents` must have shape {shape} (batch * num_samples, mask_channels, H, W), got "
                                 f"{tuple(latents.shape)}.")
            latents = self.prepare_latents(shape, dtype, device, generator, latents)

            # 6. Prepare extra step kwargs.
            extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

            # 7. Denoising loop: every row steps together; the UNet sees `batch_size` rows per call.
            predicts_clean_mask = self.scheduler.config.prediction_type == "sample"
            chunks = [slice(start, min(start + batch_size, rows)) for start in range(0, rows, batch_size)]
            with self.progress_bar(total=len(timesteps)) as progress_bar:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    latent_input = self.scheduler.scale_model_input(latents, t)
                    model_output = torch.cat([
                        self._denoise_rows(
                            latent_input[c], t, row_images[c], prompt_embeds[c], prompt_attention_mask[c],
                            None if ambiguity_latents is None else ambiguity_latents[c],
                            None if negative_prompt_embeds is None else negative_prompt_embeds[c],
                            None if negative_prompt_attention_mask is None else negative_prompt_attention_mask[c],
                        )
                        for c in chunks
                    ])
                    if predicts_clean_mask:
                        # A predicted mask lives in [-1, 1]: clamping it works with every scheduler, Euler included.
                        model_output = model_output.clamp(-1.0, 1.0)
                    latents = self.scheduler.step(model_output, t, latents, **extra_step_kwargs, return_dict=False)[0]

                    if callback_on_step_end is not None:
                        callback_kwargs = {}
                        for k in callback_on_step_end_tensor_inputs:
                            callback_kwargs[k] = locals()[k]
                        callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                        latents = callback_outputs.pop("latents", latents)
                        returned = callback_outputs.pop("prompt_embeds", prompt_embeds)
                        if len(returned) == rows:
                            prompt_embeds = returned
                        elif not (len(returned) == 1 and not self.do_classifier_free_guidance):
                            raise ValueError(f"`callback_on_step_end` returned `prompt_embeds` of {len(returned)} "
                                             f"rows; expected one per sample ({rows}).")
                        # else: SDCFGCutoffCallback keeps SD's last (conditional) row when it ends guidance; here the
                        # unconditional rows are held apart, so each sample keeps its own prompt
                        negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                        ambiguity_latents = callback_outputs.pop("ambiguity_latents", ambiguity_latents)
                        if not self.do_classifier_free_guidance:  # the callback turned guidance off
                            negative_prompt_embeds = negative_prompt_attention_mask = None
                    progress_bar.update()

            # 8. Post-process: [-1, 1] samples -> probabilities and masks at each image's size, the statistics.
            self.maybe_free_model_hooks()
            if output_type == "latent":
                return AmbiSegPipelineOutput(masks=latents) if return_dict else (latents,)
            probabilities = ((latents.float() + 1.0) / 2.0).clamp(0.0, 1.0).reshape(batch, num_samples, height, width)
            probabilities, masks = self._image_processor().postprocess(probabilities, image_sizes, threshold)
            return format_samples(probabilities, masks, output_type, return_dict, masks_first)
