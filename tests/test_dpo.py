"""TDG-DiffDPO: the loss against hand-computed values, preference construction, and the trainer end to end."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from ambiseg_diffusers import AmbiSegPipeline
from ambiseg_diffusers.losses import diffusion_dpo_loss, predicted_noise
from ambiseg_diffusers.preferences import build_preferences, pick_pair, score_candidates, select_rows

from conftest import make_pipeline
from conftest import needs_data



def test_dpo_loss_matches_hand_computation():
    pw, pl = torch.tensor([0.10, 0.30]), torch.tensor([0.20, 0.10])
    rw, rl = torch.tensor([0.12, 0.30]), torch.tensor([0.18, 0.20])
    beta = 50.0
    # pair 1: delta = (0.10 - 0.12) - (0.20 - 0.18) = -0.04; pair 2: (0) - (0.10 - 0.20) = 0.10
    expected = (-math.log(1 / (1 + math.exp(-beta * 0.04))) - math.log(1 / (1 + math.exp(beta * 0.10)))) / 2
    loss, logs = diffusion_dpo_loss(pw, pl, rw, rl, beta=beta)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert logs["implicit_accuracy"].item() == 0.5
    # policy == reference: delta = 0, loss = log 2 whatever beta
    same, _ = diffusion_dpo_loss(pw, pl, pw, pl, beta=5000.0)
    assert same.item() == pytest.approx(math.log(2))


def test_dpo_loss_gradient_prefers_the_winner():
    pw = torch.tensor([0.2], requires_grad=True)
    pl = torch.tensor([0.2], requires_grad=True)
    loss, _ = diffusion_dpo_loss(pw, pl, torch.tensor([0.2]), torch.tensor([0.2]), beta=10.0)
    loss.backward()
    assert pw.grad.item() > 0 and pl.grad.item() < 0  # descending lowers the winner's error, raises the loser's


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_predicted_noise_inverts_each_parameterisation(kind):
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=kind)
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([5, 400, 990])
    noisy = scheduler.add_noise(x0, eps, t)
    output = {"epsilon": eps, "sample": x0, "v_prediction": scheduler.get_velocity(x0, eps, t)}[kind]
    torch.testing.assert_close(predicted_noise(scheduler, output, noisy, t), eps, atol=2e-3, rtol=1e-3)


def test_scores_pairs_and_ties():
    raters = np.zeros((2, 4, 4), bool)
    raters[0, :2, :2] = True
    raters[1, :2, :3] = True
    good, bad, empty = raters[0], np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    bad[3, 3] = True
    candidates = np.stack([bad, good, empty])
    best = score_candidates(candidates, raters, "best_rater")
    mean = score_candidates(candidates, raters, "mean_dice")
    assert best[1] == 1.0 and mean[1] == pytest.approx((1 + 2 * 4 / 10) / 2)
    assert pick_pair(mean)[0] == 1
    assert pick_pair(np.array([0.5, 0.5, 0.5])) is None
    with pytest.raises(ValueError, match="strategy"):
        score_candidates(candidates, raters, "best")
    assert select_rows(100, 0.25, 0) == select_rows(100, 0.25, 0) and len(select_rows(100, 0.25, 0)) == 25


@needs_data
def test_build_preferences_and_train_dpo_end_to_end(tokenizer, tmp_path):
    from ambiseg_diffusers.lidc import load_lidc64
    import train_dpo

    reference = make_pipeline(tokenizer)
    reference.save_pretrained(tmp_path / "reference")
    mini = load_lidc64("mini")
    pairs, report = build_preferences(reference, mini, tmp_path / "prefs", strategy="stochastic_run",
                                      num_candidates=2, fraction=0.5, num_inference_steps=2)
    assert report["images"] == 7 and report["pairs"] + report["ties"] == 7 and report["pairs"] >= 2
    assert (pairs["winner_score"][0] > pairs["loser_score"][0]) and set(pairs["strategy"]) == {"stochastic_run"}
    assert np.asarray(pairs[0]["winner"]).shape == (64, 64)

    args = ["--reference", str(tmp_path / "reference"), "--preferences", str(tmp_path / "prefs"),
            "--config", "cpu", "--train_batch_size", "2", "--num_epochs", "1", "--num_validation_images", "1",
            "--num_validation_samples", "2", "--report_to", "none", "--checkpointing_steps", "1", "--mixed_precision", "no"]
    out = train_dpo.main(args + ["--output_dir", str(tmp_path / "dpo")])
    assert json.loads((out / "preference.json").read_text())["reference"] == "../reference"
    assert "tdg-diffdpo" in (out / "README.md").read_text()

    aligned = AmbiSegPipeline.from_pretrained(out)
    aligned.set_progress_bar_config(disable=True)
    image = np.asarray(mini[0]["image"])
    run = lambda **kw: aligned(image, "a nodule", num_samples=2, num_inference_steps=2,  # noqa: E731
                               generator=torch.Generator().manual_seed(0), **kw).probabilities
    ref = reference(image, "a nodule", num_samples=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).probabilities
    np.testing.assert_allclose(run(preference_scale=0.0), ref, atol=1e-5)  # scale 0 = the reference exactly
    assert not np.allclose(run(preference_scale=1.0), ref)  # the adapter trained
    with pytest.raises(ValueError, match="preference_scale"):
        reference(image, num_samples=1, preference_scale=0.5)


@needs_data
def test_dpo_resume_after_kill_matches(tokenizer, tmp_path):
    from ambiseg_diffusers.lidc import load_lidc64
    from safetensors.numpy import load_file
    import train_dpo

    reference = make_pipeline(tokenizer)
    reference.save_pretrained(tmp_path / "reference")
    build_preferences(reference, load_lidc64("mini"), tmp_path / "prefs", num_candidates=2, fraction=1.0, num_inference_steps=2)
    args = ["--reference", str(tmp_path / "reference"), "--preferences", str(tmp_path / "prefs"), "--config", "cpu",
            "--train_batch_size", "2", "--num_epochs", "1", "--report_to", "none", "--checkpointing_steps", "2",
            "--num_validation_images", "1", "--num_validation_samples", "1", "--mixed_precision", "no"]
    straight = train_dpo.main(args + ["--output_dir", str(tmp_path / "a")])
    train_dpo.main(args + ["--output_dir", str(tmp_path / "b"), "--stop_after_steps", "3"])
    resumed = train_dpo.main(args + ["--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint", "latest"])
    a = load_file(str(straight / "unet_lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "unet_lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
