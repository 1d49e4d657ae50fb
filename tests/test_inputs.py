"""A new user's inputs: the image contract table, generators and sample counts, and corrupted or missing weights."""

import numpy as np
import PIL.Image
import pytest
import torch

from ambiseg_diffusers import AmbiSegPipeline, prepare_image



GREY = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)

# (input, expected (B, 1, H, W) shape) for every accepted layout; the values must come through unchanged.
ACCEPTED = [
    ("(H, W)", GREY, (1, 1, 64, 64)),
    ("(1, H, W)", GREY[None], (1, 1, 64, 64)),
    ("(H, W, 1)", GREY[..., None], (1, 1, 64, 64)),
    ("(B, H, W)", np.stack([GREY, GREY + 1]), (2, 1, 64, 64)),
    ("(B, 1, H, W)", np.stack([GREY, GREY + 1])[:, None], (2, 1, 64, 64)),
    ("(B, H, W, 1)", np.stack([GREY, GREY + 1])[..., None], (2, 1, 64, 64)),
    ("list of (H, W)", [GREY, GREY + 1], (2, 1, 64, 64)),
    ("torch (H, W)", torch.from_numpy(GREY), (1, 1, 64, 64)),
    ("uint8 (H, W)", (GREY % 256).astype(np.uint8), (1, 1, 64, 64)),
]

REFUSED = [
    ("RGBA (H, W, 4)", np.zeros((64, 64, 4)), r"colour image in \(H, W, C\) layout with 4 channels"),
    ("RGB (H, W, 3)", np.zeros((64, 64, 3)), r"colour image in \(H, W, C\) layout with 3 channels"),
    ("RGB batch (B, H, W, 3)", np.zeros((2, 64, 64, 3)), r"\(B, H, W, C\) layout"),
    ("empty (0, 0)", np.zeros((0, 0)), "empty"),
    ("no images (0, H, W)", np.zeros((0, 64, 64)), "empty"),
    ("one row (1, W)", np.zeros((1, 64)), "degenerate"),
    ("5-D", np.zeros((1, 1, 1, 64, 64)), "must be"),
    ("1-D", np.zeros(64), "must be"),
    ("strings", np.array([["a", "b"], ["c", "d"]]), "real numbers"),
    ("complex", np.zeros((64, 64), np.complex64), "real numbers"),
    ("NaN", np.full((64, 64), np.nan), "NaN"),
    ("not an image", "scan.png", "numpy array, torch tensor or PIL image"),
    ("mixed sizes", [GREY, GREY[:32, :32]], "one shape"),
    ("empty list", [], "empty list"),
]


@pytest.mark.parametrize("name,image,shape", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_accepted_layouts(name, image, shape):
    batch = prepare_image(image)
    assert tuple(batch.shape) == shape
    first = GREY % 256 if "uint8" in name else GREY
    np.testing.assert_array_equal(batch[0, 0].numpy(), first)  # values as stored, pixels in place
    if shape[0] == 2:
        np.testing.assert_array_equal(batch[1, 0].numpy(), GREY + 1)


@pytest.mark.parametrize("name,image,match", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_inputs_name_the_problem(name, image, match):
    with pytest.raises(ValueError, match=match):
        prepare_image(image)


def test_colour_pil_images_are_read_as_grey():
    rgb = PIL.Image.fromarray(np.stack([GREY % 256, np.zeros_like(GREY), np.zeros_like(GREY)], -1).astype(np.uint8))
    batch = prepare_image(rgb)
    np.testing.assert_array_equal(batch[0, 0].numpy(), np.asarray(rgb.convert("L"), np.float32))


@pytest.mark.parametrize("generator", [0, "seed", [0, 1], np.random.default_rng(0)])
def test_generators_must_be_torch_generators(pipe, image, generator):
    with pytest.raises(ValueError, match="`generator` must be a torch.Generator"):
        pipe(image, num_samples=1, generator=generator)


def test_numpy_integers_count_as_sample_counts(pipe, image):
    a = pipe(image, num_samples=np.int64(2), generator=torch.Generator().manual_seed(0)).probabilities
    b = pipe(image, num_samples=2, generator=torch.Generator().manual_seed(0)).probabilities
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="num_samples"):
        pipe(image, num_samples=2.0)


def test_corrupted_or_missing_weights_are_reported_with_the_file(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "ok")
    weights = tmp_path / "ok" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1500:-500] = b"\xff" * 1000  # NaNs in the data section: the header still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"component `unet` .* non-finite"):
        AmbiSegPipeline.from_pretrained(tmp_path / "ok")

    pipe.save_pretrained(tmp_path / "header")
    text = tmp_path / "header" / "text_encoder" / "model.safetensors"
    text.write_bytes(b"\x00" * 16 + text.read_bytes()[16:])
    with pytest.raises(OSError, match=r"component `text_encoder`: .*model.safetensors is not a readable safetensors"):
        AmbiSegPipeline.from_pretrained(tmp_path / "header")

    pipe.save_pretrained(tmp_path / "missing")
    (tmp_path / "missing" / "prior" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"component `prior`: its weights are missing from .*prior"):
        AmbiSegPipeline.from_pretrained(tmp_path / "missing")


