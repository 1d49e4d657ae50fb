"""AmbiSegImageProcessor (issue 42): any accepted size in, the model's size inside, probabilities and masks back at
each image's own size; warnings and errors that name what the model expects; on real validate crops, a crop resized
to 128 scores as the same crop at 64."""

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ambiseg_diffusers import AmbiSegImageProcessor

from conftest import ROOT, SIZE, make_pipeline, needs_data


@pytest.fixture
def warnings_of(caplog):
    """The diffusers warnings a callable logs."""
    from diffusers.utils import logging as dlogging

    def run(fn):
        caplog.clear()
        dlogging.enable_propagation()
        try:
            with caplog.at_level(logging.WARNING):
                fn()
        finally:
            dlogging.disable_propagation()
        return caplog.text

    return run


def test_preprocess_resizes_bilinearly_then_normalises_like_training():
    processor = AmbiSegImageProcessor(size=8, image_clip=2.0)
    image = torch.arange(256, dtype=torch.float32).reshape(16, 16) ** 1.5
    pixels, sizes = processor.preprocess(image.numpy())
    half = F.interpolate(image[None, None], size=(8, 8), mode="bilinear", align_corners=False)
    z = (half - half.mean()) / half.std(unbiased=False)
    torch.testing.assert_close(pixels, z.clamp(-2, 2) / 2)
    assert sizes == [(16, 16)] and pixels.shape == (1, 1, 8, 8)
    # a 2x bilinear downsize (align_corners=False) is the mean of each 2x2 block
    torch.testing.assert_close(half, F.avg_pool2d(image[None, None], 2))


def test_postprocess_returns_probabilities_and_thresholded_masks_at_each_images_size():
    processor = AmbiSegImageProcessor(size=4)
    probabilities = torch.tensor([[0.0, 0.2, 0.8, 1.0]]).repeat(4, 1)[None, None]  # (1, 1, 4, 4): a ramp left to right
    up, masks = processor.postprocess(probabilities, [(8, 8)])
    expected = F.interpolate(probabilities, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up, expected)
    assert up.shape == masks.shape == (1, 1, 8, 8)
    # bilinear at the new pixel centres: 0, 0.05, 0.15, 0.35, 0.65, 0.85, 0.95, 1 across a row
    np.testing.assert_allclose(up[0, 0, 0].numpy(), [0, 0.05, 0.15, 0.35, 0.65, 0.85, 0.95, 1], atol=1e-6)
    assert masks[0, 0, 0].tolist() == [False] * 4 + [True] * 4
    several, several_masks = processor.postprocess(torch.rand(2, 3, 4, 4), [(8, 8), (4, 6)], threshold=0.3)
    assert [p.shape for p in several] == [(3, 8, 8), (3, 4, 6)]
    assert all(torch.equal(m, p > 0.3) for p, m in zip(several, several_masks))


def test_masks_are_resized_nearest_exact_and_stay_binary():
    processor = AmbiSegImageProcessor(size=4)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 1::2, 1::2] = 1  # only odd pixels: nearest-exact samples the centres 1, 3, 5, 7 of 2x2 blocks
    assert processor.resize_masks(mask).tolist() == torch.ones(1, 1, 4, 4).tolist()
    image, masks = processor.resize_pair(np.zeros((8, 8), np.float32), mask[0].numpy().astype(np.uint8))
    assert image.shape == (4, 4) and masks.dtype == np.uint8 and set(np.unique(masks)) == {1}


def test_warnings_name_what_the_model_expects(warnings_of):
    processor = AmbiSegImageProcessor(size=64)
    assert warnings_of(lambda: processor.preprocess(np.zeros((64, 64)))) == ""
    assert warnings_of(lambda: processor.preprocess(np.zeros((256, 256)))) == ""  # 4x: accepted
    small = warnings_of(lambda: processor.preprocess(np.zeros((31, 31))))
    assert "31x31 pixels, outside 32-256 (0.5x-4.0x the training size)" in small
    assert "this model expects 64x64 crops" in small
    assert "257x257 pixels, outside" in warnings_of(lambda: processor.preprocess(np.zeros((257, 257))))
    oblong = warnings_of(lambda: processor.preprocess(np.zeros((64, 96))))
    assert "64x96 (height x width), not square" in oblong and "masks come back at 64x96" in oblong


def test_a_channel_mismatch_is_an_error_naming_the_models_channels():
    with pytest.raises(ValueError, match=r"this model reads 1 channel"):
        AmbiSegImageProcessor(size=8).preprocess([np.zeros((5, 8, 8))])  # one 5-channel image
    with pytest.raises(ValueError, match=r"C = 3 \(the channels this model reads\)"):
        AmbiSegImageProcessor(size=8, image_channels=3).preprocess(np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="mask_resample"):
        AmbiSegImageProcessor(mask_resample="bilinear")


