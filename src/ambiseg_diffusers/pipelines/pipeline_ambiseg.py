"""AmbiSegPipeline: sample a distribution of plausible segmentation masks for an image and a prompt."""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

from ..hub_utils import (
    BASE_DOWNLOAD_KWARGS, check_finite_weights, check_weight_files, download_kwargs_of, model_card, resolve_pretrained_path,
)
from ..image_processing import ImageInput
from ..image_processor import AmbiSegImageProcessor
from ..lidc import RECORDED_PROMPT_STYLES
from ..models import AmbiguityEncoder, AmbiSegUNet
from ..text import encode_prompts, sentence_encoded
from .custom_code import CustomCodeLayoutMixin, pop_hub_kwargs, upload_saved_folder
from .pipeline_settings import legacy_settings

logger = logging.get_logger(__name__)

PromptInput = Union[str, list[str], list[list[str]], None]
# A folder holding a LoRA adapter (`pytorch_lora_weights.safetensors`) says which adapter it is and, when the base
# pipeline is not in the same folder, which base it belongs to.
ADAPTER_FILE = "preference.json"
PREFERENCE_ADAPTER = "preference"
# A distilled few-call sampler (training/train_consistency.py): a LoRA, an LCMScheduler in scheduler/ and this file.
CONSISTENCY_FILE = "consistency.json"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
OUTPUT_TYPES = ("np", "pt", "pil", "latent")
# The recommended number of denoising steps of the committed checkpoint with its scheduler (UniPC, 6 steps: the
# default-quality sweep of issue 40, docs/results.md); `__call__`'s default.
DEFAULT_NUM_INFERENCE_STEPS = 6
AUTOCAST_MODES = ("auto", "bf16", "no")
# The diffusers schedulers that sample an x0-predicting model (prediction_type "sample", every committed checkpoint):
# each run through a call in tests/test_diffusers_conventions.py. Others (EulerAncestral, PNDM, KDPM2, ...) raise
# inside `step` on this prediction type, so a call refuses them up front.
SAMPLE_PREDICTION_SCHEDULERS = (
    "DDIMScheduler", "DDIMParallelScheduler", "DDPMScheduler", "DDPMParallelScheduler", "DEISMultistepScheduler",
    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler",
    "LCMScheduler", "LMSDiscreteScheduler", "TCDScheduler", "UniPCMultistepScheduler",
)


def recommended_steps(pretrained_model_name_or_path: str | os.PathLike) -> int | None:
    """The number of denoising steps a local folder states for itself: a distilled sampler's (`consistency.json`),
    else None (`__call__`'s default)."""
    info = os.path.join(str(pretrained_model_name_or_path), CONSISTENCY_FILE)
    if not os.path.isfile(info):
        return None
    with open(info) as f:
        return int(json.load(f)["num_inference_steps"])


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


def normalize_prompts(prompt: PromptInput, batch_size: int) -> list[list[str]]:
    """`prompt` as documented in `AmbiSegPipeline.__call__` -> one non-empty list of prompts per image."""
    if prompt is None:
        return [[""] for _ in range(batch_size)]
    if isinstance(prompt, str):
        return [[prompt] for _ in range(batch_size)]
    if not isinstance(prompt, (list, tuple)) or len(prompt) == 0:
        raise ValueError(f"`prompt` must be a string, a non-empty list of strings or a list of lists, got {prompt!r}.")
    if len(prompt) != batch_size:
        raise ValueError(f"`prompt` has {len(prompt)} entries but `image` has {batch_size} images; give one per image.")
    per_image = []
    for i, item in enumerate(prompt):
        item = [item] if isinstance(item, str) else item
        if not isinstance(item, (list, tuple)) or len(item) == 0 or not all(isinstance(p, str) for p in item):
            raise ValueError(f"`prompt[{i}]` must be a string or a non-empty list of strings, got {item!r}.")
        per_image.append(list(item))
    return per_image


