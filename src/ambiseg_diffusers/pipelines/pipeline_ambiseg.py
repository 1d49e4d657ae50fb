"""AmbiSegPipeline: sample a distribution of plausible segmentation masks for an image and a prompt."""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from typing import Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

from ..image_processing import ImageInput, normalize_image, prepare_image
from ..models import AmbiguityEncoder, AmbiSegUNet
from ..text import encode_prompts

logger = logging.get_logger(__name__)

PromptInput = Union[str, list[str], list[list[str]], None]
PREFERENCE_FILE = "preference.json"
PREFERENCE_ADAPTER = "preference"
OUTPUT_TYPES = ("np", "pt", "pil")


@dataclass
class AmbiSegPipelineOutput(BaseOutput):
    """
    Args:
        masks: bool `(batch, num_samples, H, W)`: the sampled segmentations.
        probabilities: float in [0, 1], same shape: each sample before thresholding.
        pixel_mean: float in [0, 1] `(batch, H, W)`: mean of `probabilities` over the samples.
        pixel_variance: float in [0, 0.25] `(batch, H, W)`: variance of `probabilities` over the samples, an
            uncertainty map (largest where the samples disagree).
    """

    masks: Union[np.ndarray, torch.Tensor, list]
    probabilities: Union[np.ndarray, torch.Tensor, list]
    pixel_mean: Union[np.ndarray, torch.Tensor]
    pixel_variance: Union[np.ndarray, torch.Tensor]


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


LIDC_ATTRIBUTION = (
    "LIDC-IDRI, distributed by The Cancer Imaging Archive under CC BY 3.0. Armato III, S. G., et al. (2011) \"The Lung "
    "Image Database Consortium (LIDC) and Image Database Resource Initiative (IDRI)\", Medical Physics 38(2); and "
    "Armato III, S. G., et al. (2015) Data from LIDC-IDRI, TCIA, doi:10.7937/K9/TCIA.2015.LO9QL9SX."
)


def default_model_card(repo_id: str) -> str:
    """A minimal model card for `push_to_hub` (the training scripts write richer ones from `model_cards/`)."""
    return f"""---
library_name: ambiseg-diffusers
license: apache-2.0
pipeline_tag: image-segmentation
tags:
- ambiseg-diffusers
- diffusers
- medical-imaging
- ambiguous-segmentation
---

# {repo_id}

An `AmbiSegPipeline` (ambiguous segmentation by mask diffusion) saved with ambiseg-diffusers.

```python
from ambiseg_diffusers import AmbiSegPipeline

pipe = AmbiSegPipeline.from_pretrained("{repo_id}")
out = pipe(image, prompt, num_samples=16)  # out.masks: (batch, 16, H, W) bool
```

**Research use only; not a medical device and not for clinical decisions.**

If trained on LIDC-IDRI: {LIDC_ATTRIBUTION}
"""


