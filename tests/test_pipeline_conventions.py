"""The conventions diffusers' own pipeline tests check (PipelineTesterMixin): given noise, pre-computed embeddings,
step callbacks and interruption, latent output, optional components, and LoRA the standard way (files, Hub)."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from ambiseg_diffusers import AmbiSegPipeline
from ambiseg_diffusers.pipelines.pipeline_ambiseg import LORA_WEIGHT_NAME

from conftest import LATENT_DIM, SIZE, make_pipeline
from test_pipeline import fill_hub_cache, sample_offline


def seeded(seed: int = 0):
    return torch.Generator().manual_seed(seed)


def drawn_noise(pipe, rows: int, seed: int = 0):
    """The (z, initial noise) a generator seeded `seed` gives: z first, then the noise, as `__call__` draws them."""
    generator = seeded(seed)
    z_noise = torch.randn(rows, LATENT_DIM, generator=generator)
    latents = torch.randn(rows, 1, SIZE, SIZE, generator=generator)
    return z_noise, latents


def test_given_latents_reproduce_the_generator_run_and_steer_it(pipe, image):
    reference = pipe(image, "a nodule", num_samples=3, generator=seeded(0)).probabilities
    _, latents = drawn_noise(pipe, 3)
    same = pipe(image, "a nodule", num_samples=3, generator=seeded(0), latents=latents).probabilities
    np.testing.assert_array_equal(same, reference)
    other = pipe(image, "a nodule", num_samples=3, generator=seeded(0), latents=torch.flip(latents, [0])).probabilities
    assert np.abs(other - reference).max() > 1e-3


def test_given_ambiguity_latents_replace_the_prior(pipe, image):
    text, mask, _, _ = pipe.encode_prompt("a nodule", "cpu")
    prior = pipe.prior(pipe.preprocess(image), text, mask)
    z_noise, latents = drawn_noise(pipe, 2)
    z = prior.mean + prior.std * z_noise
    reference = pipe(image, "a nodule", num_samples=2, generator=seeded(0)).probabilities
    given = pipe(image, "a nodule", num_samples=2, latents=latents, ambiguity_latents=z).probabilities
    np.testing.assert_allclose(given, reference, atol=1e-6)
    pipe.prior = None  # a given z needs no prior
    assert pipe(image, "a nodule", num_samples=2, latents=latents, ambiguity_latents=z).masks.shape == (1, 2, SIZE, SIZE)


def test_prompt_embeds_from_encode_prompt_give_the_same_masks(pipe, image):
    reference = pipe(image, [["a solid nodule", "a round nodule"]], num_samples=3, generator=seeded(0)).probabilities
    embeds, mask, _, _ = pipe.encode_prompt([["a solid nodule", "a round nodule"]], "cpu", num_samples=3)
    assert embeds.shape[0] == 3
    given = pipe(image, prompt_embeds=embeds, prompt_attention_mask=mask, num_samples=3, generator=seeded(0))
    np.testing.assert_allclose(given.probabilities, reference, atol=1e-6)
    # One embedding per image is repeated for every sample.
    single, single_mask, _, _ = pipe.encode_prompt("a solid nodule", "cpu")
    a = pipe(image, "a solid nodule", num_samples=2, generator=seeded(1)).probabilities
    b = pipe(image, prompt_embeds=single, prompt_attention_mask=single_mask, num_samples=2, generator=seeded(1)).probabilities
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_negative_prompt_embeds_with_guidance(pipe, image):
    embeds, mask, negative, negative_mask = pipe.encode_prompt("a round nodule", "cpu", num_samples=2,
                                                               do_classifier_free_guidance=True, negative_prompt="solid")
    assert negative.shape == embeds.shape and negative_mask.shape == mask.shape
    reference = pipe(image, "a round nodule", negative_prompt="solid", num_samples=2, guidance_scale=2.0,
                     generator=seeded(0)).probabilities
    given = pipe(image, prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=negative,
                 negative_prompt_attention_mask=negative_mask, num_samples=2, guidance_scale=2.0, generator=seeded(0))
    np.testing.assert_allclose(given.probabilities, reference, atol=1e-6)
    default_negative = pipe(image, "a round nodule", num_samples=2, guidance_scale=2.0, generator=seeded(0)).probabilities
    assert np.abs(default_negative - reference).max() > 1e-4  # the empty prompt is another negative


def test_callback_on_step_end_sees_every_step_and_can_replace_latents(pipe, image):
    seen = []

    def record(pipeline, step, timestep, kwargs):
        seen.append((step, int(timestep), tuple(kwargs["latents"].shape), tuple(kwargs["prompt_embeds"].shape)))
        return {}

    pipe(image, "a nodule", num_samples=2, num_inference_steps=3, callback_on_step_end=record,
         callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][1] > seen[1][1] > seen[2][1]
    assert seen[0][2] == (2, 1, SIZE, SIZE) and seen[0][3][0] == 2
    assert pipe.num_timesteps == 3

    def to_foreground(pipeline, step, timestep, kwargs):
        return {"latents": torch.ones_like(kwargs["latents"])} if step == pipeline.num_timesteps - 1 else {}

    out = pipe(image, "a nodule", num_samples=2, num_inference_steps=3, callback_on_step_end=to_foreground)
    assert out.masks.all() and np.all(out.probabilities == 1.0)


def test_interrupt_skips_the_remaining_steps(pipe, image):
    calls = []
    pipe.unet.register_forward_hook(lambda *a: calls.append(1))

    def stop(pipeline, step, timestep, kwargs):
        pipeline._interrupt = True
        return {}

    pipe(image, num_samples=2, num_inference_steps=4, callback_on_step_end=stop)
    assert len(calls) == 1 and pipe.interrupt


def test_latent_output_is_the_unthresholded_sample(pipe, image):
    latent = pipe(image, num_samples=3, output_type="latent", generator=seeded(0)).masks
    probabilities = pipe(image, num_samples=3, generator=seeded(0)).probabilities
    assert latent.shape == (3, 1, SIZE, SIZE)
    np.testing.assert_allclose(((latent[:, 0].numpy() + 1) / 2).clip(0, 1), probabilities[0], atol=1e-6)


def test_optional_components(tokenizer, image, tmp_path):
    full = make_pipeline(tokenizer)
    empty = AmbiSegPipeline(unet=None, scheduler=full.scheduler, text_encoder=None, tokenizer=None, prior=None)
    with pytest.raises(ValueError, match="no `unet`"):
        empty(image)
    text_only = AmbiSegPipeline(unet=None, scheduler=None, text_encoder=full.text_encoder, tokenizer=tokenizer,
                                prior=None)
    embeds, mask, _, _ = text_only.encode_prompt("a nodule", "cpu")
    assert embeds.shape[-1] == full.text_encoder.config.hidden_size

    no_text = AmbiSegPipeline(unet=full.unet, scheduler=full.scheduler, text_encoder=None, tokenizer=None,
                              prior=full.prior, autocast="no")
    no_text.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="prompt_embeds"):
        no_text(image, "a nodule")
    out = no_text(image, prompt_embeds=embeds, prompt_attention_mask=mask, num_samples=2, generator=seeded(0))
    np.testing.assert_allclose(out.probabilities, full(image, "a nodule", num_samples=2, generator=seeded(0)).probabilities,
                               atol=1e-6)

    full.prior = None
    with pytest.raises(ValueError, match="no `prior`"):
        full(image)
    full.posterior = None
    full.save_pretrained(tmp_path)  # None components round-trip
    loaded = AmbiSegPipeline.from_pretrained(tmp_path)
    assert loaded.prior is None and loaded.posterior is None and loaded.unet is not None
    assert DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True).prior is None

    index = json.loads((tmp_path / "model_index.json").read_text())
    del index["unet"]  # a folder without its denoiser is refused at loading, not at the first call
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="unet"):
        AmbiSegPipeline.from_pretrained(tmp_path)


def add_tiny_adapter(unet, name: str = "preference", seed: int = 3) -> None:
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "conv1"],
                                init_lora_weights="gaussian"), adapter_name=name)
    for key, value in unet.named_parameters():
        if "lora_B" in key:
            value.data.normal_(0, 0.3)  # a trained-looking adapter, so it changes the outputs


def test_diffusers_own_loader_applies_a_saved_adapter_as_this_packages_loader_does(tokenizer, image, tmp_path):
    """`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` builds the pipeline from the components
    only; the folder's adapter is applied too (it used to load the reference model silently)."""
    from diffusers import DiffusionPipeline

    pipe = make_pipeline(tokenizer)
    add_tiny_adapter(pipe.unet)
    pipe.save_pretrained(tmp_path)
    ours = AmbiSegPipeline.from_pretrained(tmp_path)
    theirs = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert list(theirs.unet.peft_config) == list(ours.unet.peft_config) == ["preference"]
    for loaded in (ours, theirs):
        loaded.set_progress_bar_config(disable=True)
    call = dict(image=image, prompt="a nodule", num_samples=2)
    np.testing.assert_array_equal(theirs(**call, generator=seeded(0)).probabilities,
                                  ours(**call, generator=seeded(0)).probabilities)
    plain = make_pipeline(tokenizer)(**call, generator=seeded(0)).probabilities
    assert np.abs(theirs(**call, generator=seeded(0)).probabilities - plain).max() > 1e-3  # not the reference