def test_the_pipeline_returns_masks_at_each_inputs_size(tokenizer, image):
    pipe = make_pipeline(tokenizer)
    large = F.interpolate(torch.as_tensor(image)[None, None], size=(2 * SIZE, 2 * SIZE), mode="bilinear")[0, 0]
    call = dict(prompt=["a nodule", "a nodule"], num_samples=2, num_inference_steps=2)
    out = pipe([image, large.numpy()], **call, generator=[torch.Generator().manual_seed(i) for i in range(2)])
    assert [m.shape for m in out.masks] == [(2, SIZE, SIZE), (2, 2 * SIZE, 2 * SIZE)]
    assert [m.shape for m in out.pixel_mean] == [(SIZE, SIZE), (2 * SIZE, 2 * SIZE)]
    # the masks are the model-size samples brought back by the processor, then thresholded
    raw = pipe([image, large.numpy()], **call, output_type="latent",
               generator=[torch.Generator().manual_seed(i) for i in range(2)]).masks
    probabilities = ((raw + 1) / 2).clamp(0, 1).reshape(2, 2, SIZE, SIZE)
    expected = F.interpolate(probabilities[1:], size=(2 * SIZE, 2 * SIZE), mode="bilinear", align_corners=False)[0]
    np.testing.assert_allclose(out.probabilities[1], expected.numpy(), atol=1e-6)
    np.testing.assert_array_equal(out.masks[1], expected.numpy() > 0.5)
    one = pipe(large.numpy(), "a nodule", num_samples=2, num_inference_steps=2, output_type="pt",
               generator=torch.Generator().manual_seed(1))
    assert one.masks.shape == (1, 2, 2 * SIZE, 2 * SIZE) and one.masks.dtype == torch.bool


def test_the_processor_is_a_saved_component_and_a_folder_without_it_loads(tokenizer, tmp_path):
    from diffusers import DiffusionPipeline

    from ambiseg_diffusers import AmbiSegPipeline

    pipe = make_pipeline(tokenizer)
    pipe.image_processor = AmbiSegImageProcessor(size=SIZE, image_clip=2.5)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["image_processor"] == ["image_processor", "AmbiSegImageProcessor"]
    assert json.loads((tmp_path / "image_processor" / "preprocessor_config.json").read_text())["image_clip"] == 2.5
    assert AmbiSegPipeline.from_pretrained(tmp_path).image_processor.config.image_clip == 2.5
    theirs = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(theirs.image_processor).__name__ == "AmbiSegImageProcessor"
    assert theirs.image_processor.config.image_clip == 2.5


@needs_data
def test_committed_checkpoints_carry_their_processor():
    for name in ("ambiseg-lidc64", "ambiseg-lidc64-text", "prob-unet-lidc64"):
        folder = ROOT / "checkpoints" / name
        config = json.loads((folder / "image_processor" / "preprocessor_config.json").read_text())
        assert (config["size"], config["image_channels"], config["image_clip"]) == (64, 1, 3.0)
        assert "_pipeline_settings" not in (folder / ("unet" if "ambiseg" in name else "prob_unet") / "config.json").read_text()


@needs_data
def test_a_crop_resized_to_128_scores_as_the_same_crop_at_64():
    """Issue 42's check on real validate crops (the `mini` split: each validate nodule's first slice of largest
    consensus): the committed checkpoint, 4 samples, the default steps, the same noise at both sizes; masks returned
    at 128 are scored against the raters' masks resized to 128 (nearest-exact)."""
    from ambiseg_diffusers import AmbiSegPipeline, compute_metrics
    from ambiseg_diffusers.lidc import eval_prompts, load_lidc64

    pipe = AmbiSegPipeline.from_pretrained(ROOT / "checkpoints" / "ambiseg-lidc64")
    pipe.set_progress_bar_config(disable=True)
    rows = load_lidc64("mini", prompt_style=pipe.config.prompt_style).select(range(8))
    images = [np.asarray(row["image"], np.float32) for row in rows]
    prompts = [eval_prompts(row, "annotator") for row in rows]
    large = [F.interpolate(torch.as_tensor(i)[None, None], size=(128, 128), mode="bilinear", align_corners=False)
             [0, 0].numpy() for i in images]

    def avg_dice(inputs, size: int) -> float:
        out = pipe(inputs, prompts, num_samples=4, generator=[torch.Generator().manual_seed(i) for i in range(8)])
        assert out.masks.shape == (8, 4, size, size)
        scores = []
        for masks, row in zip(out.masks, rows):
            raters = torch.as_tensor(np.asarray(row["masks"])[np.asarray(row["annotator_valid"])], dtype=torch.float32)
            raters = F.interpolate(raters[None], size=(size, size), mode="nearest-exact")[0].bool()
            scores.append(compute_metrics(masks, raters)["avg_dice"])
        return float(np.mean(scores))

    at_64, at_128 = avg_dice(images, 64), avg_dice(large, 128)
    assert at_64 > 0.5  # a trained model on real crops
    assert abs(at_128 - at_64) <= 0.02, (at_64, at_128)
