"""AmbiSegPipeline: golden values per sampling path, batching and prompt handling, inputs, saving and the Hub."""

import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler,
)

from ambiseg_diffusers import AmbiSegPipeline

from conftest import LATENT_DIM, SIZE, make_pipeline, tiny_unet


def golden(probabilities) -> np.ndarray:
    """Sixteen values of the first two samples (rows 6-7, columns 6-9): enough to see any change of the numbers."""
    return np.asarray(probabilities)[0, :2, 6:8, 6:10].reshape(-1)


# Regression values of each sampling path (tiny components, fixed seeds): a refactor that changes numbers fails here.
SCHEDULER_CASES = {
    "ddpm-sample": (DDPMScheduler, {}, 2, "sample"),
    "ddim-sample": (DDIMScheduler, {}, 5, "sample"),
    "ddim-epsilon": (DDIMScheduler, {}, 5, "epsilon"),
    "dpm-sample": (DPMSolverMultistepScheduler, {"thresholding": True, "sample_max_value": 1.0}, 5, "sample"),
    "dpm-epsilon": (DPMSolverMultistepScheduler, {"thresholding": True, "sample_max_value": 1.0}, 5, "epsilon"),
    "unipc-sample": (UniPCMultistepScheduler, {"thresholding": True, "sample_max_value": 1.0}, 5, "sample"),
    "euler-sample": (EulerDiscreteScheduler, {}, 5, "sample"),
    "euler-epsilon": (EulerDiscreteScheduler, {}, 5, "epsilon"),
}
EXPECTED = {
    "ddpm-sample": [0.5725, 0.2716, 0.0842, 0.2978, 0.2866, 0.4727, 0.5572, 0.3268, 0.4845, 0.0000, 0.1010, 0.2863, 0.2881, 0.2230, 0.7179, 0.5154],
    "ddim-sample": [0.5430, 0.2690, 0.0557, 0.2519, 0.2872, 0.3188, 0.5360, 0.2788, 0.5495, 0.0000, 0.0000, 0.5493, 0.2705, 0.1620, 0.7468, 0.6723],
    "ddim-epsilon": [0.5836, 0.7153, 0.8043, 0.9277, 0.7131, 0.3999, 0.7647, 0.9284, 0.8592, 0.4501, 0.9620, 0.7664, 0.4981, 0.8570, 0.1308, 0.0306],
    "dpm-sample": [0.6335, 0.3751, 0.3424, 0.3918, 0.7003, 0.4645, 0.7289, 0.4235, 1.0000, 0.4222, 0.0681, 0.7008, 0.0000, 0.3726, 0.4346, 0.2404],
    "dpm-epsilon": [0.0000, 0.8467, 1.0000, 0.0000, 0.0000, 1.0000, 1.0000, 0.0000, 0.6423, 1.0000, 1.0000, 1.0000, 1.0000, 1.0000, 1.0000, 0.0000],
    "unipc-sample": [0.6330, 0.3718, 0.3409, 0.3921, 0.6986, 0.4614, 0.7301, 0.4209, 1.0000, 0.4196, 0.0675, 0.7075, 0.0000, 0.3668, 0.4356, 0.2398],
    "euler-sample": [0.5307, 0.2503, 0.0654, 0.2678, 0.3531, 0.2941, 0.5665, 0.2855, 0.5621, 0.0000, 0.0000, 0.4837, 0.2417, 0.1977, 0.7650, 0.6487],
    "euler-epsilon": [0.0000, 1.0000, 1.0000, 0.0000, 0.0000, 1.0000, 1.0000, 0.4278, 1.0000, 1.0000, 1.0000, 1.0000, 1.0000, 1.0000, 1.0000, 0.0000],
    "guidance": [0.6415, 0.3269, 0.2134, 0.2238, 0.1791, 0.5995, 0.5538, 0.3137, 0.6024, 0.1036, 0.0613, 0.5229, 0.1338, 0.3372, 0.8005, 0.6710],
    "prior_temperature_0": [0.5924, 0.3840, 0.2172, 0.3075, 0.2195, 0.4336, 0.5982, 0.1824, 0.4740, 0.0218, 0.0000, 0.4509, 0.1409, 0.0719, 0.8020, 0.6461],
}


