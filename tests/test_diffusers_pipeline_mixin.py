"""diffusers' own pipeline test suite (`PipelineTesterMixin`, vendored in tests/diffusers_suite/, see its README)
run on AmbiSegPipeline, for both UNet kinds: one that takes an ambiguity latent from the prior (with the prior), one
that takes none (no prior, no posterior: the "none" ambiguity design).

What the mixin is told, through its own configuration as diffusers' pipeline tests do: the call parameters are
diffusers' text-guided image-variation set without `height`/`width` (the image fixes the size); `num_images_per_prompt`
is `num_samples` here (`required_optional_params` without it, as several diffusers pipelines set); the attention
slicing test runs without its mean-pixel check, which reads `output[0][0]` as one (H, W, C) picture (a
`(num_samples, H, W)` stack here), as diffusers' audio pipelines run it; its max-difference check, stricter, runs.
The dummy call leaves `num_samples` at its default (16): `test_encode_prompt_works_in_isolation` moves every
`encode_prompt` argument out of the call, and the call must then still agree with the embeddings' rows.
"""

import functools
import unittest
from unittest import mock

import diffusers.pipelines
import numpy as np
import torch
from diffusers import DDIMScheduler

from ambiseg_diffusers import AmbiSegImageProcessor, AmbiSegPipeline
from ambiseg_diffusers.pipelines import pipeline_ambiseg

from conftest import SIZE, make_tokenizer, tiny_encoder, tiny_text_encoder, tiny_unet
from diffusers_suite.pipelines.pipeline_params import (
    TEXT_GUIDED_IMAGE_VARIATION_BATCH_PARAMS,
    TEXT_GUIDED_IMAGE_VARIATION_PARAMS,
    TEXT_TO_IMAGE_CALLBACK_CFG_PARAMS,
)
from diffusers_suite.pipelines.test_pipelines_common import PipelineTesterMixin


class AmbiSegPipelineFastTests(PipelineTesterMixin, unittest.TestCase):
    pipeline_class = AmbiSegPipeline
    params = TEXT_GUIDED_IMAGE_VARIATION_PARAMS - {"height", "width"}
    batch_params = TEXT_GUIDED_IMAGE_VARIATION_BATCH_PARAMS
    callback_cfg_params = TEXT_TO_IMAGE_CALLBACK_CFG_PARAMS
    required_optional_params = PipelineTesterMixin.required_optional_params - {"num_images_per_prompt"}
    latent_dim = 3

    @classmethod
    def setUpClass(cls):
        # test_encode_prompt_works_in_isolation reads `encode_prompt`'s source from `diffusers.pipelines.<class name>`,
        # where every pipeline diffusers ships lives; an out-of-tree pipeline is put there for this class's tests.
        diffusers.pipelines.AmbiSegPipeline = AmbiSegPipeline
        cls.addClassCleanup(delattr, diffusers.pipelines, "AmbiSegPipeline")
        # Every CPU runs the suite as one with native bf16 would (AVX512-BF16, AMX): "auto" autocast would then choose
        # bf16, and the mixin's float32 tolerances hold only because the dummy pipeline records autocast "no".
        patched = mock.patch.object(pipeline_ambiseg, "native_bf16", lambda device: True)
        patched.start()
        cls.addClassCleanup(patched.stop)

    def get_dummy_components(self):
        return {
            "unet": tiny_unet(latent_dim=self.latent_dim),
            "scheduler": DDIMScheduler(num_train_timesteps=100, prediction_type="sample", clip_sample=True),
            "text_encoder": tiny_text_encoder(),
            "tokenizer": make_tokenizer(),
            "prior": tiny_encoder(1) if self.latent_dim else None,
            "posterior": tiny_encoder(2) if self.latent_dim else None,
            "image_processor": AmbiSegImageProcessor(size=SIZE),
            "autocast": "no",  # float32, as diffusers' dummy pipelines run (a configuration value, not a component)
        }

    def get_dummy_inputs(self, device, seed=0):
        generator = torch.Generator(device="cpu").manual_seed(seed)
        image = np.random.default_rng(seed).normal(size=(SIZE, SIZE)).astype(np.float32) * 200 - 600
        return {
            "image": image,
            "prompt": "a solid round nodule",
            "num_inference_steps": 2,
            "generator": generator,
            "output_type": "np",
            # diffusers' checks compare calls to 1e-4 in float32; bf16 autocast ("auto" on CPUs with AVX512-BF16)
            # rounds differently with the batch's composition.
            "autocast": "no",
        }

    def test_save_load_optional_components(self):
        # The mixin sets each of a pipeline's optional components to None and calls it; a UNet that takes an ambiguity
        # latent samples with its prior, so for that kind the prior stays. The class keeps listing it (the loader
        # reads the class's list, and the prior is optional for the other kinds): only the built pipeline's changes.
        if not self.latent_dim:
            return super().test_save_load_optional_components()
        original = AmbiSegPipeline.__init__

        @functools.wraps(original)
        def keeps_prior(pipe, *args, **kwargs):
            original(pipe, *args, **kwargs)
            pipe._optional_components = [c for c in AmbiSegPipeline._optional_components if c != "prior"]

        with mock.patch.object(AmbiSegPipeline, "__init__", keeps_prior):
            super().test_save_load_optional_components()

    def test_attention_slicing_forward_pass(self):
        self._test_attention_slicing_forward_pass(test_mean_pixel_difference=False)


class AmbiSegPipelineWithoutLatentFastTests(AmbiSegPipelineFastTests):
    latent_dim = 0
