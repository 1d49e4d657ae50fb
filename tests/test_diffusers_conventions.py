"""The pipeline used the diffusers way (issue 35): `cross_attention_kwargs={"scale": s}` as LoRA strength, diffusers'
`PipelineCallback`s, half-precision weights under the default autocast, schedulers refused up front when they
cannot sample an x0 model, and sampling knobs that cannot be NaN."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, PNDMScheduler
from diffusers.callbacks import SDCFGCutoffCallback

from ambiseg_diffusers.pipelines import pipeline_ambiseg

from conftest import SIZE, make_pipeline
from test_pipeline_conventions import add_tiny_adapter


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_cross_attention_scale_is_the_adapter_strength(tokenizer, image):
    pipe = make_pipeline(tokenizer)
    add_tiny_adapter(pipe.unet)
    call = dict(image=image, prompt="a nodule", num_samples=2, output_type="latent")
    scaled = pipe(**call, cross_attention_kwargs={"scale": 0.5}, generator=seeded(0)).masks
    torch.testing.assert_close(scaled, pipe(**call, preference_scale=0.5, generator=seeded(0)).masks)
    full = pipe(**call, generator=seeded(0)).masks
    assert (scaled - full).abs().max() > 1e-3  # the scale acts
    torch.testing.assert_close(pipe(**call, cross_attention_kwargs={"scale": 1.0}, generator=seeded(0)).masks, full)


def test_preference_scale_on_an_adapter_of_another_name_says_how_to_name_it(tokenizer, image):
    pipe = make_pipeline(tokenizer)
    add_tiny_adapter(pipe.unet, name="default_0")
    with pytest.raises(ValueError, match=r"adapters are \['default_0'\].*adapter_name='preference'"):
        pipe(image, "a nodule", num_samples=1, preference_scale=0.5)


@pytest.mark.parametrize("scheduler_class", [EulerAncestralDiscreteScheduler, PNDMScheduler])
def test_a_scheduler_that_cannot_sample_an_x0_model_is_refused_naming_those_that_can(tokenizer, image, scheduler_class):
    pipe = make_pipeline(tokenizer)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match=rf"`scheduler` {scheduler_class.__name__} cannot sample.*'DDIMScheduler'"):
        pipe(image, "a nodule", num_samples=1)


@pytest.mark.parametrize("name", ["DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                                  "EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
                                  "DPMSolverSinglestepScheduler", "TCDScheduler", "LCMScheduler"])
def test_the_listed_schedulers_sample_an_x0_model_to_masks(tokenizer, image, name):
    import diffusers

    assert name in pipeline_ambiseg.SAMPLE_PREDICTION_SCHEDULERS
    pipe = make_pipeline(tokenizer)
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    samples = pipe(image, "a nodule", num_samples=2, num_inference_steps=4, generator=seeded(0), output_type="latent").masks
    assert torch.isfinite(samples).all() and samples.abs().max() <= 1.1


def test_sd_cfg_cutoff_callback_ends_guidance_at_its_step(tokenizer, image):
    pipe = make_pipeline(tokenizer)
    # two prompts spread over the samples: after the cutoff each sample must keep its own (not the last row's)
    call = dict(image=image, prompt=[["a round nodule", "a small solid nodule"]], num_samples=2, guidance_scale=3.0,
                output_type="latent")
    cutoff = pipe(**call, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1), generator=seeded(0)).masks

    def off_after_step_1(p, step, timestep, kwargs):  # the same by hand: guidance off from the third step on
        if step == 1:
            p._guidance_scale = 0.0
        return {}

    by_hand = pipe(**call, callback_on_step_end=off_after_step_1, generator=seeded(0)).masks
    torch.testing.assert_close(cutoff, by_hand)
    guided = pipe(**call, generator=seeded(0)).masks
    assert (cutoff - guided).abs().max() > 1e-4  # guidance did stop


def test_half_precision_weights_sample_under_the_default_autocast(tokenizer, image, monkeypatch):
    monkeypatch.setattr(pipeline_ambiseg, "native_bf16", lambda device: True)  # "auto" chooses bf16 here
    pipe = make_pipeline(tokenizer)
    pipe.register_to_config(autocast="auto")
    pipe.to(torch.float16)  # under bf16 autocast BERT's fp16 LayerNorm met bf16 activations and failed
    default = pipe(image, "a nodule", num_samples=2, generator=seeded(0), output_type="latent").masks
    plain = pipe(image, "a nodule", num_samples=2, generator=seeded(0), output_type="latent", autocast="no").masks
    assert default.dtype == torch.float16
    torch.testing.assert_close(default, plain)


@pytest.mark.parametrize("knob, value", [("prior_temperature", float("nan")), ("prior_temperature", float("inf")),
                                         ("eta", float("nan")), ("eta", -0.5)])
def test_sampling_knobs_refuse_nan_inf_and_negative_values(pipe, image, knob, value):
    with pytest.raises(ValueError, match=rf"`{knob}` must be a finite number >= 0"):
        pipe(image, "a nodule", num_samples=1, **{knob: value})


def test_eta_still_moves_ddim(tokenizer, image):
    pipe = make_pipeline(tokenizer, DDIMScheduler(num_train_timesteps=100, prediction_type="sample", clip_sample=True))
    a = pipe(image, "a nodule", num_samples=2, eta=0.0, generator=seeded(0), output_type="latent").masks
    b = pipe(image, "a nodule", num_samples=2, eta=1.0, generator=seeded(0), output_type="latent").masks
    assert (a - b).abs().max() > 1e-3


def test_diffusers_own_loader_returns_the_same_pipeline_and_a_resave_keeps_the_hub_layout(tokenizer, image, tmp_path):
    import json

    from diffusers import DiffusionPipeline

    from ambiseg_diffusers import AmbiSegPipeline

    make_pipeline(tokenizer).save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_ambiseg", "AmbiSegPipeline"]
    assert index["unet"] == ["unet_ambiseg", "AmbiSegUNet"] and index["prior"] == ["ambiguity_encoder", "AmbiguityEncoder"]
    ours = AmbiSegPipeline.from_pretrained(tmp_path / "saved")
    theirs = DiffusionPipeline.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    assert type(theirs) is AmbiSegPipeline and theirs.image_processor.config == ours.image_processor.config
    theirs.set_progress_bar_config(disable=True)
    call = dict(image=image, prompt="a nodule", num_samples=2, output_type="latent")
    torch.testing.assert_close(theirs(**call, generator=seeded(0)).masks, ours(**call, generator=seeded(0)).masks,
                               rtol=0, atol=0)
    theirs.save_pretrained(tmp_path / "again")  # a re-push keeps the layout
    again = json.loads((tmp_path / "again" / "model_index.json").read_text())
    assert {k: v for k, v in again.items() if k != "_name_or_path"} == index
    assert (tmp_path / "again" / "pipeline_ambiseg.py").read_text() == (tmp_path / "saved" / "pipeline_ambiseg.py").read_text()


def test_a_subclass_saves_in_diffusers_layout_and_reloads(tokenizer, image, tmp_path):
    """A user's subclass is not this package's: it keeps diffusers' own layout (no shim pointing at a module that
    does not exist) and loads back with its own class."""
    import json

    from ambiseg_diffusers import AmbiSegPipeline

    class MyPipeline(AmbiSegPipeline):
        pass

    pipe = MyPipeline(**make_pipeline(tokenizer).components)
    pipe.save_pretrained(tmp_path / "mine")
    index = json.loads((tmp_path / "mine" / "model_index.json").read_text())
    assert index["_class_name"] == "MyPipeline" and not (tmp_path / "mine" / "pipeline_ambiseg.py").exists()
    loaded = MyPipeline.from_pretrained(tmp_path / "mine")
    assert type(loaded) is MyPipeline
    call = dict(image=image, prompt="a nodule", num_samples=2, output_type="latent")
    torch.testing.assert_close(loaded(**call, generator=seeded(0)).masks, pipe(**call, generator=seeded(0)).masks)


def test_a_failed_save_leaves_no_half_written_folder(tokenizer, tmp_path, monkeypatch):
    from ambiseg_diffusers.pipelines import custom_code

    def broken(folder, pipeline_class):
        raise OSError("disk full")

    monkeypatch.setattr(custom_code, "write_custom_code_layout", broken)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint-2").mkdir()  # a run's own files stay
    with pytest.raises(OSError, match="disk full"):
        make_pipeline(tokenizer).save_pretrained(tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging folder left beside it
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-2"]  # no half pipeline


def test_this_packages_loader_runs_no_code_from_the_folder(tokenizer, tmp_path):
    from diffusers import DiffusionPipeline

    from ambiseg_diffusers import AmbiSegPipeline

    make_pipeline(tokenizer).save_pretrained(tmp_path / "saved")
    (tmp_path / "saved" / "unet" / "unet_ambiseg.py").write_text("raise RuntimeError('ran the repository code')\n")
    assert AmbiSegPipeline.from_pretrained(tmp_path / "saved").unet is not None  # imports the installed package
    with pytest.raises(RuntimeError, match="ran the repository code"):  # diffusers' route runs it, when trusted
        DiffusionPipeline.from_pretrained(tmp_path / "saved", trust_remote_code=True)


def test_a_pipeline_built_from_components_or_from_pipe_samples_as_the_original(tokenizer, image):
    """Image settings travel as the image processor component; the rest is configuration, which `from_pipe`
    carries (diffusers' way) and `Pipeline(**components)` takes as keywords; the step count is `__call__`'s."""
    from ambiseg_diffusers import AmbiSegImageProcessor, AmbiSegPipeline, ProbUNetPipeline
    from ambiseg_diffusers.models.prob_unet import ProbUNetModel

    pipe = make_pipeline(tokenizer)
    pipe.image_processor = AmbiSegImageProcessor(size=SIZE, image_clip=2.0)  # not the default normalisation
    call = dict(image=image, prompt="a nodule", num_samples=2)
    expected = pipe(**call, generator=seeded(0)).probabilities
    rebuilt = AmbiSegPipeline(**pipe.components, autocast="no")
    from_pipe = AmbiSegPipeline.from_pipe(pipe)
    assert rebuilt.image_processor.config.image_clip == from_pipe.image_processor.config.image_clip == 2.0
    assert from_pipe.config.autocast == "no" and from_pipe.config.prompt_style == pipe.config.prompt_style
    for other in (rebuilt, from_pipe):
        other.set_progress_bar_config(disable=True)
        np.testing.assert_array_equal(other(**call, generator=seeded(0)).probabilities, expected)
    # the clip changes the samples, so the equality above is the processor's doing
    default = AmbiSegPipeline(**{**pipe.components, "image_processor": None}, autocast="no")
    default.set_progress_bar_config(disable=True)
    assert np.abs(default(**call, generator=seeded(0)).probabilities - expected).max() > 1e-3
    # nothing is written into the UNet's config any more
    assert "_pipeline_settings" not in pipe.unet.config

    prob = ProbUNetPipeline(ProbUNetModel(latent_dim=2, block_out_channels=(8, 8), encoder_block_out_channels=(8, 8),
                                          norm_num_groups=4), image_clip=2.5)
    assert ProbUNetPipeline(**prob.components).image_processor.config.image_clip == 2.5


def test_a_folder_saved_by_version_0_1_loads_with_its_settings(tokenizer, image, tmp_path, caplog):
    """No image processor, the settings recorded in the UNet's config (`_pipeline_settings`) and `model_index.json`:
    the clip goes into the default processor, autocast and prompt style into the configuration, and a recorded step
    count other than `__call__`'s default is named in a warning."""
    import json
    import shutil

    from diffusers.utils import logging as dlogging

    from ambiseg_diffusers import AmbiSegPipeline

    pipe = make_pipeline(tokenizer)
    pipe.save_pretrained(tmp_path)
    shutil.rmtree(tmp_path / "image_processor")
    index = json.loads((tmp_path / "model_index.json").read_text())
    del index["image_processor"]
    index.update(image_clip=2.0, default_num_inference_steps=3, prompt_style="free", autocast="no")
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    unet_config = json.loads((tmp_path / "unet" / "config.json").read_text())
    unet_config["_pipeline_settings"] = {"image_clip": 2.0, "default_num_inference_steps": 3, "prompt_style": "free",
                                         "autocast": "no"}
    (tmp_path / "unet" / "config.json").write_text(json.dumps(unet_config))
    dlogging.enable_propagation()
    try:
        # the pipeline module's own logger: diffusers' mixin tests set it to FATAL in the same worker
        with caplog.at_level(logging.WARNING, logger="ambiseg_diffusers.pipelines.pipeline_ambiseg"):
            old = AmbiSegPipeline.from_pretrained(tmp_path)
            rebuilt = AmbiSegPipeline(**old.components)  # the UNet's record still speaks for a 0.1 folder
    finally:
        dlogging.disable_propagation()
    assert "pass `num_inference_steps=3` to sample as before" in caplog.text
    for loaded in (old, rebuilt):
        assert loaded.image_processor.config.image_clip == 2.0 and loaded.image_processor.config.size == SIZE
        assert (loaded.config.prompt_style, loaded.config.autocast) == ("free", "no")
    pipe.image_processor = old.image_processor
    pipe.register_to_config(prompt_style="free")
    old.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(  # a loaded folder differs from the in-memory pipeline by float rounding only
        old(image, "a solid nodule", num_samples=2, num_inference_steps=3, generator=seeded(0)).probabilities,
        pipe(image, "a solid nodule", num_samples=2, num_inference_steps=3, generator=seeded(0)).probabilities,
        atol=1e-5)
