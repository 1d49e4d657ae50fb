"""Input checking of `AmbiSegPipeline.__call__`: every argument checked before any work, each error naming the
argument and what was expected, or the component the call needs but lacks."""

from __future__ import annotations

import math
import numbers

import torch

from .pipeline_output import OUTPUT_TYPES

# The diffusers schedulers that sample an x0-predicting model (prediction_type "sample", every committed checkpoint):
# each run through a call in tests/test_diffusers_conventions.py. Others (EulerAncestral, PNDM, KDPM2, ...) raise
# inside `step` on this prediction type, so a call refuses them up front.
SAMPLE_PREDICTION_SCHEDULERS = (
    "DDIMScheduler", "DDIMParallelScheduler", "DDPMScheduler", "DDPMParallelScheduler", "DEISMultistepScheduler",
    "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler",
    "LCMScheduler", "LMSDiscreteScheduler", "TCDScheduler", "UniPCMultistepScheduler",
)


class InputChecksMixin:
    """`check_inputs` and `check_model_size` of `AmbiSegPipeline`."""

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
            raise ValueError(f"`generator` must be a torch.Generator or a list of them (one per image or per sample), got "
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