def scheduler_pipeline(tokenizer, case: str):
    scheduler_cls, extra, steps, prediction_type = SCHEDULER_CASES[case]
    base = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=True)
    return make_pipeline(tokenizer, scheduler_cls.from_config(base.config, **extra)), steps


@pytest.mark.parametrize("case", sorted(SCHEDULER_CASES))
def test_every_scheduler_matches_its_golden_values(tokenizer, image, case):
    pipe, steps = scheduler_pipeline(tokenizer, case)
    out = pipe(image, "a solid nodule", num_samples=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(golden(out.probabilities), EXPECTED[case], atol=1e-4)
    np.testing.assert_array_equal(out.masks, out.probabilities > 0.5)


def test_guidance_and_prior_temperature_golden_values(pipe, image):
    guided = pipe(image, "a round nodule", num_samples=2, guidance_scale=3.0, num_inference_steps=3,
                  generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(golden(guided.probabilities), EXPECTED["guidance"], atol=1e-4)
    cold = pipe(image, "a round nodule", num_samples=2, prior_temperature=0.0, num_inference_steps=3,
                generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(golden(cold.probabilities), EXPECTED["prior_temperature_0"], atol=1e-4)


def test_different_prompts_give_different_text_embeddings(pipe):
    ids = pipe.tokenizer(["a solid nodule", "a round nodule"])["input_ids"]
    assert ids[0] != ids[1] and pipe.tokenizer.unk_token_id not in ids[0] + ids[1]
    embeds, mask, _, _ = pipe.encode_prompt(["a solid nodule", "a round nodule"], "cpu")
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert (embeds[0] - embeds[1]).abs().max() > 1e-3


def test_same_generator_same_masks_and_batch_size_does_not_matter(tokenizer, image):
    pipe, _ = scheduler_pipeline(tokenizer, "ddpm-sample")  # stochastic steps: the strictest case
    kwargs = dict(prompt="a round nodule", num_samples=5, num_inference_steps=3)
    a = pipe(image, generator=torch.Generator().manual_seed(7), **kwargs)
    b = pipe(image, generator=torch.Generator().manual_seed(7), batch_size=2, **kwargs)
    c = pipe(image, generator=torch.Generator().manual_seed(8), **kwargs)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
    assert np.abs(a.probabilities - c.probabilities).max() > 1e-3


def test_batch_equals_single_calls_with_per_image_generators(pipe, image):
    other = image[::-1].copy()
    together = pipe([image, other], ["a solid nodule", "a round nodule"], num_samples=3,
                    generator=[torch.Generator().manual_seed(i) for i in (1, 2)])
    first = pipe(image, "a solid nodule", num_samples=3, generator=[torch.Generator().manual_seed(1)])
    second = pipe(other, "a round nodule", num_samples=3, generator=[torch.Generator().manual_seed(2)])
    np.testing.assert_allclose(together.probabilities[0], first.probabilities[0], atol=1e-5)
    np.testing.assert_allclose(together.probabilities[1], second.probabilities[0], atol=1e-5)


def test_samples_are_batched_and_each_prompt_encoded_once(pipe, image):
    unet_calls, text_batches = [], []
    pipe.unet.register_forward_hook(lambda m, args, kw, out: unet_calls.append(kw["encoder_hidden_states"].shape[0]), with_kwargs=True)
    pipe.text_encoder.register_forward_hook(lambda m, args, kw, out: text_batches.append(kw["input_ids"].shape[0]), with_kwargs=True)
    prompts = [["a solid nodule", "a round nodule"], ["a solid nodule"]]
    pipe([image, image], prompts, num_samples=4, num_inference_steps=3)
    assert unet_calls == [8, 8, 8]  # all 2 x 4 samples in one call per step
    assert text_batches == [2]  # two distinct prompts, encoded once
    unet_calls.clear()
    pipe([image, image], prompts, num_samples=4, num_inference_steps=2, batch_size=3)
    assert unet_calls == [3, 3, 2, 3, 3, 2]


def test_encode_prompts_output_is_accepted_back_for_a_prompt_list_per_image(pipe, image):
    """What `encode_prompt` returns for a prompt list per image, with fewer samples than the call draws (diffusers'
    isolation test moves the sample count into `encode_prompt`), is spread as the prompts are: the same masks."""
    prompts = [["a solid nodule", "a round nodule"], ["a small nodule", "a large nodule"]]
    embeds, mask, _, _ = pipe.encode_prompt(prompts, "cpu", num_samples=2)
    assert embeds.shape[0] == 4  # two rows per image
    call = dict(image=[image, image[::-1].copy()], num_samples=5, num_inference_steps=2)
    by_prompt = pipe(prompt=prompts, generator=torch.Generator().manual_seed(0), **call).probabilities
    by_embeds = pipe(prompt_embeds=embeds, prompt_attention_mask=mask, generator=torch.Generator().manual_seed(0),
                     **call).probabilities
    np.testing.assert_allclose(by_embeds, by_prompt, atol=1e-6)
    with pytest.raises(ValueError, match=r"`prompt_embeds` has 3 rows; expected one per image \(2\) or one per sample "
                                         r"\(10\), or the same number for each image"):
        pipe(prompt_embeds=embeds[:3], prompt_attention_mask=mask[:3], **call)


def test_prompts_spread_round_robin(pipe, image):
    rows = []
    pipe.unet.register_forward_hook(lambda m, a, kw, o: rows.append(kw["encoder_hidden_states"]), with_kwargs=True)
    prompts = ["a small nodule", "a large nodule", "a round nodule"]
    pipe(image, [prompts], num_samples=5, num_inference_steps=1)
    alone = {p: pipe.encode_prompt(p, "cpu")[0][0] for p in prompts}
    expected = ["a small nodule", "a large nodule", "a round nodule", "a small nodule", "a large nodule"]
    for row, prompt in zip(rows[0], expected):
        torch.testing.assert_close(row, alone[prompt])
    assert not torch.allclose(alone["a small nodule"], alone["a large nodule"])


def test_prior_temperature_zero_gives_every_sample_the_prior_mean(pipe, image):
    latents = []
    pipe.unet.register_forward_hook(lambda m, a, kw, o: latents.append(kw["class_labels"]), with_kwargs=True)
    pipe(image, "a nodule", num_samples=3, num_inference_steps=1, prior_temperature=0.0)
    pipe(image, "a nodule", num_samples=3, num_inference_steps=1)
    cold, warm = latents
    text, mask, _, _ = pipe.encode_prompt("a nodule", "cpu")
    mean = pipe.prior(pipe.preprocess(image), text, mask).mean
    torch.testing.assert_close(cold, mean.expand(3, -1))
    assert (warm[0] - warm[1]).abs().max() > 1e-3


@pytest.mark.parametrize("shape", [(SIZE, SIZE), (1, SIZE, SIZE), (SIZE, SIZE, 1)])
def test_single_image_layouts_give_the_same_masks(pipe, image, shape):
    reference = pipe(image, num_samples=1, generator=torch.Generator().manual_seed(0)).probabilities
    out = pipe(image.reshape(shape), num_samples=1, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(out.probabilities, reference)


def test_batched_inputs_torch_pil_and_ranges(pipe):
    rng = np.random.default_rng(0)
    batch = rng.random((3, SIZE, SIZE)).astype(np.float32)
    generator = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    plain = pipe(batch, num_samples=2, generator=generator()).probabilities
    assert plain.shape == (3, 2, SIZE, SIZE)
    np.testing.assert_array_equal(pipe(torch.from_numpy(batch)[:, None], num_samples=2, generator=generator()).probabilities, plain)
    np.testing.assert_array_equal(pipe(torch.from_numpy(batch)[..., None], num_samples=2, generator=generator()).probabilities, plain)
    pil = PIL.Image.fromarray((batch[0] * 255).astype(np.uint8))
    # The pipeline owns the normalisation: 0-255 grey levels and the same image in [0, 1] give the same masks.
    a = pipe(pil, num_samples=2, generator=torch.Generator().manual_seed(0))
    b = pipe(np.asarray(pil) / 255.0, num_samples=2, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)


def test_output_types_hold_the_same_result(pipe, image):
    call = lambda **kw: pipe(image, num_samples=2, threshold=0.4, generator=torch.Generator().manual_seed(0), **kw)  # noqa: E731
    np_out = call()
    pt = call(output_type="pt")
    assert torch.is_tensor(pt.masks) and pt.masks.dtype == torch.bool
    np.testing.assert_array_equal(pt.probabilities.numpy(), np_out.probabilities)
    pil = call(output_type="pil")
    np.testing.assert_array_equal(np.asarray(pil.masks[0][1]) > 0, np_out.masks[0, 1])
    probabilities, masks, mean, variance = call(return_dict=False)  # probabilities first, as diffusers' images
    np.testing.assert_array_equal(masks, np_out.probabilities > 0.4)
    np.testing.assert_array_equal(probabilities, np_out.probabilities)
    np.testing.assert_allclose(mean, np_out.probabilities.mean(1), atol=1e-6)
    np.testing.assert_allclose(variance, np_out.probabilities.var(1), atol=1e-6)


def test_the_old_tuple_order_is_accepted_for_one_release_with_a_deprecation(pipe, image, monkeypatch):
    from ambiseg_diffusers.deprecation import deprecate
    from ambiseg_diffusers.pipelines import pipeline_ambiseg

    call = lambda **kw: pipe(image, num_samples=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kw)  # noqa: E731
    expected = call()
    with pytest.warns(FutureWarning, match=r"`masks_first` is deprecated and will be removed in ambiseg-diffusers 0\.3\.0"):
        masks, probabilities, _, _ = call(return_dict=False, masks_first=True)  # 0.1.0 code, unchanged
    np.testing.assert_array_equal(masks, expected.masks)
    np.testing.assert_array_equal(probabilities, expected.probabilities)
    with pytest.raises(TypeError, match="mask_first"):  # a misspelt keyword is not swallowed
        call(mask_first=True)
    # the shim cannot outlive its release: at 0.3.0 the deprecation itself fails
    monkeypatch.setattr("ambiseg_diffusers.deprecation.__version__", pipeline_ambiseg.MASKS_FIRST_REMOVAL)
    with pytest.raises(ValueError, match="should be removed"):
        deprecate("masks_first", pipeline_ambiseg.MASKS_FIRST_REMOVAL, "")


def test_classifier_free_guidance_doubles_the_batch(pipe, image):
    calls = []
    pipe.unet.register_forward_hook(lambda m, a, kw, o: calls.append(kw["encoder_hidden_states"].shape[0]), with_kwargs=True)
    pipe(image, "a round nodule", num_samples=3, guidance_scale=2.0, num_inference_steps=2)
    assert calls == [6, 6]
    assert pipe.guidance_scale == 2.0 and pipe.do_classifier_free_guidance and pipe.num_timesteps == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(image=np.zeros((2, 3, SIZE, SIZE))), "image"),
        (dict(image=np.zeros((SIZE, SIZE, 3, 2))), "image"),
        (dict(image=np.full((SIZE, SIZE), np.nan)), "NaN"),
        (dict(image=np.full((SIZE, SIZE), np.inf)), "NaN or inf"),
        (dict(image=[]), "empty list"),
        (dict(image=None), "`image` is required"),
        (dict(prompt=[]), "prompt"),
        (dict(prompt=["a", "b"]), "one per image"),
        (dict(prompt=[[]]), r"prompt\[0\]"),
        (dict(num_samples=0), "num_samples"),
        (dict(output_type="latents"), "output_type"),
        (dict(batch_size=0), "batch_size"),
        (dict(guidance_scale=0.5), "guidance_scale"),
        (dict(threshold=2.0), "threshold"),
        (dict(prior_temperature=-1.0), "prior_temperature"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(generator=[torch.Generator(), torch.Generator()]), "generator"),
        (dict(latents=torch.zeros(2, 1, SIZE, SIZE)), "latents"),
        (dict(prompt="a", prompt_embeds=torch.zeros(1, 3, 16), prompt_attention_mask=torch.ones(1, 3)), "either"),
        (dict(prompt_embeds=torch.zeros(1, 3, 16)), "prompt_attention_mask"),
        (dict(image=np.zeros((2, SIZE, SIZE), np.float32), prompt_embeds=torch.zeros(3, 3, 16),
              prompt_attention_mask=torch.ones(3, 3)), "prompt_embeds"),  # not the same number per image
        (dict(callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(guidance_scale=float("inf")), "guidance_scale"),
        (dict(prompt_embeds=torch.zeros(1, 3, 16), prompt_attention_mask=torch.ones(1, 3), negative_prompt="x",
              negative_prompt_embeds=torch.zeros(1, 3, 16), negative_prompt_attention_mask=torch.ones(1, 3),
              guidance_scale=2.0), "either `negative_prompt` or `negative_prompt_embeds`"),
        (dict(ambiguity_latents=torch.zeros(1, LATENT_DIM + 1)), r"`ambiguity_latents` must be \(rows, 3\)"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(pipe, image, kwargs, match):
    call = dict(image=image, num_samples=1)
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pipe(**call)


def test_ambiguity_latents_are_refused_by_a_unet_without_latent(tokenizer, image):
    pipe = make_pipeline(tokenizer)
    pipe.unet = tiny_unet(latent_dim=0)
    with pytest.raises(ValueError, match="takes no ambiguity latent"):
        pipe(image, num_samples=1, ambiguity_latents=torch.zeros(1, LATENT_DIM))


def test_an_image_far_from_the_training_size_is_segmented_with_a_warning(pipe, caplog):
    from diffusers.utils import logging as dlogging

    dlogging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            pipe(np.zeros((4 * SIZE, 4 * SIZE), np.float32), num_samples=1, num_inference_steps=1)  # 4x: accepted
            assert "this model expects" not in caplog.text
            out = pipe(np.zeros((5 * SIZE, 5 * SIZE), np.int16), num_samples=1, num_inference_steps=1)
    finally:
        dlogging.disable_propagation()
    assert f"is {5 * SIZE}x{5 * SIZE} pixels, outside {SIZE // 2}-{4 * SIZE}" in caplog.text
    assert f"this model expects {SIZE}x{SIZE} crops" in caplog.text
    assert out.masks.shape == (1, 1, 5 * SIZE, 5 * SIZE)  # segmented all the same, at its own size


def test_long_prompts_are_truncated_with_one_warning(pipe, image, caplog):
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    dlogging.enable_propagation()
    tlogging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            out = pipe(image, "the nodule is solid " * 130, num_samples=1, num_inference_steps=1)
    finally:
        dlogging.disable_propagation()
        tlogging.disable_propagation()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "truncated" in warnings[0], warnings
    assert out.masks.shape == (1, 1, SIZE, SIZE)


def test_save_and_load_round_trip_bit_exact(pipe, image, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = AmbiSegPipeline.from_pretrained(tmp_path)
    assert not loaded.text_encoder.training
    assert loaded.image_processor.to_json_string() == pipe.image_processor.to_json_string()
    for name in ("unet", "prior", "posterior", "text_encoder"):
        for (k, a), (_, b) in zip(getattr(pipe, name).state_dict().items(), getattr(loaded, name).state_dict().items()):
            assert torch.equal(a, b), f"{name}.{k}"
    loaded.set_progress_bar_config(disable=True)
    a = pipe(image, "a solid nodule", num_samples=3, generator=torch.Generator().manual_seed(0))
    b = loaded(image, "a solid nodule", num_samples=3, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(a.probabilities, b.probabilities)
    assert all((tmp_path / c).is_dir() for c in ("unet", "prior", "posterior", "text_encoder", "tokenizer", "scheduler"))
    assert not list(tmp_path.rglob("*.bin")) and list(tmp_path.rglob("*.safetensors"))


def fill_hub_cache(folder, cache, repo_id, commit="0123456789abcdef0123456789abcdef01234567"):
    """The layout huggingface_hub writes after a download: files under snapshots/<commit>, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for path in folder.rglob("*"):
        if path.is_file():
            target = snapshot / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def run_offline(script: str, cache, home) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(home))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                          timeout=300)


def sample_offline(repo_id: str, image, tmp_path) -> np.ndarray:
    """Loads `repo_id` in a fresh process with HF_HUB_OFFLINE=1 from the cache in `tmp_path/hub` and samples 2 masks."""
    np.save(tmp_path / "image.npy", image)
    result = run_offline(f"""
        import numpy as np, torch
        from ambiseg_diffusers import AmbiSegPipeline
        pipe = AmbiSegPipeline.from_pretrained("{repo_id}")
        pipe.set_progress_bar_config(disable=True)
        out = pipe(np.load("{tmp_path / 'image.npy'}"), "a nodule", num_samples=2, generator=torch.Generator().manual_seed(0))
        np.save("{tmp_path / 'out.npy'}", out.probabilities)
    """, tmp_path / "hub", tmp_path / "home")
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(tmp_path / "out.npy")


def test_load_from_hub_repo_id_offline_from_cache(pipe, image, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    fill_hub_cache(tmp_path / "saved", tmp_path / "hub", "ambiseg/tiny-test")
    expected = pipe(image, "a nodule", num_samples=2, generator=torch.Generator().manual_seed(0)).probabilities
    # Another process may use another thread count: equal up to float rounding.
    np.testing.assert_allclose(sample_offline("ambiseg/tiny-test", image, tmp_path), expected, atol=1e-5)


def test_missing_local_paths_are_reported_before_any_hub_call(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("asked the Hub"))
    for path in ("./checkpoints/nope", str(tmp_path / "nope"), "runs/a/b", "../x"):
        with pytest.raises(FileNotFoundError, match="not a folder"):
            AmbiSegPipeline.from_pretrained(path)


def test_a_missing_repo_or_folder_names_both_possibilities(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="neither a local folder .* nor a Hub repo") as error:
        AmbiSegPipeline.from_pretrained("checkpoints/not-here")
    assert "checkpoints/not-here" in str(error.value) and "cached snapshot" in str(error.value)


def test_push_to_hub_uploads_the_pipeline_with_a_model_card(pipe, monkeypatch):
    import huggingface_hub

    calls = []

    class Repo:
        repo_id = "user/ambiseg-test"

    def fake_upload_folder(**kwargs):
        folder = kwargs["folder_path"]
        files = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)
        calls.append({"repo_id": kwargs["repo_id"], "files": files, "card": open(os.path.join(folder, "README.md")).read()})
        return "https://huggingface.co/user/ambiseg-test/commit/1"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: Repo())
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    pipe.push_to_hub("ambiseg-test")
    (call,) = calls
    assert call["repo_id"] == "user/ambiseg-test"
    assert "model_index.json" in call["files"] and "unet/diffusion_pytorch_model.safetensors" in call["files"]
    card = huggingface_hub.ModelCard(call["card"])
    assert card.data.library_name == "diffusers" and "ambiseg-diffusers" in card.data.tags
    assert "CC BY 3.0" in call["card"] and "not a medical device" in call["card"]
    assert 'AmbiSegPipeline.from_pretrained("user/ambiseg-test")' in call["card"]


def test_autocast_modes(pipe, image, monkeypatch):
    from ambiseg_diffusers.pipelines import pipeline_ambiseg

    call = lambda **kw: pipe(image, num_samples=2, generator=torch.Generator().manual_seed(0), **kw).probabilities  # noqa: E731
    fp32, bf16 = call(), call(autocast="bf16")
    assert 1e-4 < np.abs(fp32 - bf16).max() < 0.2  # another precision, the same model
    np.testing.assert_array_equal(call(autocast="bf16"), bf16)  # bit-reproducible per generator and mode
    monkeypatch.setattr(pipeline_ambiseg, "native_bf16", lambda device: True)
    np.testing.assert_array_equal(call(autocast="auto"), bf16)
    monkeypatch.setattr(pipeline_ambiseg, "native_bf16", lambda device: False)
    np.testing.assert_array_equal(call(autocast="auto"), fp32)
    with pytest.raises(ValueError, match="autocast"):
        call(autocast="fp16")