def _pad_tokens(states: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads `(R, L, D)` states and their `(R, L)` mask to `length` tokens (padding is masked out)."""
    extra = length - states.shape[1]
    if extra <= 0:
        return states, mask
    return torch.nn.functional.pad(states, (0, 0, 0, extra)), torch.nn.functional.pad(mask, (0, extra))


class AmbiSegPipeline(CustomCodeLayoutMixin, DiffusionPipeline, StableDiffusionLoraLoaderMixin):
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

    # ---------------------------------------------------------------------------------------------- loading, saving
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "AmbiSegPipeline":
        """Loads from a local folder or a Hub repo id, as float32 unless `dtype` is given (checkpoints may be stored
        in fp16 to stay small; CPUs compute in float32 or bf16 autocast).

        diffusers' own download step only accepts components from diffusers or transformers, so a Hub repo is
        fetched whole with `huggingface_hub.snapshot_download` (which honours `HF_HUB_OFFLINE` and the cache).

        A LoRA folder loads its base pipeline first: the one in the same folder, else `base_model_path` (relative to
        the folder, for checkouts) when it exists, else the Hub repo `base_model`; `base_model=...` overrides all
        three. Two kinds: a TDG-DiffDPO adapter (`preference.json` + `pytorch_lora_weights.safetensors`), and a
        distilled sampler (`consistency.json` + the LoRA + an `LCMScheduler` in `scheduler/`, from
        training/train_consistency.py), which also sets the scheduler and the default number of calls.
        """
        download_kwargs = download_kwargs_of(kwargs)
        base_override = kwargs.pop("base_model", None)
        if "torch_dtype" not in kwargs:
            kwargs.setdefault("dtype", torch.float32)
        path = resolve_pretrained_path(pretrained_model_name_or_path, **download_kwargs)
        info_file = next((os.path.join(path, name) for name in (ADAPTER_FILE, CONSISTENCY_FILE)
                          if os.path.isfile(os.path.join(path, name))), None)
        if info_file is None:
            return cls._load_checked(path, **kwargs)

        with open(info_file) as f:
            info = json.load(f)
        if base_override is not None:
            base = base_override
        elif os.path.isfile(os.path.join(path, "model_index.json")):
            base = path
        else:
            local = os.path.normpath(os.path.join(path, info["base_model_path"])) if info.get("base_model_path") else None
            base = local if local and os.path.isdir(local) else info.get("base_model")
            if base is None:
                raise ValueError(f"{info_file} names no `base_model`; pass `base_model=` (a folder or Hub id).")
        if base == path:
            pipe = cls._load_checked(path, **kwargs)
        else:
            base_kwargs = {k: v for k, v in download_kwargs.items() if k in BASE_DOWNLOAD_KWARGS}
            pipe = cls.from_pretrained(base, **kwargs, **base_kwargs)
        earlier = list(getattr(pipe.unet, "peft_config", None) or {})
        name = info.get("adapter_name", PREFERENCE_ADAPTER)
        pipe.load_lora_weights(path, weight_name=LORA_WEIGHT_NAME, adapter_name=name)
        if earlier:  # a distilled sampler on an aligned model: both adapters act
            pipe.set_adapters(earlier + [name])
        if info_file.endswith(CONSISTENCY_FILE):
            from diffusers import LCMScheduler

            pipe.scheduler = LCMScheduler.from_pretrained(path, subfolder="scheduler")
            logger.warning(f"{path} is a sampler distilled for {info['num_inference_steps']} UNet calls: call it with "
                           f"`num_inference_steps={info['num_inference_steps']}` (`__call__`'s default, "
                           f"{DEFAULT_NUM_INFERENCE_STEPS}, is the base model's recommendation).")
        return pipe

    @classmethod
    def _load_checked(cls, path: str, **kwargs) -> "AmbiSegPipeline":
        """diffusers' loading, between two cheap checks: weight files present and readable before, every weight
        finite after (a corrupted file must not load silently and give empty masks)."""
        check_weight_files(path)
        pipe = super().from_pretrained(path, **kwargs)
        check_finite_weights(pipe, path)
        return pipe

    @classmethod
    def load_lora_into_text_encoder(cls, state_dict, network_alphas, text_encoder, prefix=None, *args, **kwargs):
        """The text encoder is frozen and never adapted: skip it (quietly) unless the file has keys for it."""
        prefix = prefix or cls.text_encoder_name
        if any(key.startswith(f"{prefix}.") for key in state_dict):
            super().load_lora_into_text_encoder(state_dict, network_alphas, text_encoder, prefix, *args, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Saves every component (safetensors). A LoRA adapter on the UNet is saved the standard way beside the base
        weights (`pytorch_lora_weights.safetensors` + `preference.json`), never folded into the UNet's keys; to
        save one merged model instead, `fuse_lora()` and `unload_lora_weights()` first."""
        adapters = list(getattr(self.unet, "peft_config", None) or {})
        if not adapters:
            return super().save_pretrained(save_directory, **kwargs)
        push_to_hub, hub = kwargs.pop("push_to_hub", False), pop_hub_kwargs(kwargs)  # uploaded once complete
        if len(adapters) > 1:
            raise ValueError(f"the UNet carries several LoRA adapters {adapters}; delete all but one "
                             "(`delete_adapters`) or fuse them (`fuse_lora`, `unload_lora_weights`) before saving.")
        from peft.utils import get_peft_model_state_dict

        name = adapters[0]
        if any(getattr(m, "merged_adapters", None) for m in self.unet.modules()):
            raise ValueError("the UNet's adapter is fused into its weights (`fuse_lora`): saving both would apply it "
                             "twice on loading. `unload_lora_weights()` first (keeps the fused weights, one merged "
                             "model), or `unfuse_lora()` (base weights + adapter).")
        with_adapter = self.unet
        base = copy.deepcopy(with_adapter)
        base.unload_lora()  # the base weights, without peft's wrapping
        try:
            self.unet = base
            super().save_pretrained(save_directory, **kwargs)
        finally:
            self.unet = with_adapter
        self.save_lora_weights(
            save_directory, unet_lora_layers=get_peft_model_state_dict(with_adapter, adapter_name=name),
            weight_name=LORA_WEIGHT_NAME, unet_lora_adapter_metadata=with_adapter.peft_config[name].to_dict(),
        )
        with open(os.path.join(save_directory, ADAPTER_FILE), "w") as f:
            json.dump({"adapter_name": name}, f, indent=2)
        if push_to_hub:
            upload_saved_folder(save_directory, hub)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        model_card: str | None = None,
    ) -> str:
        """Saves the pipeline (safetensors) with a model card (`model_card` text, or one built from this package's
        template: `library_name`, tags, the clinical-use warning, the LIDC-IDRI attribution) and uploads it."""
        import tempfile

        from huggingface_hub import create_repo, upload_folder

        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            card = model_card if model_card is not None else str(
                _default_card(repo_id, lidc=self.config.get("prompt_style") != "free"))
            with open(os.path.join(folder, "README.md"), "w") as f:
                f.write(card)
            return upload_folder(
                repo_id=repo_id, folder_path=folder, token=token, create_pr=create_pr,
                commit_message=commit_message or "Upload AmbiSegPipeline",
            )

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

    def encode_prompt(
        self,
        prompt: PromptInput,
        device: torch.device | None = None,
        num_samples: int = 1,
        do_classifier_free_guidance: bool = False,
        negative_prompt: str | list[str] | None = None,
        batch_size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Encodes the prompt of every sample row, each distinct prompt once.

        `prompt` as in `__call__` (a string, one per image, or a list per image spread round-robin over the samples).
        Returns `prompt_embeds` `(batch * num_samples, L, D)`, `prompt_attention_mask` `(batch * num_samples, L)` (1 =
        token, 0 = padding) and, with guidance, the negative prompt's (default: the empty prompt, what the model saw
        on prompt dropout) of the same shape, else `None` twice: exactly what `__call__` accepts.
        """
        device = device or self._execution_device
        if batch_size is None:
            batch_size = 1 if prompt is None or isinstance(prompt, str) else len(prompt)
        per_image = normalize_prompts(prompt, batch_size)
        row_prompts = [p[s % len(p)] for p in per_image for s in range(num_samples)]
        prompt_embeds, prompt_attention_mask = self._encode_rows(row_prompts, device)
        if not do_classifier_free_guidance:
            return prompt_embeds, prompt_attention_mask, None, None
        negative = normalize_prompts(negative_prompt if negative_prompt is not None else "", batch_size)
        negative_prompt_embeds, negative_prompt_attention_mask = self._encode_rows(
            [p[0] for p in negative for _ in range(num_samples)], device)
        length = max(prompt_embeds.shape[1], negative_prompt_embeds.shape[1])
        prompt_embeds, prompt_attention_mask = _pad_tokens(prompt_embeds, prompt_attention_mask, length)
        negative_prompt_embeds, negative_prompt_attention_mask = _pad_tokens(
            negative_prompt_embeds, negative_prompt_attention_mask, length)
        return prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask

    def _encode_rows(self, row_prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this pipeline has no `text_encoder`/`tokenizer`; pass `prompt_embeds` instead of `prompt`.")
        unique = sorted(set(row_prompts))
        states, mask = encode_prompts(self.tokenizer, self.text_encoder, unique, device=device,
                                      by_sentence=sentence_encoded(self.config.get("prompt_style")))
        index = torch.tensor([unique.index(p) for p in row_prompts], device=states.device)
        return states[index], mask[index]

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
        if isinstance(generator, list):  # per row: image b's block of samples from its own generator in one draw,
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

    def check_inputs(
        self, image, prompt, num_samples, num_inference_steps, output_type, batch_size, threshold, prior_temperature,
        prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask,
        callback_on_step_end_tensor_inputs, generator=None, negative_prompt=None, guidance_scale=1.0,
        ambiguity_latents=None, eta=0.0, cross_attention_kwargs=None,
    ) -> None:
        """Raises `ValueError` naming the argument that is wrong, and the component a call needs but lacks."""
        for component in ("unet", "scheduler"):
            if getattr(self, component, None) is None:
                raise ValueError(f"this pipeline has no `{component}`; set `pipe.{component} = ...` before calling it.")
        scheduler = type(self.scheduler).__name__
        if self.scheduler.config.get("prediction_type") == "sample" and scheduler not in SAMPLE_PREDICTION_SCHEDULERS:
            raise ValueError(f"`scheduler` {scheduler} cannot sample this model (it predicts the clean mask, "
                             f"prediction_type 'sample'); use one of {list(SAMPLE_PREDICTION_SCHEDULERS)}, e.g. "
                             "`pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)`.")
        if image is None:
            raise ValueError("`image` is required: the CT image (or batch) to segment.")
        if not isinstance(num_samples, numbers.Integral) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"`num_samples` must be an integer >= 1, got {num_samples!r}.")
        valid = generator is None or isinstance(generator, torch.Generator) or (
            isinstance(generator, list) and all(isinstance(g, torch.Generator) for g in generator))
        if not valid:
            raise ValueError(f"`generator` must be a torch.Generator or a list of them (one per image), got "
                             f"{type(generator).__name__}; e.g. `generator=torch.Generator().manual_seed(0)`.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"`threshold` must be in [0, 1], got {threshold}.")
        for name, value in (("prior_temperature", prior_temperature), ("eta", eta)):
            if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
        if num_inference_steps is not None and num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be >= 1, got {num_inference_steps}.")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass either `prompt` or `prompt_embeds`, not both.")
        for embeds, mask, name in ((prompt_embeds, prompt_attention_mask, "prompt"),
                                   (negative_prompt_embeds, negative_prompt_attention_mask, "negative_prompt")):
            if embeds is None:
                continue
            if mask is None:
                raise ValueError(f"`{name}_embeds` needs its `{name}_attention_mask` (what `encode_prompt` returns).")
            if embeds.ndim != 3 or mask.shape != embeds.shape[:2]:
                raise ValueError(f"`{name}_embeds` must be (rows, L, D) with `{name}_attention_mask` (rows, L); got "
                                 f"{tuple(embeds.shape)} and {tuple(mask.shape)}.")
        if negative_prompt_embeds is not None and prompt_embeds is None:
            raise ValueError("`negative_prompt_embeds` goes with `prompt_embeds`.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
        if not (isinstance(guidance_scale, numbers.Real) and guidance_scale >= 1.0 and math.isfinite(guidance_scale)):
            raise ValueError(f"`guidance_scale` must be a finite number >= 1 (1 = no guidance), got {guidance_scale!r}.")
        if ambiguity_latents is not None:
            if not self.unet.latent_dim:
                raise ValueError("`ambiguity_latents` given, but this UNet takes no ambiguity latent (its ambiguity "
                                 "design is 'prediction_kl' or 'none'); leave it None.")
            if ambiguity_latents.ndim != 2 or ambiguity_latents.shape[1] != self.unet.latent_dim:
                raise ValueError(f"`ambiguity_latents` must be (rows, {self.unet.latent_dim}), got "
                                 f"{tuple(ambiguity_latents.shape)}.")
        if cross_attention_kwargs is not None and not isinstance(cross_attention_kwargs, dict):
            raise ValueError(f"`cross_attention_kwargs` must be a dict (e.g. {{'scale': 0.5}}), got "
                             f"{type(cross_attention_kwargs).__name__}.")
        unknown = set(callback_on_step_end_tensor_inputs or []) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` must be among {self._callback_tensor_inputs}, got "
                             f"{sorted(unknown)}.")

    def check_model_size(self, height: int, width: int) -> None:
        """The UNet halves the image `len(block_out_channels) - 1` times: its input sides must divide by that."""
        depth = 2 ** (len(self.unet.config.block_out_channels) - 1)
        if height % depth or width % depth:
            raise ValueError(f"the model's input is {height}x{width}; its sides must be multiples of {depth} (the "
                             "image processor's `size`, or with `do_resize=False` the image's own size).")

    def _rows_of(self, tensor: torch.Tensor | None, name: str, batch: int, num_samples: int) -> torch.Tensor | None:
        """A per-image `(batch, ...)` tensor repeated for each sample, or a per-row `(batch * num_samples, ...)` one."""
        if tensor is None or tensor.shape[0] == batch * num_samples:
            return tensor
        if tensor.shape[0] == batch:
            return tensor.repeat_interleave(num_samples, dim=0)
        raise ValueError(f"`{name}` has {tensor.shape[0]} rows; expected one per image ({batch}) or one per sample "
                         f"({batch * num_samples}).")

    @contextlib.contextmanager
    def _preference_scale(self, scale: float | None):
        """Scales the "preference" LoRA adapter by `scale` for one call and restores it after (None: leave the
        adapters as `set_adapters` left them)."""
        if scale is None:
            yield
            return
        layers = [m for m in (self.unet.modules() if self.unet is not None else [])
                  if hasattr(m, "set_scale") and PREFERENCE_ADAPTER in getattr(m, "scaling", {})]
        if not layers:
            named = list(getattr(self.unet, "peft_config", None) or {})
            if named:
                raise ValueError(
                    f"`preference_scale` scales the LoRA adapter named '{PREFERENCE_ADAPTER}'; this UNet's adapters are "
                    f"{named}. Load a TDG-DiffDPO adapter under that name (`pipe.load_lora_weights(folder, "
                    f"adapter_name='{PREFERENCE_ADAPTER}')`, as `AmbiSegPipeline.from_pretrained(folder)` does), or "
                    "scale every adapter with `cross_attention_kwargs={'scale': s}`.")
            raise ValueError("`preference_scale` needs a TDG-DiffDPO checkpoint (a 'preference' LoRA adapter on the UNet).")
        if any(PREFERENCE_ADAPTER in getattr(m, "merged_adapters", []) for m in layers):
            raise ValueError("the 'preference' adapter is fused into the UNet's weights (`fuse_lora`), where "
                             "`preference_scale` cannot change it; `unfuse_lora()` first, or fuse at the scale you want.")
        previous = [m.scaling[PREFERENCE_ADAPTER] for m in layers]
        for m in layers:
            m.set_scale(PREFERENCE_ADAPTER, float(scale))
        try:
            yield
        finally:
            for m, value in zip(layers, previous):
                m.scaling[PREFERENCE_ADAPTER] = value

    def _row_generators(self, generator, batch: int, num_samples: int):
        """A per-image generator list becomes a per-row list, so each image's samples are independent of batching."""
        if isinstance(generator, list):
            if len(generator) != batch:
                raise ValueError(f"`generator` is a list of {len(generator)}; expected one per image ({batch}).")
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
                `b` alone with `[generator[b]]`, whatever the batch (diffusers' batch-vs-single convention).
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
        with self._preference_scale(preference_scale), torch.autocast(device.type, torch.bfloat16, enabled=use_bf16):
            dtype = self.unet.dtype
            images, image_sizes = self._image_processor().preprocess(image)
            images = images.to(device=device, dtype=dtype)
            batch, _, height, width = images.shape
            self.check_model_size(height, width)
            rows = batch * num_samples
            row_images = images.repeat_interleave(num_samples, dim=0)
            generator = self._row_generators(generator, batch, num_samples)

            # 2. Encode the prompts (each distinct prompt once), or take the given embeddings.
            if prompt_embeds is None:
                prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask = self.encode_prompt(
                    prompt, device, num_samples, self.do_classifier_free_guidance, negative_prompt, batch_size=batch
                )
            else:
                prompt_embeds = self._rows_of(prompt_embeds, "prompt_embeds", batch, num_samples)
                prompt_attention_mask = self._rows_of(prompt_attention_mask, "prompt_attention_mask", batch, num_samples)
                if self.do_classifier_free_guidance and negative_prompt_embeds is None:
                    _, _, negative_prompt_embeds, negative_prompt_attention_mask = self.encode_prompt(
                        None, device, num_samples, True, negative_prompt, batch_size=batch
                    )
                negative_prompt_embeds = self._rows_of(negative_prompt_embeds, "negative_prompt_embeds", batch, num_samples)
                negative_prompt_attention_mask = self._rows_of(
                    negative_prompt_attention_mask, "negative_prompt_attention_mask", batch, num_samples
                )
                if negative_prompt_embeds is not None:
                    length = max(prompt_embeds.shape[1], negative_prompt_embeds.shape[1])
                    prompt_embeds, prompt_attention_mask = _pad_tokens(prompt_embeds, prompt_attention_mask, length)
                    negative_prompt_embeds, negative_prompt_attention_mask = _pad_tokens(
                        negative_prompt_embeds, negative_prompt_attention_mask, length
                    )
            if not self.do_classifier_free_guidance:
                negative_prompt_embeds = negative_prompt_attention_mask = None
            prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
            prompt_attention_mask = prompt_attention_mask.to(device)
            if negative_prompt_embeds is not None:
                negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
                negative_prompt_attention_mask = negative_prompt_attention_mask.to(device)

            # 3. Prepare timesteps.
            steps = num_inference_steps or DEFAULT_NUM_INFERENCE_STEPS
            self.scheduler.set_timesteps(steps, device=device)
            timesteps = self.scheduler.timesteps
            self._num_timesteps = len(timesteps)

            # 4. One ambiguity latent per sample, from the prior.
            if ambiguity_latents is not None:
                ambiguity_latents = self._rows_of(ambiguity_latents, "ambiguity_latents", batch, num_samples).to(device, dtype)
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


def _default_card(repo_id: str, lidc: bool = True):
    return model_card("pipeline.md", repo_id, lidc=lidc)