def test_lora_weights_load_set_and_unload_the_diffusers_way(tokenizer, image, tmp_path):
    base = make_pipeline(tokenizer)
    base_out = base(image, "a nodule", num_samples=2, generator=seeded(0)).probabilities
    adapted = make_pipeline(tokenizer)
    add_tiny_adapter(adapted.unet)
    adapted_out = adapted(image, "a nodule", num_samples=2, generator=seeded(0)).probabilities
    assert np.abs(adapted_out - base_out).max() > 1e-3
    AmbiSegPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(adapted.unet, adapter_name="preference"),
        weight_name=LORA_WEIGHT_NAME, unet_lora_adapter_metadata=adapted.unet.peft_config["preference"].to_dict(),
    )
    assert all(k.startswith("unet.") for k in load_file(str(tmp_path / LORA_WEIGHT_NAME)))

    base.load_lora_weights(tmp_path, adapter_name="preference")
    np.testing.assert_allclose(base(image, "a nodule", num_samples=2, generator=seeded(0)).probabilities, adapted_out, atol=1e-5)
    base.set_adapters(["preference"], adapter_weights=[0.0])
    np.testing.assert_allclose(base(image, "a nodule", num_samples=2, generator=seeded(0)).probabilities, base_out, atol=1e-5)
    half = base(image, "a nodule", num_samples=2, generator=seeded(0), preference_scale=0.5).probabilities
    assert np.abs(half - base_out).max() > 1e-4 and np.abs(half - adapted_out).max() > 1e-4
    base.unload_lora_weights()
    np.testing.assert_allclose(base(image, "a nodule", num_samples=2, generator=seeded(0)).probabilities, base_out, atol=1e-6)


