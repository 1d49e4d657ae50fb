"""Probabilistic-U-Net style prior p(z | image, text) and posterior q(z | image, text, mask)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import nn


@dataclass
class DiagonalGaussian:
    """Axis-aligned Gaussian over the ambiguity latent; `mean` and `logvar` are `(B, latent_dim)`."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def select(self, index: torch.Tensor) -> "DiagonalGaussian":
        """The distributions at rows `index` (e.g. one per sample from one per (image, prompt) pair)."""
        return DiagonalGaussian(mean=self.mean[index], logvar=self.logvar[index])

    def sample(
        self, generator: torch.Generator | list[torch.Generator] | None = None, temperature: float = 1.0,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Reparameterised sample `mean + temperature * std * noise` (differentiable w.r.t. `mean` and `logvar`);
        `noise` `(B, latent_dim)` is drawn from `generator` unless given."""
        if noise is None:
            noise = randn_tensor(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + temperature * self.std * noise.to(self.mean)

    def kl(self, other: "DiagonalGaussian") -> torch.Tensor:
        """KL(self || other), summed over the latent dimensions: shape `(B,)`."""
        var_ratio = torch.exp(self.logvar - other.logvar)
        mean_term = (self.mean - other.mean) ** 2 / torch.exp(other.logvar)
        return 0.5 * (var_ratio + mean_term - 1.0 - (self.logvar - other.logvar)).sum(dim=-1)


def masked_mean(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the tokens that `attention_mask` marks: `(B, L, D)` -> `(B, D)`."""
    if attention_mask is None:
        return hidden_states.mean(dim=1)
    weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
    return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class AmbiguityEncoder(ModelMixin, ConfigMixin):
    r"""Maps an image (and, for the posterior, a rater mask) plus the prompt to a diagonal Gaussian over `z`.

    The same class serves as prior (`in_channels = image_channels`) and posterior
    (`in_channels = image_channels + mask_channels`); each is its own pipeline component in its own folder.

    Inputs: `image` `(B, in_channels, H, W)` in [-1, 1] (image and mask channels concatenated for the posterior);
    `encoder_hidden_states` `(B, L, text_embed_dim)`, `encoder_attention_mask` `(B, L)` with 1 = real token.
    `text_embed_dim=0` builds an image-only encoder (the Probabilistic U-Net's prior and posterior nets), which
    takes `encoder_hidden_states=None`.
    Output: [`DiagonalGaussian`] with `(B, latent_dim)` mean and log-variance.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        latent_dim: int = 6,
        text_embed_dim: int = 384,
        block_out_channels: tuple[int, ...] = (32, 64, 128),
        norm_num_groups: int = 8,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in block_out_channels:
            layers += [
                nn.Conv2d(channels, width, 3, stride=2, padding=1),
                nn.GroupNorm(norm_num_groups, width),
                nn.SiLU(),
                nn.Conv2d(width, width, 3, padding=1),
                nn.GroupNorm(norm_num_groups, width),
                nn.SiLU(),
            ]
            channels = width
        self.conv = nn.Sequential(*layers)
        self.text_proj = nn.Linear(text_embed_dim, channels) if text_embed_dim else None
        features = 2 * channels if text_embed_dim else channels
        self.head = nn.Sequential(nn.Linear(features, channels), nn.SiLU(), nn.Linear(channels, 2 * latent_dim))
        # Start at N(0, I) whatever the input, so an untrained prior samples like the standard normal.
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(
        self,
        image: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> DiagonalGaussian:
        if image.ndim != 4 or image.shape[1] != self.config.in_channels:
            raise ValueError(
                f"`image` must be (B, {self.config.in_channels}, H, W), got {tuple(image.shape)}."
            )
        if (encoder_hidden_states is None) != (self.text_proj is None):
            expected = "None (an image-only encoder)" if self.text_proj is None else "(B, L, text_embed_dim) prompt states"
            raise ValueError(f"`encoder_hidden_states` must be {expected}.")
        features = self.conv(image).mean(dim=(2, 3))
        if self.text_proj is not None:
            text = self.text_proj(masked_mean(encoder_hidden_states, encoder_attention_mask))
            features = torch.cat([features, text], dim=-1)
        mean, logvar = self.head(features).chunk(2, dim=-1)
        # Bounded log-variance keeps the KL finite early in training.
        return DiagonalGaussian(mean=mean, logvar=logvar.clamp(-10.0, 5.0))
