"""TDG-DiffDPO: the loss against hand-computed values, preference construction, and the trainer end to end."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from ambiseg_diffusers import AmbiSegImageProcessor, AmbiSegPipeline
from ambiseg_diffusers.losses import diffusion_dpo_loss, dpo_errors, predicted_noise
from datasets import load_from_disk

import train_dpo
from ambiseg_diffusers.preferences import build_preferences, pick_pair, score_candidates, select_rows

from conftest import make_pipeline, needs_data



def test_dpo_loss_matches_hand_computation():
    pw, pl = torch.tensor([0.10, 0.30]), torch.tensor([0.20, 0.10])
    rw, rl = torch.tensor([0.12, 0.30]), torch.tensor([0.18, 0.20])
    beta = 100.0  # Salesforce's convention: 0.5 * beta = 50 multiplies delta
    # pair 1: delta = (0.10 - 0.12) - (0.20 - 0.18) = -0.04; pair 2: (0) - (0.10 - 0.20) = 0.10
    expected = (-math.log(1 / (1 + math.exp(-50 * 0.04))) - math.log(1 / (1 + math.exp(50 * 0.10)))) / 2
    loss, logs = diffusion_dpo_loss(pw, pl, rw, rl, beta=beta)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert logs["implicit_accuracy"].item() == 0.5
    assert logs["scaled_delta"].item() == pytest.approx((50 * 0.04 + 50 * 0.10) / 2)
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


def test_dpo_error_spaces_weight_the_same_x0_error_by_hand_computed_snr():
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="sample")
    clean = torch.ones(2, 1, 2, 2)
    clean[:, :, 0, 0] = -1
    noise = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 600])
    noisy = scheduler.add_noise(clean, noise, t)
    output = clean.clone()
    output[:, :, 1, 1] = 1.5  # x0 error 0.5 on one pixel of four: mean squared x0 error 0.0625, 0 once clamped
    alpha_bar = scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)  # 9999 at t = 0, 0.026 at t = 600 (linear betas 1e-4 .. 0.02)
    assert snr[0].item() == pytest.approx(9999, rel=1e-3) and snr[1].item() == pytest.approx(0.0262, rel=0.02)
    errors = {space: dpo_errors(scheduler, output, noisy, noise, clean, t, space, snr_gamma=5.0)
              for space in ("epsilon", "epsilon_min_snr", "x0", "x0_clamped")}
    torch.testing.assert_close(errors["x0"], torch.full((2,), 0.0625))
    torch.testing.assert_close(errors["epsilon"], 0.0625 * snr, rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(errors["epsilon_min_snr"], 0.0625 * torch.stack([torch.tensor(5.0), snr[1]]))
    torch.testing.assert_close(errors["x0_clamped"], torch.zeros(2))
    with pytest.raises(ValueError, match="`space` must be one of"):
        dpo_errors(scheduler, output, noisy, noise, clean, t, "v")


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


@pytest.fixture
def reference_and_pairs(tokenizer, tmp_path):
    """A tiny saved reference and mean-Dice pairs from all 14 mini slices."""
    from ambiseg_diffusers.lidc import load_lidc64

    reference = make_pipeline(tokenizer, size=64)  # pairs are built at the processor's size: the crops' here
    reference.save_pretrained(tmp_path / "reference")
    build_preferences(reference, load_lidc64("mini"), tmp_path / "prefs", num_candidates=2, fraction=1.0,
                      num_inference_steps=2)
    return reference, tmp_path / "reference", tmp_path / "prefs"


def dpo_args(reference: Path, prefs: Path, *extra) -> list:
    return ["--reference", str(reference), "--preferences", str(prefs), "--config", "cpu", "--train_batch_size", "2",
            "--num_epochs", "1", "--report_to", "none", "--checkpointing_steps", "2", "--num_validation_images", "1",
            "--num_validation_samples", "2", "--mixed_precision", "no", *extra]


@needs_data
def test_build_preferences_and_train_dpo_end_to_end(tokenizer, tmp_path):
    from huggingface_hub import ModelCard
    from safetensors.torch import load_file

    from ambiseg_diffusers.lidc import load_lidc64

    reference = make_pipeline(tokenizer, size=64)  # pairs are built at the processor's size: the crops' here
    reference.save_pretrained(tmp_path / "reference")
    mini = load_lidc64("mini")
    pairs, report = build_preferences(reference, mini, tmp_path / "prefs", strategy="stochastic_run",
                                      num_candidates=2, fraction=0.5, num_inference_steps=2)
    assert report["images"] == 7 and report["pairs"] + report["ties"] == 7 and report["pairs"] >= 2
    assert (pairs["winner_score"][0] > pairs["loser_score"][0]) and set(pairs["strategy"]) == {"stochastic_run"}
    assert np.asarray(pairs[0]["winner"]).shape == (64, 64)

    out = train_dpo.main(dpo_args(tmp_path / "reference", tmp_path / "prefs", "--max_train_steps", "3",
                                  "--base_model_id", "org/tiny-reference", "--output_dir", str(tmp_path / "dpo")))
    assert json.loads((out / "preference.json").read_text()) == {
        "adapter_name": "preference", "base_model": "org/tiny-reference", "base_model_path": "../reference"}
    assert all(k.startswith("unet.") and "lora" in k for k in load_file(str(out / "pytorch_lora_weights.safetensors")))
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "org/tiny-reference" and card.data.library_name == "diffusers"
    assert "tdg-diffdpo" in card.data.tags and "CC BY 3.0" in card.text
    assert json.loads((out / "dpo_config.json").read_text())["max_train_steps"] == 3

    aligned = AmbiSegPipeline.from_pretrained(out)
    aligned.set_progress_bar_config(disable=True)
    image = np.asarray(mini[0]["image"])
    run = lambda **kw: aligned(image, "a nodule", num_samples=2, num_inference_steps=2,  # noqa: E731
                               generator=torch.Generator().manual_seed(0), **kw).probabilities
    ref = reference(image, "a nodule", num_samples=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).probabilities
    np.testing.assert_allclose(run(preference_scale=0.0), ref, atol=1e-5)  # scale 0 = the reference exactly
    assert np.abs(run(preference_scale=1.0) - ref).max() > 1e-4  # the adapter trained
    with pytest.raises(ValueError, match="preference_scale"):
        reference(image, num_samples=1, preference_scale=0.5)


@needs_data
def test_dpo_resume_after_kill_matches(reference_and_pairs, tmp_path):
    from safetensors.numpy import load_file

    _, reference, prefs = reference_and_pairs
    args = dpo_args(reference, prefs, "--num_validation_images", "0")
    straight = train_dpo.main(args + ["--output_dir", str(tmp_path / "a")])
    train_dpo.main(args + ["--output_dir", str(tmp_path / "b"), "--stop_after_steps", "3"])
    assert not (tmp_path / "b" / "pytorch_lora_weights.safetensors").exists()
    resumed = train_dpo.main(args + ["--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint", "latest"])
    a = load_file(str(straight / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@needs_data
@pytest.mark.parametrize("lora_rank", ["8", "0"])
def test_every_dpo_module_is_on_the_accelerator_device(reference_and_pairs, tmp_path, monkeypatch, lora_rank):
    from test_training import run_on_meta

    _, reference, prefs = reference_and_pairs
    seen = run_on_meta(monkeypatch, train_dpo, "diffusion_dpo_loss", dpo_args(
        reference, prefs, "--lora_rank", lora_rank, "--validation_steps", "1", "--stop_after_steps", "1",
        "--checkpointing_steps", "100", "--output_dir", str(tmp_path / "meta")))
    assert seen == {"encoder": {"meta"}, "loss": "meta", "validation": {"meta"}}


@needs_data
def test_frozen_reference_runs_under_the_policy_autocast(reference_and_pairs, tmp_path, monkeypatch):
    """At step 0 the policy is the reference: in bf16 both must give the same errors (delta 0, loss log 2)."""
    _, reference, prefs = reference_and_pairs
    deltas = []
    real_loss = train_dpo.diffusion_dpo_loss

    def recording(policy_w, policy_l, ref_w, ref_l, beta):
        deltas.append(((policy_w - ref_w) - (policy_l - ref_l)).abs().max().item())
        return real_loss(policy_w, policy_l, ref_w, ref_l, beta)

    monkeypatch.setattr(train_dpo, "diffusion_dpo_loss", recording)
    train_dpo.main(dpo_args(reference, prefs, "--lora_rank", "0", "--mixed_precision", "bf16", "--stop_after_steps", "1",
                            "--num_validation_images", "0", "--output_dir", str(tmp_path / "bf16")))
    assert deltas == [0.0]


@needs_data
def test_preference_builds_resume_only_with_the_same_arguments(reference_and_pairs, tmp_path, monkeypatch):
    from ambiseg_diffusers.lidc import load_lidc64

    reference, _, complete = reference_and_pairs  # built with the arguments below, uninterrupted
    mini = load_lidc64("mini")
    kwargs = dict(num_candidates=2, fraction=1.0, num_inference_steps=2)
    calls = []
    original = AmbiSegPipeline.__call__

    def killed_on_third_call(self, *args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return original(self, *args, **kw)

    monkeypatch.setattr(AmbiSegPipeline, "__call__", killed_on_third_call)
    with pytest.raises(KeyboardInterrupt):
        build_preferences(reference, mini, tmp_path / "pairs", **kwargs)
    monkeypatch.setattr(AmbiSegPipeline, "__call__", original)
    assert len(list((tmp_path / ".pairs.parts").glob("part-*.json"))) == 2

    for other in (dict(strategy="best_rater"), dict(images_per_call=2), dict(num_candidates=3)):
        with pytest.raises(ValueError, match="other arguments"):
            build_preferences(reference, mini, tmp_path / "pairs", **{**kwargs, **other})
    resumed, report = build_preferences(reference, mini, tmp_path / "pairs", **kwargs)
    expected = load_from_disk(str(complete))
    assert report["images"] == 14 and len(resumed) == len(expected)
    assert resumed["source_index"] == expected["source_index"] and set(resumed["strategy"]) == {"mean_dice"}
    np.testing.assert_array_equal(np.asarray(resumed["winner"]), np.asarray(expected["winner"]))

    calls.clear()
    monkeypatch.setattr(AmbiSegPipeline, "__call__", killed_on_third_call)
    with pytest.raises(KeyboardInterrupt):
        build_preferences(reference, mini, tmp_path / "again", **kwargs)
    monkeypatch.setattr(AmbiSegPipeline, "__call__", original)
    relabelled, _ = build_preferences(reference, mini, tmp_path / "again", **{**kwargs, "strategy": "best_rater"},
                                      overwrite=True)
    assert set(relabelled["strategy"]) == {"best_rater"} and len(set(relabelled["source_index"])) == len(relabelled)


def test_implicit_accuracy_summary_by_hand():
    deltas = {0: torch.tensor([-1.0, 2.0, -3.0, 0.5]), 50: torch.tensor([0.1, 0.2, -0.4, 0.3])}
    summary = train_dpo.summarize_deltas(deltas, beta=4.0)  # 0.5 * beta = 2
    assert summary == {"timesteps": [0, 50], "pairs": 4, "implicit_accuracy": [0.5, 0.25],
                       "median_scaled_delta": [pytest.approx(2.0), pytest.approx(0.4)]}


@needs_data
def test_dpo_error_space_flag_and_held_out_diagnostic(reference_and_pairs, tmp_path, monkeypatch):
    _, reference, prefs = reference_and_pairs
    spaces = []
    real_errors = train_dpo.dpo_errors

    def recording(scheduler, output, noisy, noise, clean, timesteps, space, snr_gamma):
        spaces.append((space, snr_gamma))
        return real_errors(scheduler, output, noisy, noise, clean, timesteps, space, snr_gamma)

    shared = []
    real_denoising = train_dpo.denoising_errors

    def recording_latents(unet, inputs, noise_scheduler, config):
        half = inputs["z"].shape[0] // 2  # winners first, then losers
        shared.append(torch.equal(inputs["z"][:half], inputs["z"][half:]))
        return real_denoising(unet, inputs, noise_scheduler, config)

    monkeypatch.setattr(train_dpo, "dpo_errors", recording)
    monkeypatch.setattr(train_dpo, "denoising_errors", recording_latents)
    out = train_dpo.main(dpo_args(reference, prefs, "--error_space", "epsilon_min_snr", "--snr_gamma", "2",
                                  "--max_train_steps", "2", "--num_validation_images", "0", "--pair_latent",
                                  "prior_sample", "--diagnostic_preferences", str(prefs),
                                  "--output_dir", str(tmp_path / "minsnr")))
    assert set(spaces) == {("epsilon_min_snr", 2.0)}
    assert shared and all(shared)  # one prior draw per pair, shared by winner and loser (posterior: one z per mask)
    record = json.loads((out / "implicit_accuracy.json").read_text())
    assert record["timesteps"] == [0, 2, 5, 10, 20, 40, 60, 80, 99]  # the tiny scheduler's 100 steps
    assert record["pairs"] == len(load_from_disk(str(prefs)))
    # two LoRA steps move the policy: on held-out pairs some deltas are nonzero, and accuracies are fractions of pairs
    assert max(record["median_scaled_delta"]) > 0
    assert all(a * record["pairs"] == pytest.approx(round(a * record["pairs"])) for a in record["implicit_accuracy"])
    assert json.loads((out / "dpo_config.json").read_text())["error_space"] == "epsilon_min_snr"


@needs_data
@pytest.mark.parametrize("lr_scheduler", ["linear", "cosine"])
def test_an_euler_saved_reference_is_noised_by_ddpm_and_every_lr_schedule_starts(reference_and_pairs, tmp_path,
                                                                                 monkeypatch, lr_scheduler):
    from diffusers import DDPMScheduler, EulerDiscreteScheduler

    pipe, _, prefs = reference_and_pairs
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "euler")
    seen = []
    real_inputs = train_dpo.pair_inputs

    def recording(batch, posterior, encode, noise_scheduler, *args, **kwargs):
        seen.append(type(noise_scheduler))
        inputs = real_inputs(batch, posterior, encode, noise_scheduler, *args, **kwargs)
        # variance-preserving noising: |x_t| stays within a few units, never sigma_max (~157 at t = 99 here)
        assert inputs["noisy"].abs().max() < 10
        return inputs

    monkeypatch.setattr(train_dpo, "pair_inputs", recording)
    train_dpo.main(dpo_args(tmp_path / "euler", prefs, "--lr_scheduler", lr_scheduler, "--max_train_steps", "2",
                            "--num_validation_images", "0", "--output_dir", str(tmp_path / "run")))
    assert seen and set(seen) == {DDPMScheduler}


@needs_data
def test_the_final_weights_are_validated_after_a_periodic_validation(reference_and_pairs, tmp_path, monkeypatch):
    import PIL.Image

    _, reference, prefs = reference_and_pairs
    calls = []

    def recording(pipeline, *args, **kwargs):
        calls.append(len(calls))
        return {"ged": float(len(calls))}, PIL.Image.new("RGB", (4, 4))

    monkeypatch.setattr(train_dpo, "validation_report", recording)
    out = train_dpo.main(dpo_args(reference, prefs, "--max_train_steps", "3", "--validation_steps", "2",
                                  "--output_dir", str(tmp_path / "run")))
    assert len(calls) == 2  # at step 2, then the final weights at step 3
    card = (out / "README.md").read_text()
    assert '"ged": 2.0' in card  # the card shows the final validation
    # no --base_model_id: the card names the reference's folder, never a Hub link to "None"
    assert "None" not in card and f"in the folder `{reference}`" in card and f'from_pretrained("{reference}", trust_remote_code=True)' in card


@needs_data
def test_a_reference_without_latent_is_aligned_without_z(reference_and_pairs, tmp_path, monkeypatch):
    """A prediction_kl (or none) reference: its UNet takes no z, its prior reads image and mask; pairs carry no z."""
    from conftest import tiny_encoder, tiny_unet

    pipe, _, prefs = reference_and_pairs
    pipe.unet, pipe.prior = tiny_unet(latent_dim=0), tiny_encoder(2)
    pipe.save_pretrained(tmp_path / "paper-kl")
    seen = []
    real_inputs = train_dpo.pair_inputs

    def recording(*args, **kwargs):
        inputs = real_inputs(*args, **kwargs)
        seen.append(inputs["z"])
        return inputs

    monkeypatch.setattr(train_dpo, "pair_inputs", recording)
    train_dpo.main(dpo_args(tmp_path / "paper-kl", prefs, "--pair_latent", "prior_sample", "--max_train_steps", "2",
                            "--num_validation_images", "0", "--output_dir", str(tmp_path / "run")))
    assert seen == [None, None]


@pytest.fixture
def state_pairs(tokenizer, tmp_path):
    """A tiny saved reference (its UNet takes z) and pairs built with their sampling states."""
    from ambiseg_diffusers.lidc import load_lidc64

    reference = make_pipeline(tokenizer, size=64)  # pairs are built at the processor's size: the crops' here
    reference.save_pretrained(tmp_path / "reference")
    pairs, _ = build_preferences(reference, load_lidc64("mini"), tmp_path / "state-prefs", num_candidates=3,
                                 fraction=1.0, num_inference_steps=2, record_states=True)
    return reference, tmp_path / "reference", tmp_path / "state-prefs", pairs


@needs_data
def test_recorded_states_reproduce_each_pairs_masks(state_pairs):
    """The UNet at a mask's last recorded state, timestep and z gives back that very mask (DDIM's last step is the
    clamped x0-prediction): the states are the ones the sampler gave these masks."""
    reference, _, _, pairs = state_pairs
    assert len(pairs) > 3 and np.asarray(pairs[0]["winner_states"]).shape == (2, 64, 64)
    assert list(pairs[0]["state_timesteps"]) == [50, 0]  # the tiny DDIM-2 schedule (leading spacing)
    for row in pairs.select(range(3)):
        image = reference.preprocess(np.asarray(row["image"]))
        text, mask = reference.encode_prompt(row["prompt"], "cpu", 1)[:2]
        for side in ("winner", "loser"):
            state = torch.as_tensor(np.asarray(row[f"{side}_states"], np.float32)[-1])[None, None]
            z = torch.as_tensor(row[f"{side}_z"], dtype=torch.float32)[None]
            with torch.no_grad():
                x0 = reference.unet(torch.cat([image, state], 1), row["state_timesteps"][-1], encoder_hidden_states=text,
                                    encoder_attention_mask=mask, class_labels=z).sample.clamp(-1, 1)
            np.testing.assert_array_equal(((x0[0, 0] + 1) / 2 > 0.5).numpy(), np.asarray(row[side]).astype(bool))


@needs_data
def test_state_pairs_are_not_augmented_and_plain_pairs_are(state_pairs, reference_and_pairs):
    """A turned state is not one the sampler gives the turned image: pairs with states keep their orientation."""
    _, _, _, pairs = state_pairs
    batch = train_dpo.pair_batch(pairs, [0, 1, 2, 3], AmbiSegImageProcessor(size=64), torch.Generator().manual_seed(3))
    for i in range(4):
        assert torch.equal(batch["winner_states"][i], torch.as_tensor(np.asarray(pairs[i]["winner_states"], np.float32)))
        assert torch.equal(batch["loser"][i, 0], torch.as_tensor(np.asarray(pairs[i]["loser"]), dtype=torch.float32) * 2 - 1)
    plain = load_from_disk(str(reference_and_pairs[2]))
    turned = train_dpo.pair_batch(plain, [0, 1, 2, 3], AmbiSegImageProcessor(size=64), torch.Generator().manual_seed(3))
    stored = torch.stack([torch.as_tensor(np.asarray(plain[i]["winner"]), dtype=torch.float32) * 2 - 1 for i in range(4)])
    assert not torch.equal(turned["winner"][:, 0], stored)  # seed 3 turns at least one of the four


@needs_data
def test_dpo_on_state_pairs_denoises_at_the_sampler_timesteps(state_pairs, tmp_path, monkeypatch):
    _, reference, prefs, _ = state_pairs
    seen = []
    real = train_dpo.trajectory_inputs

    def recording(*args, **kwargs):
        inputs = real(*args, **kwargs)
        seen.extend(inputs["timesteps"].tolist())
        return inputs

    monkeypatch.setattr(train_dpo, "trajectory_inputs", recording)
    train_dpo.main(dpo_args(reference, prefs, "--num_validation_images", "0", "--output_dir", str(tmp_path / "traj")))
    assert seen and set(seen) == {50, 0}


@needs_data
def test_a_further_round_starts_from_the_given_adapter(reference_and_pairs, tmp_path, tokenizer):
    from safetensors.numpy import load_file

    _, reference, prefs = reference_and_pairs
    first = train_dpo.main(dpo_args(reference, prefs, "--num_validation_images", "0", "--output_dir", str(tmp_path / "r1")))
    second = train_dpo.main(dpo_args(reference, prefs, "--num_validation_images", "0", "--learning_rate", "0",
                                     "--init_adapter", str(first), "--output_dir", str(tmp_path / "r2")))
    a = load_file(str(first / "pytorch_lora_weights.safetensors"))
    b = load_file(str(second / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert any(np.abs(a[k]).max() > 0 for k in a if "lora_B" in k)  # round 1 moved its adapter off the zero init
    assert json.loads((second / "preference.json").read_text())["init_adapter"] == "../r1"
    with pytest.raises(ValueError, match="--lora_rank"):
        train_dpo.main(dpo_args(reference, prefs, "--lora_rank", "4", "--init_adapter", str(first),
                                "--output_dir", str(tmp_path / "r3")))
    make_pipeline(tokenizer).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="was trained on"):
        train_dpo.main(dpo_args(tmp_path / "other", prefs, "--init_adapter", str(first), "--output_dir", str(tmp_path / "r4")))


@needs_data
def test_iterated_rounds_score_every_round_and_skip_finished_ones(tmp_path, tokenizer, monkeypatch):
    import iterate_dpo

    make_pipeline(tokenizer).save_pretrained(tmp_path / "reference")
    argv = ["--reference", str(tmp_path / "reference"), "--rounds", "2", "--output_dir", str(tmp_path / "rounds"),
            "--split", "train_fit", "--fraction", "0.01", "--num_candidates", "2", "--score_split", "selection",
            "--max_images", "3",
            "--num_samples", "2", "--", "--config", "cpu", "--train_batch_size", "2", "--num_epochs", "1",
            "--num_validation_images", "0", "--report_to", "none", "--mixed_precision", "no"]
    record = iterate_dpo.main(argv)
    assert list(record) == ["reference", "round-1", "round-2"] and len(record["round-2"]["ged"]) == 3
    assert "| round-2 |" in (tmp_path / "rounds" / "rounds.md").read_text()
    calls = []
    monkeypatch.setattr(iterate_dpo.train_dpo, "main", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(iterate_dpo.build_preferences, "main", lambda *a, **k: calls.append(a))
    assert iterate_dpo.main(argv) == record and calls == []
    with pytest.raises(ValueError, match="num_samples"):  # other arguments into the same folder: refused
        iterate_dpo.main([a if a != "2" or i != argv.index("--num_samples") + 1 else "4" for i, a in enumerate(argv)])


def test_scripts_that_import_their_siblings_run_from_a_plain_shell(tmp_path):
    """As a user runs them (`python scripts/x.py`): no test's sys.path, so a script that imports another script or
    training script (iterate_dpo.py -> training/train_dpo.py) must find it itself. Only those are run (each start
    costs seconds)."""
    import ast
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    scripts = sorted((root / "scripts").glob("*.py")) + sorted((root / "training").glob("*.py"))
    siblings = {p.stem for p in scripts}
    importing = []
    for script in scripts:
        tree = ast.parse(script.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        if names & siblings:
            importing.append(script)
    assert root / "scripts" / "iterate_dpo.py" in importing
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for script in importing:
        result = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0 and "usage" in result.stdout, (script.name, result.stderr[-2000:])


def test_an_adapter_is_not_published_without_a_downloadable_base(tmp_path, capsys):
    (tmp_path / "reference").mkdir()
    with pytest.raises(SystemExit):
        train_dpo.parse_args(["--reference", str(tmp_path / "reference"), "--preferences", "p", "--output_dir", "o",
                              "--push_to_hub"])
    assert "--base_model_id" in capsys.readouterr().err
    args = train_dpo.parse_args(["--reference", str(tmp_path / "reference"), "--preferences", "p", "--output_dir", "o",
                                 "--push_to_hub", "--base_model_id", "org/reference"])
    assert args.base_model_id == "org/reference"


@needs_data
def test_pushing_creates_the_repo_first_and_uploads_no_local_path(reference_and_pairs, tmp_path, monkeypatch):
    import huggingface_hub

    _, reference, prefs = reference_and_pairs
    args = dpo_args(reference, prefs, "--num_validation_images", "0", "--push_to_hub", "--base_model_id", "org/reference",
                    "--output_dir", str(tmp_path / "tdg-diffdpo"))

    def offline(repo_id, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "create_repo", offline)
    with pytest.raises(OSError, match="no network"):  # before any training step, not after the run
        train_dpo.main(args)
    assert not list((tmp_path / "tdg-diffdpo").glob("checkpoint-*"))

    uploads = []

    class Repo:
        def __init__(self, repo_id):
            self.repo_id = repo_id if "/" in repo_id else f"user/{repo_id}"  # the Hub adds the namespace

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kwargs: Repo(repo_id))
    def upload_folder(**kwargs):  # what would reach the Hub, read before the staging folder goes
        uploads.append({**kwargs, "info": json.loads((Path(kwargs["folder_path"]) / "preference.json").read_text())})

    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    out = train_dpo.main(args)
    assert [u["repo_id"] for u in uploads] == ["user/tdg-diffdpo"]
    assert uploads[0]["info"] == {"adapter_name": "preference", "base_model": "org/reference"}  # no local path
    assert json.loads((out / "preference.json").read_text())["base_model_path"] == "../reference"  # kept locally
    card = (out / "README.md").read_text()
    assert 'load_lora_weights("user/tdg-diffdpo"' in card and "(no validation in this run" in card and "{}" not in card
