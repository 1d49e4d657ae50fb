"""The AmbiSeg mask denoiser: a `UNet2DConditionModel` over [image, noisy mask] channels."""

from __future__ import annotations

from diffusers import UNet2DConditionModel
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  diffusers' pipeline loader looks it up in this module

# Where attention sits is the main speed knob on CPU: full-resolution self-attention at 64x64 is ~7x slower.
UNET_PRESETS: dict[str, dict] = {
    # Sized for a 2-core CPU: attention (self + text cross-attention) only at the lowest level and the mid block.
    "cpu": dict(
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=2,  # diffusers' historic naming: this is the number of heads (128 / 2 = 64 channels per head)
        cross_attention_dim=128,
        norm_num_groups=16,
    ),
    # The paper's U-Net: base 128 channels, 64 channels per head, self- and cross-attention at the two lowest levels.
    "paper": dict(
        block_out_channels=(128, 256, 256, 512),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4, 8),
        cross_attention_dim=128,
        norm_num_groups=32,
    ),
}


class AmbiSegUNet(UNet2DConditionModel):
    r"""Mask denoiser of AmbiSeg.

    A [`~diffusers.UNet2DConditionModel`] (same config and `forward` contract, so schedulers, attention processors,
    gradient checkpointing, peft LoRA and `torch.compile` work unchanged) whose input is the normalised image
    concatenated with the noisy mask: `in_channels = image_channels + mask_channels`, `out_channels = mask_channels`.

    - Text: the frozen encoder's last hidden states `(B, L, encoder_hid_dim)` are projected to `cross_attention_dim`
      (`encoder_hid_dim_type="text_proj"`) and read by cross-attention.
    - Ambiguity latent `z` `(B, latent_dim)`: passed as `class_labels`; `class_embed_type="projection"` adds it to
      the time embedding, so it reaches every ResNet block.
    """

    @property
    def mask_channels(self) -> int:
        return self.config.out_channels

    @property
    def image_channels(self) -> int:
        return self.config.in_channels - self.config.out_channels

    @property
    def latent_dim(self) -> int:
        return self.config.projection_class_embeddings_input_dim or 0

    @classmethod
    def from_preset(
        cls,
        preset: str = "cpu",
        sample_size: int = 64,
        image_channels: int = 1,
        mask_channels: int = 1,
        text_embed_dim: int = 384,
        latent_dim: int = 6,
        **overrides,
    ) -> "AmbiSegUNet":
        """Builds a fresh (randomly initialised) denoiser from a named preset ("cpu" or "paper").

        `latent_dim=0` removes the ambiguity latent (the paper's "no ambiguity objective" ablation).
        """
        if preset not in UNET_PRESETS:
            raise ValueError(f"`preset` must be one of {sorted(UNET_PRESETS)}, got {preset!r}.")
        if image_channels < 1 or mask_channels < 1:
            raise ValueError("`image_channels` and `mask_channels` must be >= 1.")
        config = dict(UNET_PRESETS[preset])
        config.update(
            sample_size=sample_size,
            in_channels=image_channels + mask_channels,
            out_channels=mask_channels,
            encoder_hid_dim=text_embed_dim,
            encoder_hid_dim_type="text_proj",
            mid_block_type="UNetMidBlock2DCrossAttn",
        )
        if latent_dim > 0:
            config.update(class_embed_type="projection", projection_class_embeddings_input_dim=latent_dim)
        config.update(overrides)
        return cls(**config)
