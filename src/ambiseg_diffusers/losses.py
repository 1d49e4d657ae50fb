"""Training objectives: AmbiSeg's hybrid diffusion + KL loss, and the Diffusion-DPO loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

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

    Inputs are per-pair denoising errors `(B,)` (see `dpo_errors`), with the winner and the loser noised by the same
    noise and timestep. With `delta = (policy_w - reference_w) - (policy_l - reference_l)` the loss is
    `-log sigmoid(-0.5 * beta * delta)`, mean over pairs.

    The beta convention is Salesforce DiffusionDPO's (`-0.5 * beta_dpo * (model_diff - ref_diff)`), whose default
    beta_dpo = 5000 is the seed paper's beta: 5000 here is an effective 2500 on delta, the value diffusers' research
    example applies directly. Returns the loss and logs: the implicit accuracy (fraction of pairs with delta < 0),
    the mean |0.5 * beta * delta| and the mean errors.
    """
    delta = (policy_winner_mse - reference_winner_mse) - (policy_loser_mse - reference_loser_mse)
    scaled = 0.5 * beta * delta
    loss = -F.logsigmoid(-scaled).mean()
    logs = {
        "implicit_accuracy": (delta < 0).float().mean().detach(),
        "scaled_delta": scaled.abs().mean().detach(),
        "policy_winner_mse": policy_winner_mse.mean().detach(),
        "policy_loser_mse": policy_loser_mse.mean().detach(),
        "reference_winner_mse": reference_winner_mse.mean().detach(),
        "reference_loser_mse": reference_loser_mse.mean().detach(),
    }
    return loss, logs


DPO_ERROR_SPACES = ("epsilon", "epsilon_min_snr", "x0", "x0_clamped")


def dpo_errors(
    scheduler, model_output: torch.Tensor, noisy: torch.Tensor, noise: torch.Tensor, clean: torch.Tensor,
    timesteps: torch.Tensor, space: str = "epsilon", snr_gamma: float = 5.0,
) -> torch.Tensor:
    """Per-row denoising errors `(B,)` (mean over pixels) that the DPO loss compares, in one of `DPO_ERROR_SPACES`.

    - "epsilon": `||eps - eps_hat||^2`, whatever the model predicts (Diffusion-DPO's choice). For an x0 model this is
      `SNR(t) * ||x0 - x0_hat||^2`: pairs at small t, where SNR is in the thousands, dominate the loss.
    - "epsilon_min_snr": the x0 error weighted by `min(SNR(t), snr_gamma)` (min-SNR, Hang et al. 2023): epsilon-space
      errors where SNR <= gamma, capped below that noise level.
    - "x0": `||x0 - x0_hat||^2`, every timestep weighted alike (needs a larger beta: errors are 1/SNR as large).
    - "x0_clamped": the same on `clamp(x0_hat, -1, 1)`, the prediction the sampler actually uses.

    `model_output`, `noisy`, `noise`, `clean`: `(B, C, H, W)` (clean in [-1, 1]); `timesteps`: `(B,)`.
    """
    if space not in DPO_ERROR_SPACES:
        raise ValueError(f"`space` must be one of {DPO_ERROR_SPACES}, got {space!r}.")
    model_output = model_output.float()
    if space == "epsilon":
        return ((predicted_noise(scheduler, model_output, noisy, timesteps) - noise) ** 2).mean(dim=(1, 2, 3))
    x0 = predicted_clean(scheduler, model_output, noisy, timesteps)
    if space == "x0_clamped":
        x0 = x0.clamp(-1, 1)
    error = ((x0 - clean.float()) ** 2).mean(dim=(1, 2, 3))
    if space == "epsilon_min_snr":
        error = error * compute_snr(scheduler, timesteps).float().clamp(max=snr_gamma)
    return error


def _signal_and_noise_scales(scheduler, timesteps: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """a = sqrt(alpha_bar(t)) and s = sqrt(1 - alpha_bar(t)), each `(B, 1, 1, 1)`, with x_t = a x0 + s eps."""
    alpha_bar = scheduler.alphas_cumprod.to(device)[timesteps].float().view(-1, 1, 1, 1)
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def predicted_clean(scheduler, model_output: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The clean mask a model output implies, whatever its `prediction_type` (x_t = a x0 + s eps)."""
    kind = scheduler.config.prediction_type
    if kind == "sample":
        return model_output
    a, s = _signal_and_noise_scales(scheduler, timesteps, noisy.device)
    if kind == "epsilon":
        return (noisy - s * model_output) / a
    if kind == "v_prediction":
        return a * noisy - s * model_output
    raise ValueError(f"unsupported prediction_type {kind!r}")


def predicted_noise(scheduler, model_output: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The noise a model output implies, whatever its `prediction_type` (epsilon, x0 "sample" or v).

    With x_t = a x0 + s eps (a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar)): from x0, eps = (x_t - a x0) / s, so an
    x0 error maps to an epsilon error scaled by a / s = sqrt(SNR(t)) exactly.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return model_output
    a, s = _signal_and_noise_scales(scheduler, timesteps, noisy.device)
    if kind == "sample":
        return (noisy - a * model_output) / s
    if kind == "v_prediction":
        return s * noisy + a * model_output
    raise ValueError(f"unsupported prediction_type {kind!r}")


def ddim_solver_step(scheduler, clean: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor,
                     previous: torch.Tensor) -> torch.Tensor:
    """The deterministic DDIM step (eta = 0) from `noisy` at `timesteps` to `previous` `(B,)` (>= 0) given the
    predicted clean mask `clean` `(B, C, H, W)`: the teacher's ODE solver of consistency distillation. Equals
    `DDIMScheduler.step` (no clipping; `clean` is already clamped) between the same two timesteps (tested). The last
    step of the schedule ends at timestep 0, with alpha_cumprod[0] (diffusers' LCM distillation does the same),
    where `DDIMScheduler` would go on to its `final_alpha_cumprod`."""
    a, s = _signal_and_noise_scales(scheduler, timesteps, noisy.device)
    eps = (noisy - a * clean) / s
    a_prev, s_prev = _signal_and_noise_scales(scheduler, previous, noisy.device)
    return a_prev * clean + s_prev * eps


def consistency_output(scalings: tuple[torch.Tensor, torch.Tensor], noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """The consistency function f(x_t, t) = c_skip(t) x_t + c_out(t) x0(x_t, t) with the boundary scalings `(c_skip,
    c_out)` `(B,)` of `LCMScheduler.get_scalings_for_boundary_condition_discrete`, so that sampling with
    `LCMScheduler` evaluates exactly what distillation trained."""
    c_skip, c_out = (c.reshape(-1, *([1] * (noisy.dim() - 1))) for c in scalings)
    return c_skip * noisy + c_out * clean
