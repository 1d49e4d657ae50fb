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

from conftest import SIZE, make_pipeline

SCHEDULERS = [
    (DDPMScheduler, {}, 1000),
    (DDIMScheduler, {}, 5),
    (DPMSolverMultistepScheduler, {"thresholding": True, "sample_max_value": 1.0}, 5),
    (UniPCMultistepScheduler, {"thresholding": True, "sample_max_value": 1.0}, 5),
    (EulerDiscreteScheduler, {}, 5),
]


# Every scheduler with x0- and epsilon-prediction models (one DDPM-1000 run is enough).
CASES = [(*s, kind) for s in SCHEDULERS for kind in ("sample", "epsilon") if not (s[0] is DDPMScheduler and kind == "epsilon")]


@pytest.mark.parametrize("scheduler_cls,extra,steps,prediction_type", CASES, ids=[f"{c[0].__name__}-{c[3]}" for c in CASES])
def test_every_scheduler_runs_end_to_end(tokenizer, image, scheduler_cls, extra, steps, prediction_type):
    base = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=True)
    pipe = make_pipeline(tokenizer, scheduler_cls.from_config(base.config, **extra))
    out = pipe(image, "a solid nodule", num_samples=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
    assert out.masks.shape == (1, 2, SIZE, SIZE) and out.masks.dtype == bool
    assert np.isfinite(out.probabilities).all()
    assert out.probabilities.min() >= 0 and out.probabilities.max() <= 1
    assert out.pixel_mean.shape == (1, SIZE, SIZE) and out.pixel_variance.max() <= 0.25


def test_same_generator_same_masks_and_batch_size_does_not_matter(pipe, image):
    kwargs = dict(prompt="a round nodule", num_samples=5)
    a = pipe(image, generator=torch.Generator().manual_seed(7), **kwargs)
    b = pipe(image, generator=torch.Generator().manual_seed(7), batch_size=2, **kwargs)
    c = pipe(image, generator=torch.Generator().manual_seed(8), **kwargs)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
    assert not np.allclose(a.probabilities, c.probabilities)


def test_per_image_generators_make_images_independent_of_the_batch(pipe, image):
    other = image[::-1].copy()
    together = pipe([image, other], num_samples=3, generator=[torch.Generator().manual_seed(i) for i in (1, 2)])
    alone = pipe(other, num_samples=3, generator=[torch.Generator().manual_seed(2)])
    np.testing.assert_allclose(together.probabilities[1], alone.probabilities[0], atol=1e-5)


def test_samples_are_batched_and_each_prompt_encoded_once(pipe, image):
    unet_calls, text_batches = [], []
    pipe.unet.register_forward_hook(lambda m, args, kw, out: unet_calls.append(kw["encoder_hidden_states"].shape[0]), with_kwargs=True)
    pipe.text_encoder.register_forward_hook(lambda m, args, kw, out: text_batches.append(kw["input_ids"].shape[0]), with_kwargs=True)
    prompts = [["a solid nodule", "a round nodule"], ["a solid nodule"]]
    pipe([image, image], prompts, num_samples=4, num_inference_steps=3)
    assert unet_calls == [8, 8, 8]  # all 2 x 4 samples in one call per step
    assert text_batches == [2]  # two distinct prompts, encoded once


def test_prompts_spread_round_robin(pipe, image, monkeypatch):
    seen = []
    original = pipe.encode_prompt

    def spy(prompts, device=None):
        seen.append(list(prompts))
        return original(prompts, device)

    monkeypatch.setattr(pipe, "encode_prompt", spy)
    hidden_rows = []
    pipe.unet.register_forward_hook(lambda m, a, kw, o: hidden_rows.append(kw["encoder_hidden_states"]), with_kwargs=True)
    pipe(image, [["a small nodule", "a large nodule", "a round nodule"]], num_samples=5, num_inference_steps=1)
    unique = seen[0]
    rows = hidden_rows[0]
    states, _ = original(unique)
    expected = ["a small nodule", "a large nodule", "a round nodule", "a small nodule", "a large nodule"]
    for row, prompt in zip(rows, expected):
        length = states.shape[1]
        assert torch.allclose(row[:length], states[unique.index(prompt)].to(row.dtype))


@pytest.mark.parametrize("shape", [(SIZE, SIZE), (1, SIZE, SIZE), (SIZE, SIZE, 1)])
def test_single_image_shapes(pipe, shape):
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    assert pipe(image, num_samples=1).masks.shape == (1, 1, SIZE, SIZE)


def test_batched_inputs_torch_pil_and_ranges(pipe):
    rng = np.random.default_rng(0)
    batch = rng.random((3, SIZE, SIZE)).astype(np.float32)
    assert pipe(batch, num_samples=2).masks.shape == (3, 2, SIZE, SIZE)
    assert pipe(torch.from_numpy(batch)[:, None], num_samples=1).masks.shape == (3, 1, SIZE, SIZE)
    assert pipe(torch.from_numpy(batch)[..., None], num_samples=1).masks.shape == (3, 1, SIZE, SIZE)
    pil = PIL.Image.fromarray((batch[0] * 255).astype(np.uint8))
    # The pipeline owns the normalisation: 0-255 grey levels and the same image in [0, 1] give the same masks.
    a = pipe(pil, num_samples=2, generator=torch.Generator().manual_seed(0))
    b = pipe(np.asarray(pil) / 255.0, num_samples=2, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)


def test_output_types(pipe, image):
    pt = pipe(image, num_samples=2, output_type="pt")
    assert torch.is_tensor(pt.masks) and pt.masks.dtype == torch.bool
    pil = pipe(image, num_samples=2, output_type="pil")
    assert isinstance(pil.masks[0][1], PIL.Image.Image) and len(pil.masks[0]) == 2
    masks, probabilities, mean, variance = pipe(image, num_samples=2, return_dict=False)
    assert masks.shape == probabilities.shape


def test_threshold_and_prior_temperature(pipe, image):
    out = pipe(image, num_samples=3, threshold=0.3, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(out.masks, out.probabilities > 0.3)
    a = pipe(image, num_samples=2, prior_temperature=0.0, generator=torch.Generator().manual_seed(0))
    assert a.masks.shape == (1, 2, SIZE, SIZE)


def test_classifier_free_guidance_doubles_the_batch(pipe, image):
    calls = []
    pipe.unet.register_forward_hook(lambda m, a, kw, o: calls.append(kw["encoder_hidden_states"].shape[0]), with_kwargs=True)
    out = pipe(image, "a round nodule", num_samples=3, guidance_scale=2.0, num_inference_steps=2)
    assert calls == [6, 6] and out.masks.shape == (1, 3, SIZE, SIZE)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(image=np.zeros((2, 3, SIZE, SIZE))), "image"),
        (dict(image=np.zeros((SIZE, SIZE, 3, 2))), "image"),
        (dict(image=np.full((SIZE, SIZE), np.nan)), "NaN"),
        (dict(image=np.full((SIZE, SIZE), np.inf)), "NaN or inf"),
        (dict(image=np.zeros((SIZE + 1, SIZE))), "multiples"),
        (dict(image=[]), "empty list"),
        (dict(prompt=[]), "prompt"),
        (dict(prompt=["a", "b"]), "one per image"),
        (dict(prompt=[[]]), r"prompt\[0\]"),
        (dict(num_samples=0), "num_samples"),
        (dict(output_type="latent"), "output_type"),
        (dict(batch_size=0), "batch_size"),
        (dict(guidance_scale=0.5), "guidance_scale"),
        (dict(threshold=2.0), "threshold"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(generator=[torch.Generator(), torch.Generator()]), "generator"),
    ],
)
def test_bad_inputs_raise_value_errors(pipe, image, kwargs, match):
    call = dict(image=image, num_samples=1)
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pipe(**call)