class AmbiSegPipeline(DiffusionPipeline):
    r"""Ambiguous segmentation by mask diffusion (AmbiSeg).

    The image is a fixed condition concatenated to the noisy mask; the prompt steers the denoiser through
    cross-attention; each sample draws its own ambiguity latent `z ~ p(z | image, prompt)` from the prior.

    Components:
        unet ([`AmbiSegUNet`]): the mask denoiser.
        scheduler: any diffusers scheduler (DDPM, DDIM, DPM-Solver++, UniPC, Euler, ...).
        text_encoder ([`~transformers.PreTrainedModel`]): frozen BERT-style encoder; its last hidden states are used.
        tokenizer ([`~transformers.PreTrainedTokenizer`]).
        prior ([`AmbiguityEncoder`], optional): p(z | image, prompt); required when the UNet takes a latent.
        posterior ([`AmbiguityEncoder`], optional): q(z | image, prompt, mask), used by training only.
        image_clip (`float`): the image normalisation used in training (see [`normalize_image`]).
        default_num_inference_steps (`int`): steps used when `__call__` gets `num_inference_steps=None`.
    """

    model_cpu_offload_seq = "text_encoder->prior->unet"
    _optional_components = ["prior", "posterior"]

    def __init__(
        self,
        unet: AmbiSegUNet,
        scheduler: KarrasDiffusionSchedulers,
        text_encoder,
        tokenizer,
        prior: AmbiguityEncoder | None = None,
        posterior: AmbiguityEncoder | None = None,
        image_clip: float = 3.0,
        default_num_inference_steps: int = 20,
    ):
        super().__init__()
        if unet.config.projection_class_embeddings_input_dim and prior is None:
            raise ValueError("`prior` is required: this `unet` is conditioned on an ambiguity latent.")
        self.register_modules(
            unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer, prior=prior, posterior=posterior
        )
        self.register_to_config(image_clip=image_clip, default_num_inference_steps=default_num_inference_steps)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "AmbiSegPipeline":
        """Loads from a local folder or a Hub repo id, as float32 unless `dtype` is given (checkpoints may be stored
        in fp16 to stay small; CPUs compute in float32 or bf16 autocast).

        diffusers' own download step only accepts components from diffusers or transformers, so a Hub repo is
        first fetched whole with `huggingface_hub.snapshot_download` (which honours `HF_HUB_OFFLINE` and the cache).
        """
        path = str(pretrained_model_name_or_path)
        if "torch_dtype" not in kwargs:
            kwargs.setdefault("dtype", torch.float32)
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            download_keys = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")
            download_kwargs = {k: kwargs.pop(k) for k in download_keys if k in kwargs}
            path = snapshot_download(path, **download_kwargs)
        if os.path.isfile(os.path.join(path, PREFERENCE_FILE)):
            return cls._from_preference_folder(path, **kwargs)
        return super().from_pretrained(path, **kwargs)

    @classmethod
    def _from_preference_folder(cls, path: str, **kwargs) -> "AmbiSegPipeline":
        """A TDG-DiffDPO LoRA checkpoint: `preference.json` names the reference pipeline (a folder relative to this
        one, or a Hub id) and `unet_lora/` holds the adapter, loaded as adapter "preference" (scale 1)."""
        with open(os.path.join(path, PREFERENCE_FILE)) as f:
            info = json.load(f)
        reference = os.path.normpath(os.path.join(path, info["reference"]))
        pipe = cls.from_pretrained(reference if os.path.isdir(reference) else info["reference"], **kwargs)
        pipe.unet.load_lora_adapter(
            os.path.join(path, "unet_lora"), prefix=None, adapter_name=PREFERENCE_ADAPTER,
            weight_name="pytorch_lora_weights.safetensors",
        )
        return pipe

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        model_card: str | None = None,
    ) -> str:
        """Saves the pipeline (safetensors) with a model card (`model_card` text, or a generic one with this
        package's `library_name`, tags, the clinical-use warning and the LIDC-IDRI attribution) and uploads it."""
        import tempfile

        from huggingface_hub import create_repo, upload_folder

        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            card = model_card if model_card is not None else default_model_card(repo_id)
            with open(os.path.join(folder, "README.md"), "w") as f:
                f.write(card)
            return upload_folder(
                repo_id=repo_id, folder_path=folder, token=token, create_pr=create_pr,
                commit_message=commit_message or "Upload AmbiSegPipeline",
            )

    # ----------------------------------------------------------------------------------------------------------
    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """Images as stored (any range) -> the model's normalised input `(B, C, H, W)` in [-1, 1]."""
        image = prepare_image(image, self.unet.image_channels)
        depth = 2 ** (len(self.unet.config.block_out_channels) - 1)
        if image.shape[-1] % depth or image.shape[-2] % depth:
            raise ValueError(f"`image` height and width must be multiples of {depth}, got {tuple(image.shape[-2:])}.")
        return normalize_image(image, self.config.image_clip)

    def encode_prompt(self, prompts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encodes each prompt once: `(P, L, D)` hidden states and `(P, L)` attention mask."""
        return encode_prompts(self.tokenizer, self.text_encoder, prompts, device=device or self._execution_device)

    def prepare_extra_step_kwargs(self, generator, eta: float) -> dict:
        # Only some schedulers take `eta` (DDIM) or a `generator` (the stochastic ones).
        params = set(inspect.signature(self.scheduler.step).parameters)
        extra = {}
        if "eta" in params:
            extra["eta"] = eta
        if "generator" in params:
            extra["generator"] = generator
        return extra

    def _set_preference_scale(self, scale: float | None) -> None:
        adapters = getattr(self.unet, "peft_config", None) or {}
        if PREFERENCE_ADAPTER not in adapters:
            if scale is not None:
                raise ValueError("`preference_scale` needs a TDG-DiffDPO checkpoint (a 'preference' LoRA adapter on the UNet).")
            return
        self.unet.set_adapters([PREFERENCE_ADAPTER], weights=[1.0 if scale is None else float(scale)])

    def _row_generators(self, generator, batch: int, num_samples: int):
        """A per-image generator list becomes a per-row list, so each image's samples are independent of batching."""
        if isinstance(generator, list):
            if len(generator) != batch:
                raise ValueError(f"`generator` is a list of {len(generator)}; expected one per image ({batch}).")
            return [g for g in generator for _ in range(num_samples)]
        return generator

    # ----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput,
        prompt: PromptInput = None,
        num_samples: int = 16,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        batch_size: int = 64,
        threshold: float = 0.5,
        guidance_scale: float = 1.0,
        prior_temperature: float = 1.0,
        eta: float = 0.0,
        preference_scale: float | None = None,
    ) -> AmbiSegPipelineOutput | tuple:
        r"""
        Args:
            image: one image or a batch, numpy / torch / PIL, shaped (H, W), (1, H, W), (H, W, 1), (B, H, W),
                (B, 1, H, W), (B, H, W, 1) or a list of images; any value range (normalised here).
            prompt: a string for every image, a list with one string per image, or a list of lists (several
                prompts per image; sample `s` uses prompt `s % len(prompts)`). `None` = the empty prompt.
            num_samples: masks to sample per image (>= 1).
            num_inference_steps: denoising steps; `None` = the pipeline's `default_num_inference_steps`.
            generator: a `torch.Generator`, or one per image for per-image reproducibility.
            output_type: "np", "pt" or "pil" (a list per image of `PIL.Image` masks).
            batch_size: rows (image x sample) denoised per UNet call; lower it to save memory.
            threshold: on the [0, 1] probabilities.
            guidance_scale: classifier-free guidance on the text (1 = off; needs a model trained with prompt dropout).
            prior_temperature: scales the prior's standard deviation (0 = always the prior mean).
            eta: DDIM's eta (ignored by other schedulers).
            preference_scale: for a TDG-DiffDPO checkpoint (a "preference" LoRA adapter on the UNet), the knob between
                the reference model (0) and the aligned model (1); values above 1 extrapolate. `None` = 1.

        Returns:
            [`AmbiSegPipelineOutput`] (or a tuple `(masks, probabilities, pixel_mean, pixel_variance)`).
        """
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"`num_samples` must be an integer >= 1, got {num_samples!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        if guidance_scale < 1.0:
            raise ValueError(f"`guidance_scale` must be >= 1 (1 = no guidance), got {guidance_scale}.")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"`threshold` must be in [0, 1], got {threshold}.")
        if prior_temperature < 0:
            raise ValueError(f"`prior_temperature` must be >= 0, got {prior_temperature}.")
        if num_inference_steps is not None and num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be >= 1, got {num_inference_steps}.")

        self._set_preference_scale(preference_scale)
        device = self._execution_device
        dtype = self.unet.dtype
        images = self.preprocess(image).to(device=device, dtype=dtype)
        batch, _, height, width = images.shape
        prompts = normalize_prompts(prompt, batch)
        do_guidance = guidance_scale > 1.0

        # 1. Encode each distinct prompt once.
        unique = sorted({p for per_image in prompts for p in per_image} | ({""} if do_guidance else set()))
        text_states, text_mask = self.encode_prompt(unique, device)
        text_states = text_states.to(dtype)
        row_prompt = torch.tensor(
            [unique.index(prompts[b][s % len(prompts[b])]) for b in range(batch) for s in range(num_samples)],
            device=device,
        )
        rows = batch * num_samples
        row_images = images.repeat_interleave(num_samples, dim=0)
        row_generator = self._row_generators(generator, batch, num_samples)

        # 2. One ambiguity latent per sample, from the prior.
        row_z = None
        if self.unet.latent_dim:
            # The prior depends only on (image, prompt): evaluate it once per distinct pair, not once per sample.
            row_pair = torch.arange(batch, device=device).repeat_interleave(num_samples) * len(unique) + row_prompt
            pairs, pair_of_row = torch.unique(row_pair, return_inverse=True)
            prior = self.prior(images[pairs // len(unique)], text_states[pairs % len(unique)], text_mask[pairs % len(unique)])
            mean, std = prior.mean[pair_of_row], prior.std[pair_of_row]
            noise = randn_tensor(mean.shape, generator=row_generator, device=device, dtype=mean.dtype)
            row_z = mean + prior_temperature * std * noise

        # 3. Initial noise for every row at once, so results do not depend on `batch_size`.
        shape = (rows, self.unet.mask_channels, height, width)
        noise = randn_tensor(shape, generator=row_generator, device=device, dtype=dtype)
        steps = num_inference_steps or self.config.default_num_inference_steps
        extra_step_kwargs = self.prepare_extra_step_kwargs(row_generator, eta)

        outputs = []
        with self.progress_bar(total=steps * ((rows + batch_size - 1) // batch_size)) as progress_bar:
            for start in range(0, rows, batch_size):
                chunk = slice(start, min(start + batch_size, rows))
                if isinstance(row_generator, list) and "generator" in extra_step_kwargs:
                    extra_step_kwargs["generator"] = row_generator[chunk]
                outputs.append(
                    self._denoise(
                        noise[chunk], row_images[chunk], text_states, text_mask, row_prompt[chunk],
                        None if row_z is None else row_z[chunk], steps, guidance_scale, unique.index("") if do_guidance else None,
                        extra_step_kwargs, progress_bar,
                    )
                )
        sample = torch.cat(outputs).float()

        probabilities = ((sample + 1.0) / 2.0).clamp(0.0, 1.0).reshape(batch, num_samples, height, width)
        masks = probabilities > threshold
        pixel_mean = probabilities.mean(dim=1)
        pixel_variance = probabilities.var(dim=1, unbiased=False)
        self.maybe_free_model_hooks()

        if output_type == "np":
            masks, probabilities = masks.cpu().numpy(), probabilities.cpu().numpy()
            pixel_mean, pixel_variance = pixel_mean.cpu().numpy(), pixel_variance.cpu().numpy()
        elif output_type == "pil":
            masks = [[PIL.Image.fromarray(m.cpu().numpy().astype(np.uint8) * 255) for m in per] for per in masks]
            probabilities = [[PIL.Image.fromarray((p.cpu().numpy() * 255).round().astype(np.uint8)) for p in per] for per in probabilities]
            pixel_mean, pixel_variance = pixel_mean.cpu().numpy(), pixel_variance.cpu().numpy()
        if not return_dict:
            return masks, probabilities, pixel_mean, pixel_variance
        return AmbiSegPipelineOutput(masks=masks, probabilities=probabilities, pixel_mean=pixel_mean, pixel_variance=pixel_variance)

    def _denoise(
        self, latents, images, text_states, text_mask, prompt_index, z, steps, guidance_scale, empty_index,
        extra_step_kwargs, progress_bar,
    ) -> torch.Tensor:
        """The denoising loop for one chunk of rows: `(R, mask_channels, H, W)` noise -> samples in [-1, 1]."""
        # Multistep solvers keep a history; resetting the timesteps per chunk starts each chunk clean.
        self.scheduler.set_timesteps(steps, device=latents.device)
        latents = latents * self.scheduler.init_noise_sigma
        hidden, attention_mask = text_states[prompt_index], text_mask[prompt_index]
        if empty_index is not None:
            # Classifier-free guidance: unconditional rows (empty prompt, same image and z) after the conditional ones.
            hidden = torch.cat([hidden, text_states[empty_index].expand_as(hidden)])
            attention_mask = torch.cat([attention_mask, text_mask[empty_index].expand_as(attention_mask)])
            images = torch.cat([images, images])
            z = None if z is None else torch.cat([z, z])
        is_x0 = self.scheduler.config.prediction_type == "sample"

        for t in self.scheduler.timesteps:
            model_input = self.scheduler.scale_model_input(latents, t)
            if empty_index is not None:
                model_input = torch.cat([model_input, model_input])
            model_input = torch.cat([images, model_input], dim=1)
            model_output = self.unet(
                model_input, t, encoder_hidden_states=hidden, encoder_attention_mask=attention_mask, class_labels=z
            ).sample
            if empty_index is not None:
                conditional, unconditional = model_output.chunk(2)
                model_output = unconditional + guidance_scale * (conditional - unconditional)
            if is_x0:
                # A predicted mask lives in [-1, 1]: clamping it works with every scheduler, Euler included.
                model_output = model_output.clamp(-1.0, 1.0)
            latents = self.scheduler.step(model_output, t, latents, **extra_step_kwargs, return_dict=False)[0]
            progress_bar.update()
        return latents
