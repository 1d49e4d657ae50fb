"""Diagnostics of the ambiguity term (`scripts/diagnose_ambiguity.py`, and the training log at validation).

For every (image, valid rater) pair of a split: the posterior q(z | image, rater prompt, rater mask) against the
prior (for the "latent" design p(z | image, prompt); for "prediction_kl" p(z | image, prompt, predicted mask), the
predicted mask being one sample of the pipeline for that prompt), and, for a UNet that takes z, the *prior gap*:
GED with z drawn from the prior (what sampling does) minus GED with z drawn from the raters' posteriors (which needs
the answer), over the same initial noise. A prior that predicts what the posterior encodes has a gap near 0.
And the *z effect*: how much of a mask z decides, 1 − Dice between the masks of one initial noise under two prior
draws of z (0: the UNet ignores z; the earlier latent's one live dimension decided a sample's size). The second draw
comes from another generator seed, which also drives a stochastic sampler's step noise (DDPM, LCM, DDIM with
eta > 0): measure the z effect with a deterministic sampler (the default DDIM, eta 0), or it includes that noise.
"""

from __future__ import annotations

import numpy as np
import torch

from .image_processing import masks_to_model_range
from .lidc import eval_prompts
from .metrics import compute_metrics_batch, pairwise_dice_iou

LIVE_KL = 0.01  # nats: a latent dimension whose mean KL(q || p) is above this carries information


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _valid_raters(row) -> list[int]:
    return [i for i, valid in enumerate(row["annotator_valid"]) if valid]


@torch.no_grad()
def ambiguity_diagnostics(pipe, dataset, max_images: int | None = None, num_samples: int = 16, seed: int = 0,
                          prior_gap: bool = True) -> dict:
    """Latent statistics over `dataset` rows (a lidc64 `Dataset` in the pipeline's prompt style).

    Returns `kl_per_dimension` (mean KL(q || p) of each dimension, nats), `kl` (their sum), `live_dimensions`
    (dimensions above `LIVE_KL`), `prior_posterior_correlation` (per dimension, Pearson over the pairs of the prior
    and posterior means; `..._live` is its KL-weighted mean over the live dimensions) and, when the UNet takes z and
    `prior_gap`, `ged_prior_z`, `ged_posterior_z`, `prior_gap` (means over images; N = `num_samples`, sample `s`
    uses rater `s mod R`'s prompt and, for the posterior row, that rater's posterior) and `z_effect` (mean over
    images and samples of 1 − Dice between a sample and the sample of the same initial noise under another prior z;
    in [0, 1]).
    Empty dict for a pipeline without prior and posterior.
    """
    if pipe.prior is None or pipe.posterior is None:
        return {}
    device = pipe._execution_device
    total = len(dataset) if max_images is None else min(max_images, len(dataset))
    predicts_z = bool(pipe.unet.latent_dim)
    prior_means, posterior_means, kls, geds = [], [], [], {"prior": [], "posterior": [], "z_effect": []}
    for index in range(total):
        row = dataset[index]
        raters = _valid_raters(row)
        prompts = eval_prompts(row, "annotator")
        image = pipe.preprocess(np.asarray(row["image"], np.float32)).to(device)
        masks = masks_to_model_range(torch.as_tensor(np.asarray(row["masks"], np.float32))[raters][:, None]).to(device)
        embeds, attention, _, _ = pipe.encode_prompt([prompts], device, num_samples=len(prompts))
        images = image.expand(len(raters), -1, -1, -1)
        posterior = pipe.posterior(torch.cat([images, masks], 1), embeds, attention)
        if predicts_z:
            prior = pipe.prior(images, embeds, attention)
        else:  # the paper's form: the prior reads a predicted mask, here one sample per rater prompt
            sample = pipe(np.asarray(row["image"], np.float32), [prompts], num_samples=len(prompts),
                          generator=torch.Generator().manual_seed(seed + index), output_type="pt").probabilities
            predicted = masks_to_model_range((sample[0] > 0.5).float()[:, None]).to(device)
            prior = pipe.prior(torch.cat([images, predicted], 1), embeds, attention)
        prior_means.append(prior.mean.float().cpu())
        posterior_means.append(posterior.mean.float().cpu())
        kls.append(posterior.kl_per_dimension(prior).cpu())
        if predicts_z and prior_gap:
            for name, ged in _prior_gap_row(pipe, row, raters, prompts, posterior, num_samples, seed + index).items():
                geds[name].append(ged)
    kl = torch.cat(kls).numpy()
    prior_mean, posterior_mean = torch.cat(prior_means).numpy(), torch.cat(posterior_means).numpy()
    kl_per_dimension = kl.mean(axis=0)
    live = kl_per_dimension > LIVE_KL
    correlation = np.array([_pearson(prior_mean[:, d], posterior_mean[:, d]) for d in range(kl.shape[1])])
    weights = np.where(live & np.isfinite(correlation), kl_per_dimension, 0.0)
    report = {
        "images": total, "pairs": int(kl.shape[0]), "kl": float(kl.sum(axis=1).mean()),
        "kl_per_dimension": kl_per_dimension.tolist(), "live_dimensions": int(live.sum()),
        "prior_posterior_correlation": correlation.tolist(),
        "prior_posterior_correlation_live": float((np.nan_to_num(correlation) * weights).sum() / weights.sum())
        if weights.sum() > 0 else float("nan"),
    }
    if geds["prior"]:
        report["ged_prior_z"] = float(np.mean(geds["prior"]))
        report["ged_posterior_z"] = float(np.mean(geds["posterior"]))
        report["prior_gap"] = report["ged_prior_z"] - report["ged_posterior_z"]
        report["z_effect"] = float(np.mean(geds["z_effect"]))
    return report


def _prior_gap_row(pipe, row, raters, prompts, posterior, num_samples: int, seed: int) -> dict[str, float]:
    """GED of one image with prior z and with posterior z, the same initial noise and prompts, and the z effect: the
    prior row's masks against those of the same noise under another prior draw of z (another generator seed)."""
    generator = torch.Generator().manual_seed(seed)
    height, width = np.asarray(row["image"]).shape[-2:]
    latents = torch.randn(num_samples, pipe.unet.mask_channels, height, width, generator=generator)
    of_sample = torch.arange(num_samples) % len(raters)
    noise = torch.randn(num_samples, pipe.unet.latent_dim, generator=generator).to(posterior.mean.device)
    posterior_z = posterior.select(of_sample.to(posterior.mean.device)).sample(noise=noise)
    annotations = np.asarray(row["masks"], bool)[None]
    image = np.asarray(row["image"], np.float32)

    def sample(z, z_seed: int) -> np.ndarray:  # z None: drawn from the prior with the generator
        return pipe(image, [prompts], num_samples=num_samples, latents=latents, ambiguity_latents=z,
                    generator=torch.Generator().manual_seed(z_seed)).masks

    def ged(masks: np.ndarray) -> float:
        return float(compute_metrics_batch(masks, annotations)["ged"][0])

    prior_masks = sample(None, seed)
    dice, _ = pairwise_dice_iou(torch.as_tensor(prior_masks), torch.as_tensor(sample(None, seed + 10**6)))
    return {"prior": ged(prior_masks), "posterior": ged(sample(posterior_z, seed)),
            "z_effect": float(1 - dice[0].diagonal().mean())}