def test_saving_a_pipeline_with_an_adapter_keeps_base_and_adapter(tokenizer, image, tmp_path, caplog):
    pipe = make_pipeline(tokenizer)
    add_tiny_adapter(pipe.unet)
    expected = pipe(image, "a nodule", num_samples=2, generator=seeded(0)).probabilities
    pipe.save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not [k for k in keys if "lora" in k or "base_layer" in k]
    assert json.loads((tmp_path / "preference.json").read_text()) == {"adapter_name": "preference"}

    loaded = AmbiSegPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(loaded(image, "a nodule", num_samples=2, generator=seeded(0)).probabilities, expected, atol=1e-5)
    reference = loaded(image, "a nodule", num_samples=2, generator=seeded(0), preference_scale=0.0).probabilities
    plain = make_pipeline(tokenizer)(image, "a nodule", num_samples=2, generator=seeded(0)).probabilities
    np.testing.assert_allclose(reference, plain, atol=1e-5)  # the base weights survived, not re-initialised


def test_adapter_folder_loads_its_base_from_a_hub_snapshot_offline(tokenizer, image, tmp_path):
    base = make_pipeline(tokenizer)
    base.save_pretrained(tmp_path / "base")
    add_tiny_adapter(base.unet)
    expected = base(image, "a nodule", num_samples=2, generator=seeded(0)).probabilities
    adapter = tmp_path / "adapter"
    AmbiSegPipeline.save_lora_weights(adapter, unet_lora_layers=get_peft_model_state_dict(base.unet, adapter_name="preference"),
                                      weight_name=LORA_WEIGHT_NAME,
                                      unet_lora_adapter_metadata=base.unet.peft_config["preference"].to_dict())
    # In a checkout the relative path wins; in a Hub snapshot it does not exist and the Hub id is used.
    (adapter / "preference.json").write_text(json.dumps({"adapter_name": "preference", "base_model": "org/tiny-base",
                                                         "base_model_path": "../base"}))
    local = AmbiSegPipeline.from_pretrained(adapter)
    local.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(local(image, "a nodule", num_samples=2, generator=seeded(0)).probabilities, expected, atol=1e-5)

    fill_hub_cache(tmp_path / "base", tmp_path / "hub", "org/tiny-base")
    fill_hub_cache(adapter, tmp_path / "hub", "org/tiny-dpo")
    np.testing.assert_allclose(sample_offline("org/tiny-dpo", image, tmp_path), expected, atol=1e-5)


