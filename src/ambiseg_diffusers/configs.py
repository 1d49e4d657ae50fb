"""Training recipes in one place: the paper's and one sized for a 2-core CPU. Each field has a flag of the same
name in the training scripts, which overrides the named recipe (`--config cpu --learning_rate 1e-4 ...`)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


class _Recipe:
    def override(self, **changes):
        """A copy with the given fields changed (`None` values are ignored: flags the user did not pass)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass
class AmbiSegTrainingConfig(_Recipe):
    # Model
    unet_preset: str = "cpu"  # see models.unet_ambiseg.UNET_PRESETS
    resolution: int = 64
    # The ambiguity term (models/ambiguity_encoder.py, AMBIGUITY_DESIGNS): "latent" (z from a prior feeds the UNet),
    # "prediction_kl" (the paper's L_kl on the denoiser's predicted mask; the UNet takes no z) or "none".
    ambiguity: str = "latent"
    latent_dim: int = 6  # 0 = ambiguity "none" (no z, no KL)
    text_pooling: str = "mean"  # how the prior and posterior read the prompt: "mean" of its tokens or "attention"
    freeze_ambiguity_encoders: bool = False  # "prediction_kl": prior and posterior fixed at their random init (CIMD's code)
    prior_z_fraction: float = 0.0  # "latent": share of training rows whose UNet gets a prior z instead of a posterior z
    use_text: bool = True  # False = the "no text" ablation (empty prompt always)
    text_encoder: str = "offline-minilm"  # Hub id or folder; "offline-minilm" = all-MiniLM-L6-v2 from PyPI
    prompt_style: str = "paper"  # lidc.ratings_to_prompt: "paper" (Figure 5, with diameter and volume), "ratings", "short",
    # "slice" (the paper's form stating the mask's diameter on this slice: the text-control recipe)
    # Text control (text_control.py; style "slice" on LIDC rows): the share of training pairs whose rater mask is edited
    # to a drawn diameter (and, for `counterfactual_shape_rate` of them, a smoothed or roughened boundary) with the
    # prompt restated from the edit; and the share of prompts written as a plain sentence instead of the paper's form.
    counterfactual_rate: float = 0.0
    counterfactual_shape_rate: float = 0.5
    plain_prompt_rate: float = 0.0
    # Diffusion
    prediction_type: str = "sample"  # "epsilon" (paper), "sample" (x0) or "v_prediction"
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    rescale_betas_zero_snr: bool = False
    # Optimisation
    max_train_steps: int = 3000
    train_batch_size: int = 32
    learning_rate: float = 2e-4
    lr_scheduler: str = "linear"  # diffusers.optimization.get_scheduler name
    lr_warmup_steps: int = 0
    adam_weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    kl_weight: float = 1e-3
    ema_decay: float = 0.999
    ema_warmup: bool = True  # diffusers EMAModel warm-up (decay grows with the step count)
    prompt_dropout: float = 0.1  # empty prompt this often, for classifier-free guidance at inference
    # Sampling (validation and the saved pipeline's defaults)
    # UniPC-6: the fewest UNet calls within 0.005 GED of DDIM-100 on all three selection views (issue 40;
    # docs/results/sweep-selection/sweep.md); the paper preset sets DDIM-100 for its epsilon model.
    sampling_scheduler: str = "unipc"
    sampling_steps: int = 6
    image_clip: float = 3.0


CONFIGS: dict[str, AmbiSegTrainingConfig] = {
    # A few thousand steps at batch 32 fit in an hour or two on 2 CPU cores (bf16). x0-prediction: see
    # ../shared/notes/calibration.md, where epsilon-prediction samples stayed noise-like at this budget.
    "cpu": AmbiSegTrainingConfig(),
    # The paper's recipe (T = 1000, linear betas, epsilon, base-128 U-Net, 50k steps, batch 32, AdamW linear decay
    # from 1e-4, lambda_KL = 1e-3, EMA 0.9999, 128x128, Bio_ClinicalBERT, DDIM-100 sampling).
    "paper": AmbiSegTrainingConfig(
        unet_preset="paper", resolution=128, text_encoder="emilyalsentzer/Bio_ClinicalBERT", prediction_type="epsilon",
        max_train_steps=50_000, learning_rate=1e-4, ema_decay=0.9999, ema_warmup=False, sampling_scheduler="ddim",
        sampling_steps=100,
    ),
}




@dataclass
class DPOTrainingConfig(_Recipe):
    beta: float = 5000.0  # Salesforce DiffusionDPO's convention, the paper's value (see losses.diffusion_dpo_loss)
    # What the loss compares (losses.DPO_ERROR_SPACES). x0: chosen on the selection split for this package's
    # x0-prediction models (docs/results.md, "TDG-DiffDPO"); epsilon-space errors weight them by SNR(t).
    error_space: str = "x0"
    snr_gamma: float = 5.0  # the cap of error_space "epsilon_min_snr"
    pair_latent: str = "posterior"  # z of a pair: each mask's posterior mean, or "prior_sample" (shared, as in sampling)
    learning_rate: float = 5e-7
    lr_scheduler: str = "constant"
    num_epochs: int = 3
    max_train_steps: int = 0  # > 0 overrides num_epochs
    train_batch_size: int = 8  # preference pairs per step
    max_grad_norm: float = 1.0
    adam_weight_decay: float = 0.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False
    lora_rank: int = 0  # 0 = full fine-tune; > 0 = peft LoRA on the UNet's attention and ResNet projections
    lora_alpha: int = 0  # 0 = same as the rank


DPO_CONFIGS: dict[str, DPOTrainingConfig] = {
    # The paper's recipe: constant lr 5e-7, 3 epochs, beta 5000, EMA 0.9999 (full fine-tune), epsilon-space errors
    # (Diffusion-DPO's, natural for the paper's epsilon-prediction model).
    "paper": DPOTrainingConfig(error_space="epsilon"),
    # A LoRA run that moves the model within minutes on 2 CPU cores (a few hundred pairs): higher lr, no EMA lag;
    # x0-space errors and 10 epochs, chosen on the selection split (docs/results.md, "TDG-DiffDPO").
    "cpu": DPOTrainingConfig(learning_rate=5e-4, num_epochs=10, ema_decay=0.0, lora_rank=8, train_batch_size=8),
}


@dataclass
class ProbUNetTrainingConfig(_Recipe):
    """The Probabilistic U-Net baseline (models/prob_unet.py): the official release's LIDC choices."""

    resolution: int = 64
    latent_dim: int = 6
    block_out_channels: tuple = (32, 64, 128, 192)
    convs_per_block: int = 3
    num_1x1_convs: int = 3
    kl_weight: float = 1.0  # beta of the ELBO (the official release; Knegt's port uses 10)
    max_train_steps: int = 3000
    train_batch_size: int = 32
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_weight_decay: float = 1e-5  # the release's L2 regularisation
    max_grad_norm: float = 1.0
    image_clip: float = 3.0
    # training_batch() reads these two: the baseline sees no text
    use_text: bool = False
    prompt_dropout: float = 0.0


PROB_UNET_CONFIGS: dict[str, ProbUNetTrainingConfig] = {"kohl2018": ProbUNetTrainingConfig()}
