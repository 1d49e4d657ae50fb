"""The ambiguity designs (prediction_kl, latent, none): what each builds, where each gradient goes, the KL's direction
and precision, the encoders' text pooling, and the diagnostics' numbers against hand computations."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

import train_ambiseg
from ambiseg_diffusers import AmbiguityEncoder, DiagonalGaussian
from ambiseg_diffusers.configs import AmbiSegTrainingConfig
from ambiseg_diffusers.diagnostics import ambiguity_diagnostics
from ambiseg_diffusers.metrics import compute_metrics_batch
from ambiseg_diffusers.training_utils import build_models, unet_latent_dim

from conftest import LATENT_DIM, SIZE, TEXT_DIM, make_pipeline, tiny_encoder, tiny_unet


def test_kl_is_q_given_p_hand_computed_and_float32_from_half_inputs():
    q = DiagonalGaussian(torch.tensor([[1.0]]), torch.tensor([[0.0]]))
    p = DiagonalGaussian(torch.tensor([[0.0]]), torch.tensor([[2.0]]))
    # KL(q || p) = 0.5 (e^-2 + e^-2 - 1 + 2) = 0.5 + e^-2; KL(p || q) = 0.5 (e^2 - 2)
    assert q.kl(p).item() == pytest.approx(0.5 + math.exp(-2), rel=1e-6)
    assert p.kl(q).item() == pytest.approx(0.5 * (math.exp(2) - 2), rel=1e-6)
    # exp(12 - (-10)) overflows float16 (max 65504): the KL is computed in float32 all the same.
    wide = DiagonalGaussian(torch.zeros(1, 2, dtype=torch.float16), torch.full((1, 2), 12.0, dtype=torch.float16))
    narrow = DiagonalGaussian(torch.zeros(1, 2, dtype=torch.float16), torch.full((1, 2), -10.0, dtype=torch.float16))
    kl = wide.kl(narrow)
    assert kl.dtype == torch.float32 and kl.item() == pytest.approx(2 * 0.5 * (math.exp(22) - 1 - 22), rel=1e-5)


@pytest.mark.parametrize("design, unet_latent, prior_channels", [
    ("latent", 6, 1), ("prediction_kl", 0, 2), ("none", 0, None)])
def test_each_design_builds_its_networks(design, unet_latent, prior_channels):
    config = AmbiSegTrainingConfig(ambiguity=design)
    unet, prior, posterior = build_models(config, text_embed_dim=TEXT_DIM)
    assert unet.latent_dim == unet_latent == unet_latent_dim(config)
    assert (prior is None) == (prior_channels is None) == (posterior is None)
    if prior is not None:
        assert prior.config.in_channels == prior_channels and posterior.config.in_channels == 2
        # prediction_kl starts prior and posterior apart (zero heads would pin q = p, where the KL has no gradient)
        assert (prior.head[-1].weight.abs().sum() > 0) == (design == "prediction_kl")


def test_latent_dim_zero_means_none_and_unknown_designs_are_refused():
    unet, prior, _ = build_models(AmbiSegTrainingConfig(ambiguity="latent", latent_dim=0), text_embed_dim=TEXT_DIM)
    assert unet.latent_dim == 0 and prior is None
    with pytest.raises(ValueError, match="`ambiguity` must be one of"):
        build_models(AmbiSegTrainingConfig(ambiguity="prior_kl"), text_embed_dim=TEXT_DIM)
    with pytest.raises(ValueError, match="prediction_kl' only"):
        build_models(AmbiSegTrainingConfig(ambiguity="latent", freeze_ambiguity_encoders=True), TEXT_DIM)


def _batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(4, 1, SIZE, SIZE, generator=generator),
            "mask_values": torch.randn(4, 1, SIZE, SIZE, generator=generator).sign(),
            "prompts": ["a", "b", "a", "c"]}


def _encode(prompts, device):
    states = {p: torch.randn(5, TEXT_DIM, generator=torch.Generator().manual_seed(ord(p))) for p in set(prompts)}
    return torch.stack([states[p] for p in prompts]), torch.ones(len(prompts), 5, dtype=torch.long)


def _random_heads(*encoders):
    torch.manual_seed(5)
    for encoder in encoders:
        torch.nn.init.normal_(encoder.head[-1].weight, std=0.3)
    return encoders


def _grads(loss, *modules):
    for module in modules:
        module.zero_grad()
    loss.backward()
    return [torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in m.parameters()])
            for m in modules]


def test_prediction_kl_reaches_the_unet_through_its_prediction_and_trains_both_encoders():
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type="sample")
    unet = tiny_unet(latent_dim=0)
    prior, posterior = _random_heads(tiny_encoder(2), tiny_encoder(2))
    grads = {}
    for weight in (0.0, 1.0):
        config = AmbiSegTrainingConfig(ambiguity="prediction_kl", latent_dim=LATENT_DIM, kl_weight=weight,
                                       num_train_timesteps=100)
        loss, parts = train_ambiseg.training_loss(_batch(), unet, prior, posterior, _encode, scheduler, config,
                                                  torch.Generator().manual_seed(0), "cpu")
        grads[weight] = _grads(loss, unet, prior, posterior)
        assert parts["kl"] > 0
    unet_kl_gradient = grads[1.0][0] - grads[0.0][0]
    assert unet_kl_gradient.abs().max() > 1e-6  # the KL's gradient flows into the denoiser
    assert grads[0.0][1].abs().max() == 0 and grads[1.0][1].abs().max() > 0  # the prior learns from the KL only
    assert grads[1.0][2].abs().max() > 0


@pytest.mark.parametrize("fraction, prior_trains", [(0.0, False), (1.0, True)])
def test_prior_z_fraction_trains_the_prior_through_the_denoiser(fraction, prior_trains):
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type="sample")
    unet, prior, posterior = tiny_unet(), tiny_encoder(1), tiny_encoder(2)
    config = AmbiSegTrainingConfig(ambiguity="latent", latent_dim=LATENT_DIM, kl_weight=0.0, prior_z_fraction=fraction,
                                   num_train_timesteps=100)
    loss, _ = train_ambiseg.training_loss(_batch(), unet, prior, posterior, _encode, scheduler, config,
                                          torch.Generator().manual_seed(0), "cpu")
    _, prior_grad, posterior_grad = _grads(loss, unet, prior, posterior)
    assert bool(prior_grad.abs().max() > 0) == prior_trains
    assert bool(posterior_grad.abs().max() > 0) == (not prior_trains)


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_text_pooling_ignores_padding_and_reads_each_real_token(pooling):
    torch.manual_seed(0)
    encoder = AmbiguityEncoder(in_channels=1, latent_dim=LATENT_DIM, text_embed_dim=TEXT_DIM, block_out_channels=(8, 8),
                               norm_num_groups=4, text_pooling=pooling)
    _random_heads(encoder)
    image, states = torch.randn(2, 1, SIZE, SIZE), torch.randn(2, 6, TEXT_DIM)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    reference = encoder(image, states, mask).mean
    padded = states.clone()
    padded[0, 4:] = 100.0  # padding of row 0
    assert torch.allclose(encoder(image, padded, mask).mean[0], reference[0], atol=1e-6)
    changed = states.clone()
    changed[0, 2] += 3.0  # one real token of row 0
    moved = encoder(image, changed, mask).mean
    assert not torch.allclose(moved[0], reference[0], atol=1e-4) and torch.allclose(moved[1], reference[1])


def _rows():
    rng = np.random.default_rng(0)
    rows = []
    for valid in ([1, 1, 0, 1], [1, 1, 1, 1]):
        masks = np.zeros((4, SIZE, SIZE), bool)
        for r, v in enumerate(valid):
            if v:
                masks[r, 4:10 + r, 5:11] = True
        rows.append({"image": rng.normal(size=(SIZE, SIZE)).astype(np.float32), "masks": masks,
                     "annotator_valid": valid, "prompts": ["the nodule is small", "the nodule is large",
                                                           "solid", "round sharp margin"]})
    return rows


def test_diagnostics_match_a_hand_computation(tokenizer):
    pipe = make_pipeline(tokenizer)
    _random_heads(pipe.prior, pipe.posterior)
    rows = _rows()
    report = ambiguity_diagnostics(pipe, rows, num_samples=4, seed=3)

    kls, prior_means, posterior_means = [], [], []
    for row in rows:
        raters = [i for i, v in enumerate(row["annotator_valid"]) if v]
        prompts = [row["prompts"][r] for r in raters]
        embeds, attention, _, _ = pipe.encode_prompt([prompts], num_samples=len(prompts))
        image = pipe.preprocess(row["image"]).expand(len(raters), -1, -1, -1)
        masks = torch.as_tensor(row["masks"][raters][:, None]).float() * 2 - 1
        q = pipe.posterior(torch.cat([image, masks], 1), embeds, attention)
        p = pipe.prior(image, embeds, attention)
        kls.append(q.kl_per_dimension(p))
        prior_means.append(p.mean)
        posterior_means.append(q.mean)
    kl = torch.cat(kls).detach().numpy()
    assert report["pairs"] == 7 and report["images"] == 2
    np.testing.assert_allclose(report["kl_per_dimension"], kl.mean(0), rtol=1e-5)
    assert report["kl"] == pytest.approx(kl.sum(1).mean(), rel=1e-5)
    assert report["live_dimensions"] == int((kl.mean(0) > 0.01).sum())
    a, b = torch.cat(prior_means).detach().numpy(), torch.cat(posterior_means).detach().numpy()
    assert report["prior_posterior_correlation"][0] == pytest.approx(np.corrcoef(a[:, 0], b[:, 0])[0, 1], rel=1e-5)

    # The prior row of the gap is the pipeline's own sampling with the same initial noise.
    row = rows[1]
    generator = torch.Generator().manual_seed(3 + 1)
    latents = torch.randn(4, 1, SIZE, SIZE, generator=generator)
    masks = pipe(row["image"], [row["prompts"]], num_samples=4, latents=latents,
                 generator=torch.Generator().manual_seed(3 + 1)).masks
    own = compute_metrics_batch(masks, row["masks"][None])["ged"][0]
    # The z effect: the same initial noise under another prior draw of z (the generator seeded 10**6 later).
    other = pipe(row["image"], [row["prompts"]], num_samples=4, latents=latents,
                 generator=torch.Generator().manual_seed(3 + 1 + 10**6)).masks
    inter = (masks & other).sum((-1, -2))
    total = masks.sum((-1, -2)) + other.sum((-1, -2))
    dice = np.where(total == 0, 1.0, 2 * inter / np.maximum(total, 1))
    assert ambiguity_diagnostics(pipe, rows[1:], num_samples=4, seed=4)["z_effect"] == pytest.approx(
        1 - dice.mean(), rel=1e-6)
    assert 0 < 1 - dice.mean()  # the random-headed prior's z moves these masks: the fixture can tell
    gap_rows = [g for g in report if g.startswith("ged_")]
    assert sorted(gap_rows) == ["ged_posterior_z", "ged_prior_z"]
    assert report["prior_gap"] == pytest.approx(report["ged_prior_z"] - report["ged_posterior_z"])
    assert own == pytest.approx(ambiguity_diagnostics(pipe, rows[1:], num_samples=4, seed=4)["ged_prior_z"], rel=1e-6)

    # The posterior row, by hand: sample s takes rater (s mod 4)'s posterior, z = mean + std * the normal draws that
    # follow the initial noise in the generator, with the same noise and prompts (rows[1]: four raters, so a row
    # using one rater, or a z that ignores the posterior, gives another GED).
    generator = torch.Generator().manual_seed(4)
    latents = torch.randn(4, 1, SIZE, SIZE, generator=generator)
    draws = torch.randn(4, LATENT_DIM, generator=generator)
    embeds, attention, _, _ = pipe.encode_prompt([row["prompts"]], num_samples=4)
    image = pipe.preprocess(row["image"]).expand(4, -1, -1, -1)
    q = pipe.posterior(torch.cat([image, torch.as_tensor(row["masks"][:, None]).float() * 2 - 1], 1), embeds, attention)
    z = q.mean + torch.exp(0.5 * q.logvar) * draws  # rater s for sample s (s mod 4 = s here)
    masks = pipe(row["image"], [row["prompts"]], num_samples=4, latents=latents, ambiguity_latents=z,
                 generator=torch.Generator().manual_seed(4)).masks
    by_hand = compute_metrics_batch(masks, row["masks"][None])["ged"][0]
    assert by_hand == pytest.approx(ambiguity_diagnostics(pipe, rows[1:], num_samples=4, seed=4)["ged_posterior_z"],
                                    rel=1e-6)
    one_rater = pipe(row["image"], [row["prompts"]], num_samples=4, latents=latents, ambiguity_latents=z[:1].expand(4, -1),
                     generator=torch.Generator().manual_seed(4)).masks
    assert compute_metrics_batch(one_rater, row["masks"][None])["ged"][0] != pytest.approx(by_hand, abs=1e-3)
