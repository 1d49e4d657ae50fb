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
    "ddpm-sample": [0.5795, 0.2622, 0.0860, 0.2997, 0.2812, 0.4778, 0.5571, 0.3228, 0.4861, 0.0000, 0.1004, 0.2868, 0.2916, 0.2214, 0.7239, 0.5139],
    "ddim-sample": [0.5493, 0.2660, 0.0517, 0.2532, 0.2985, 0.3172, 0.5387, 0.2714, 0.5487, 0.0000, 0.0000, 0.5524, 0.2720, 0.1604, 0.7490, 0.6746],
    "ddim-epsilon": [0.5377, 0.7278, 0.8315, 0.9409, 0.7288, 0.3875, 0.7031, 0.9370, 0.8538, 0.4666, 0.9685, 0.7632, 0.4614, 0.8323, 0.1342, 0.0302],
    "dpm-sample": [0.6336, 0.3763, 0.3442, 0.3923, 0.6997, 0.4648, 0.7265, 0.4230, 1.0000, 0.4223, 0.0673, 0.6999, 0.0000, 0.3721, 0.4362, 0.2374],
    "dpm-epsilon": [0.0000, 0.8557, 1.0000, 0.0000, 0.0000, 1.0000, 0.9473, 0.0086, 0.6463, 1.0000, 1.0000, 1.0000, 1.0000, 1.0000, 1.0000, 0.0000],
    "unipc-sample": [0.6329, 0.3730, 0.3427, 0.3926, 0.6980, 0.4617, 0.7275, 0.4204, 1.0000, 0.4197, 0.0667, 0.7066, 0.0000, 0.3661, 0.4372, 0.2367],
    "euler-sample": [0.5367, 0.2460, 0.0605, 0.2708, 0.3632, 0.2945, 0.5685, 0.2791, 0.5604, 0.0000, 0.0000, 0.4855, 0.2422, 0.1957, 0.7680, 0.6500],
    "euler-epsilon": [0.0000, 1.0000, 1.0000, 0.0000, 0.0000, 1.0000, 1.0000, 0.9595, 1.0000, 1.0000, 1.0000, 1.0000, 1.0000, 1.0000, 1.0000, 0.0000],
    "guidance": [0.6519, 0.3206, 0.2128, 0.2229, 0.1885, 0.5968, 0.5591, 0.3088, 0.6003, 0.1096, 0.0587, 0.5245, 0.1357, 0.3320, 0.8037, 0.6690],
    "prior_temperature_0": [0.5971, 0.3765, 0.2127, 0.3079, 0.2243, 0.4313, 0.5957, 0.1811, 0.4670, 0.0209, 0.0000, 0.4516, 0.1366, 0.0671, 0.7971, 0.6418],
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
    guided = pipe(image, "a round nodule", num_samples=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(golden(guided.probabilities), EXPECTED["guidance"], atol=1e-4)
    cold = pipe(image, "a round nodule", num_samples=2, prior_temperature=0.0, generator=torch.Generator().manual_seed(0))
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
    masks, probabilities, mean, variance = call(return_dict=False)
    np.testing.assert_array_equal(masks, np_out.probabilities > 0.4)
    np.testing.assert_array_equal(probabilities, np_out.probabilities)
    np.testing.assert_allclose(mean, np_out.probabilities.mean(1), atol=1e-6)
    np.testing.assert_allclose(variance, np_out.probabilities.var(1), atol=1e-6)


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
        (dict(image=np.zeros((SIZE + 1, SIZE))), "multiples"),
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
        (dict(prompt_embeds=torch.zeros(3, 3, 16), prompt_attention_mask=torch.ones(3, 3)), "prompt_embeds"),
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
            pipe(np.zeros((SIZE, SIZE), np.float32), num_samples=1, num_inference_steps=1)
            assert "trained on" not in caplog.text
            pipe(np.zeros((4 * SIZE, 4 * SIZE), np.int16), num_samples=1, num_inference_steps=1)
    finally:
        dlogging.disable_propagation()
    assert f"is {4 * SIZE}x{4 * SIZE} pixels; this model was trained on {SIZE}x{SIZE} crops" in caplog.text


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
    assert not loaded.text_encoder.training and loaded.config.image_clip == pipe.config.image_clip
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