def test_auto_bf16_counts_only_native_bf16_of_the_pipelines_own_gpu(monkeypatch):
    from ambiseg_diffusers.pipelines.pipeline_ambiseg import native_bf16

    asked = []
    capabilities = {"cuda:0": (9, 0), "cuda:1": (7, 5)}  # an H100 beside a T4
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(str(device)) or
                        capabilities[str(device)])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # what counts emulation too
    assert native_bf16(torch.device("cuda:1")) is False and native_bf16(torch.device("cuda:0")) is True
    assert asked == ["cuda:1", "cuda:0"]


def test_a_fused_adapter_refuses_the_knob_and_a_double_save(tokenizer, image, tmp_path):
    pipe = make_pipeline(tokenizer)
    add_tiny_adapter(pipe.unet)
    adapted = pipe(image, "a nodule", num_samples=2, generator=seeded(0)).probabilities
    pipe.fuse_lora()
    with pytest.raises(ValueError, match="fused into the UNet's weights"):
        pipe(image, "a nodule", num_samples=2, generator=seeded(0), preference_scale=0.0)
    with pytest.raises(ValueError, match="would apply it twice"):
        pipe.save_pretrained(tmp_path / "both")
    pipe.unload_lora_weights()  # one merged model
    pipe.save_pretrained(tmp_path / "merged")
    loaded = AmbiSegPipeline.from_pretrained(tmp_path / "merged")
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(loaded(image, "a nodule", num_samples=2, generator=seeded(0)).probabilities, adapted,
                               atol=1e-5)


def test_an_adapters_base_gets_the_token_and_cache_but_not_the_adapters_revision(tokenizer, tmp_path, monkeypatch):
    import huggingface_hub

    from ambiseg_diffusers import load_pipeline

    make_pipeline(tokenizer).save_pretrained(tmp_path / "base")
    adapted = make_pipeline(tokenizer)
    add_tiny_adapter(adapted.unet)
    adapter = tmp_path / "adapter"
    AmbiSegPipeline.save_lora_weights(adapter, unet_lora_layers=get_peft_model_state_dict(adapted.unet, adapter_name="preference"),
                                      weight_name=LORA_WEIGHT_NAME,
                                      unet_lora_adapter_metadata=adapted.unet.peft_config["preference"].to_dict())
    (adapter / "preference.json").write_text(json.dumps({"adapter_name": "preference", "base_model": "org/base"}))
    folders = {"org/adapter": adapter, "org/base": tmp_path / "base"}
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folders[repo_id])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    options = dict(revision="abc123", token="hf_x", cache_dir=str(tmp_path / "cache"))
    for load in (AmbiSegPipeline.from_pretrained, load_pipeline):
        calls.clear()
        load("org/adapter", **options)
        assert calls == [("org/adapter", options), ("org/base", {"token": "hf_x", "cache_dir": str(tmp_path / "cache")})]
    with pytest.raises(ValueError, match="`proxies` is not supported"):
        AmbiSegPipeline.from_pretrained("org/adapter", proxies={"https": "http://proxy:3128"})
