"""Training objectives: AmbiSeg's hybrid diffusion + KL loss, and the Diffusion-DPO loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .models.ambiguity_encoder import DiagonalGaussian


def diffusion_target(scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the denoiser regresses for the scheduler's `prediction_type`: the noise, the clean mask, or v."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return clean
    if kind == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}; expected 'epsilon', 'sample' or 'v_prediction'.")


def ambiseg_loss(
    model_output: torch.Tensor,
    target: torch.Tensor,
    posterior: DiagonalGaussian | None = None,
    prior: DiagonalGaussian | None = None,
    kl_weight: float = 1e-3,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The hybrid loss `L = L_mse + kl_weight * KL(q || p)` (paper: kl_weight = 0.001).

    `model_output`, `target`: `(B, C, H, W)`; MSE is the mean over all elements. The KL is summed over the latent
    dimensions and averaged over the batch. Without `posterior`/`prior` (the no-ambiguity ablation) L = L_mse.
    Returns the loss and its parts (detached) for logging.
    """
    mse = F.mse_loss(model_output.float(), target.float())
    if posterior is None or prior is None:
        return mse, {"mse": mse.detach()}
    kl = posterior.kl(prior).mean()
    return mse + kl_weight * kl, {"mse": mse.detach(), "kl": kl.detach()}


def diffusion_dpo_loss(
    policy_winner_mse: torch.Tensor,
    policy_loser_mse: torch.Tensor,
    reference_winner_mse: torch.Tensor,
    reference_loser_mse: torch.Tensor,
    beta: float = 5000.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO (Wallace et al. 2023; the seed paper's Eq. 6-7).

    Inputs are per-pair denoising errors `(B,)`, each the mean over pixels of `||target - prediction||^2`, with the
    winner and the loser noised by the same noise and timestep. With
    `delta = (policy_w - reference_w) - (policy_l - reference_l)` the loss is `-log sigmoid(-beta * delta)`, mean
    over pairs. Convention: `beta` multiplies delta directly, as in the paper's equation and diffusers' research
    example; Salesforce's DiffusionDPO code uses `-0.5 * beta` (their beta = 2x ours for the same loss).
    Returns the loss and logs: the implicit accuracy (fraction of pairs with delta < 0) and the mean errors.
    """
    delta = (policy_winner_mse - reference_winner_mse) - (policy_loser_mse - reference_loser_mse)
    loss = -F.logsigmoid(-beta * delta).mean()
    logs = {
        "implicit_accuracy": (delta < 0).float().mean().detach(),
        "policy_winner_mse": policy_winner_mse.mean().detach(),
        "policy_loser_mse": policy_loser_mse.mean().detach(),
        "reference_winner_mse": reference_winner_mse.mean().detach(),
        "reference_loser_mse": reference_loser_mse.mean().detach(),
    }
    return loss, logs


def predicted_noise(scheduler, model_output: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The noise a model output implies, whatever its `prediction_type` (epsilon, x0 "sample" or v).

    With x_t = a x0 + s eps (a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar)): from x0, eps = (x_t - a x0) / s, so an
    x0 error maps to an epsilon error scaled by a / s = sqrt(SNR(t)) exactly.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return model_output
    alpha_bar = scheduler.alphas_cumprod.to(noisy.device)[timesteps].float().view(-1, 1, 1, 1)
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if kind == "sample":
        return (noisy - a * model_output) / s
    if kind == "v_prediction":
        return s * noisy + a * model_output
    raise ValueError(f"unsupported prediction_type {kind!r}")
