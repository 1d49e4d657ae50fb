"""The committed checkpoints load offline in one line and sample nodule-sized masks on a real slice."""

from pathlib import Path

import numpy as np
import torch

from ambiseg_diffusers import AmbiSegPipeline

from conftest import needs_data

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


@needs_data
def test_committed_checkpoints_load_and_sample():
    from ambiseg_diffusers.lidc import eval_prompts, load_lidc64

    row = load_lidc64("mini")[0]
    image, prompts = np.asarray(row["image"]), [eval_prompts(row, "annotator")]
    reference = AmbiSegPipeline.from_pretrained(CHECKPOINTS / "ambiseg-lidc64")
    reference.set_progress_bar_config(disable=True)
    assert reference.unet.dtype == torch.float32 and reference.config.default_num_inference_steps == 5
    out = reference(image, prompts, num_samples=4, generator=torch.Generator().manual_seed(0))
    assert out.masks.shape == (1, 4, 64, 64)
    # a trained model: nodule-sized masks that overlap the raters', not noise
    raters = np.asarray(row["masks"]).astype(bool)
    assert 0.002 < out.masks.mean() < 0.2
    assert (out.masks[0].any(0) & raters.any(0)).sum() > 0

    aligned = AmbiSegPipeline.from_pretrained(CHECKPOINTS / "tdg-diffdpo-lidc64")
    aligned.set_progress_bar_config(disable=True)
    same = aligned(image, prompts, num_samples=4, generator=torch.Generator().manual_seed(0), preference_scale=0.0)
    np.testing.assert_allclose(same.probabilities, out.probabilities, atol=1e-5)