def test_long_prompts_are_truncated_with_a_warning(pipe, image, caplog):
    from diffusers.utils import logging as dlogging

    dlogging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        out = pipe(image, "the nodule is solid " * 20, num_samples=1, num_inference_steps=1)
    dlogging.disable_propagation()
    assert "truncated" in caplog.text and out.masks.shape == (1, 1, SIZE, SIZE)


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


def _fill_hub_cache(folder, cache, repo_id, commit="0123456789abcdef0123456789abcdef01234567"):
    """The layout huggingface_hub writes after a download: blobs linked from snapshots/<commit>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for path in folder.rglob("*"):
        if path.is_file():
            target = snapshot / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_load_from_hub_repo_id_offline_from_cache(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    _fill_hub_cache(tmp_path / "saved", tmp_path / "hub", "ambiseg/tiny-test")
    script = textwrap.dedent(
        """
        import numpy as np
        from ambiseg_diffusers import AmbiSegPipeline
        pipe = AmbiSegPipeline.from_pretrained("ambiseg/tiny-test")
        pipe.set_progress_bar_config(disable=True)
        print("SHAPE", pipe(np.zeros((16, 16)), "a nodule", num_samples=2).masks.shape)
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "home"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "SHAPE (1, 2, 16, 16)" in result.stdout


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
    assert "library_name: ambiseg-diffusers" in call["card"] and "CC BY 3.0" in call["card"]
    assert "not a medical device" in call["card"]