def test_variants_and_bin_weights_round_trip_the_diffusers_way(pipe, image, tmp_path):
    expected = pipe(image, "a nodule", num_samples=2, generator=torch.Generator().manual_seed(0)).probabilities
    pipe.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert (tmp_path / "fp16" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = AmbiSegPipeline.from_pretrained(tmp_path / "fp16", variant="fp16")
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(
        loaded(image, "a nodule", num_samples=2, generator=torch.Generator().manual_seed(0)).probabilities, expected,
        atol=1e-5)
    with pytest.raises(ValueError, match="variant=bf16"):  # diffusers' own message for a variant that is not there
        AmbiSegPipeline.from_pretrained(tmp_path / "fp16", variant="bf16")

    pipe.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "unet" / "diffusion_pytorch_model.bin").is_file()
    loaded = AmbiSegPipeline.from_pretrained(tmp_path / "bin")  # read with torch.load(weights_only=True)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(
        loaded(image, "a nodule", num_samples=2, generator=torch.Generator().manual_seed(0)).probabilities, expected,
        atol=1e-5)


def test_device_map_cpu_gives_the_same_masks(pipe, image, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    plain = AmbiSegPipeline.from_pretrained(tmp_path / "saved")
    mapped = AmbiSegPipeline.from_pretrained(tmp_path / "saved", device_map="cpu")
    outputs = []
    for loaded in (plain, mapped):
        loaded.set_progress_bar_config(disable=True)
        outputs.append(loaded(image, "a nodule", num_samples=3, generator=torch.Generator().manual_seed(1)).probabilities)
    assert getattr(mapped, "hf_device_map", None) is not None
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_one_generator_per_sample_is_accepted_and_each_sample_follows_its_own(pipe, image):
    """diffusers' habit, one generator per output: sample s draws from generator[s] alone."""
    seeds = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    out = pipe(image, "a nodule", num_samples=3, generator=seeds).probabilities
    again = pipe(image, "a nodule", num_samples=3,
                 generator=[torch.Generator().manual_seed(s) for s in (9, 6, 8)]).probabilities
    np.testing.assert_allclose(out[0, 1], again[0, 1], atol=1e-6)  # the same generator, the same sample
    assert np.abs(out[0, 0] - again[0, 0]).max() > 1e-3
    with pytest.raises(ValueError, match=r"list of 2; expected one per image \(1\) or one per sample \(3\)"):
        pipe(image, "a nodule", num_samples=3, generator=seeds[:2])


def test_a_flat_list_of_prompts_for_one_image_says_to_wrap_it(pipe, image):
    with pytest.raises(ValueError, match=r"3 entries but `image` has 1 images.*wrap them in a list: `prompt=\[prompts\]`"):
        pipe(image, ["a nodule", "a round nodule", "a solid nodule"], num_samples=3)
    pipe(image, [["a nodule", "a round nodule", "a solid nodule"]], num_samples=3)  # wrapped: one list per image


def test_float16_weights_on_a_cpu_warn_that_they_are_slow(tokenizer, image, caplog):
    from conftest import make_pipeline

    half = make_pipeline(tokenizer).to(torch.float16)
    half.set_progress_bar_config(disable=True)
    with caplog.at_level("WARNING"):
        half(image, "a nodule", num_samples=1, num_inference_steps=1)
    assert "float16 weights on a CPU" in caplog.text and "dtype=torch.float32" in caplog.text
