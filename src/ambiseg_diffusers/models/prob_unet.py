"""The Probabilistic U-Net baseline (Kohl et al., "A Probabilistic U-Net for Segmentation of Ambiguous Images",
NeurIPS 2018).

Read against the two reference codes, the details that matter:

- Official TensorFlow release (github.com/SimonKohl/probabilistic_unet, `model/probabilistic_unet.py`): a U-Net
  whose decoder output is combined with a low-dimensional latent `z` (`latent_dim=6` for LIDC) only at the end:
  `z` is tiled over the image, concatenated with the last decoder features and passed through a few 1x1
  convolutions (`num_1x1_convs=3`); prior net p(z | x) and posterior net q(z | x, y) are convolutional encoders
  with global average pooling and a 1x1 head giving an axis-aligned Gaussian; the loss is the ELBO
  `reconstruction + beta * KL(q || p)` with the cross-entropy summed over pixels and `beta = 1`; LIDC training draws
  one random rater's mask per image per step; at test time z ~ p(z | x).
- Stefan Knegt's PyTorch port (github.com/stefanknegt/Probabilistic-Unet-Pytorch, `probabilistic_unet.py`): the same
  structure with `num_filters=[32, 64, 128, 192]`, BCE-with-logits summed over pixels, `no_convs_fcomb=4`, beta 10.

Here: the official release's choices (latent 6, three 1x1 convolutions, beta 1, summed binary cross-entropy, one
random rater per step); prior and posterior are this package's `AmbiguityEncoder` without text. No text anywhere:
the baseline sees the image only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .ambiguity_encoder import AmbiguityEncoder, DiagonalGaussian


def _conv_block(in_channels: int, out_channels: int, num_convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(num_convs):
        layers += [nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class ProbUNetModel(ModelMixin, ConfigMixin):
    r"""U-Net + prior/posterior nets + 1x1 "fcomb" head, one component of [`ProbUNetPipeline`].

    Inputs: `image` `(B, image_channels, H, W)` normalised to [-1, 1] (H, W divisible by 2^(levels - 1));
    `mask` `(B, 1, H, W)` in {-1, 1} (one rater) for the posterior. `decode` returns logits `(B, 1, H, W)`; the
    foreground probability is their sigmoid.
    """

    @register_to_config
    def __init__(
        self,
        image_channels: int = 1,
        latent_dim: int = 6,
        block_out_channels: tuple[int, ...] = (32, 64, 128, 192),
        convs_per_block: int = 3,
        num_1x1_convs: int = 3,
        encoder_block_out_channels: tuple[int, ...] = (32, 64, 128, 192),
        norm_num_groups: int = 8,
    ):
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"`latent_dim` must be >= 1, got {latent_dim}.")
        widths = list(block_out_channels)
        self.down = nn.ModuleList(
            _conv_block(image_channels if i == 0 else widths[i - 1], w, convs_per_block) for i, w in enumerate(widths)
        )
        self.up = nn.ModuleList(
            _conv_block(widths[i + 1] + widths[i], widths[i], convs_per_block) for i in reversed(range(len(widths) - 1))
        )
        head: list[nn.Module] = []
        channels = widths[0] + latent_dim
        for _ in range(num_1x1_convs):
            head += [nn.Conv2d(channels, widths[0], 1), nn.ReLU(inplace=True)]
            channels = widths[0]
        head.append(nn.Conv2d(channels, 1, 1))
        self.fcomb = nn.Sequential(*head)
        encoder = dict(latent_dim=latent_dim, text_embed_dim=0, block_out_channels=tuple(encoder_block_out_channels),
                       norm_num_groups=norm_num_groups)
        self.prior = AmbiguityEncoder(in_channels=image_channels, **encoder)
        self.posterior = AmbiguityEncoder(in_channels=image_channels + 1, **encoder)

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """The U-Net's last decoder features `(B, block_out_channels[0], H, W)` (deterministic: compute once, then
        decode many samples)."""
        levels = len(self.down)
        if image.ndim != 4 or image.shape[1] != self.config.image_channels:
            raise ValueError(f"`image` must be (B, {self.config.image_channels}, H, W), got {tuple(image.shape)}.")
        if image.shape[-1] % 2 ** (levels - 1) or image.shape[-2] % 2 ** (levels - 1):
            raise ValueError(f"`image` height and width must be divisible by {2 ** (levels - 1)}, got {tuple(image.shape[-2:])}.")
        skips = []
        hidden = image
        for i, block in enumerate(self.down):
            hidden = block(F.avg_pool2d(hidden, 2) if i else hidden)
            skips.append(hidden)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            hidden = F.interpolate(hidden, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            hidden = block(torch.cat([hidden, skip], dim=1))
        return hidden

    def decode(self, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Logits `(B, 1, H, W)` for features `(B, C, H, W)` and latents `z` `(B, latent_dim)`."""
        tiled = z[:, :, None, None].expand(-1, -1, *features.shape[-2:]).to(features.dtype)
        return self.fcomb(torch.cat([features, tiled], dim=1))

    def prior_distribution(self, image: torch.Tensor) -> DiagonalGaussian:
        return self.prior(image)

    def posterior_distribution(self, image: torch.Tensor, mask: torch.Tensor) -> DiagonalGaussian:
        return self.posterior(torch.cat([image, mask], dim=1))

    def forward(
        self, image: torch.Tensor, mask: torch.Tensor, kl_weight: float = 1.0, noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training: the negative ELBO of one batch: BCE summed over pixels + `kl_weight` * KL(q(z | x, y) || p(z | x)), both
        averaged over the batch. `mask` in {-1, 1}; `noise` `(B, latent_dim)`: the reparameterisation noise."""
        posterior = self.posterior_distribution(image, mask)
        prior = self.prior_distribution(image)
        logits = self.decode(self.features(image), posterior.sample(noise=noise))
        target = (mask > 0).to(logits.dtype)
        reconstruction = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(dim=(1, 2, 3)).mean()
        kl = posterior.kl(prior).mean()
        return reconstruction + kl_weight * kl, {"reconstruction": reconstruction.detach(), "kl": kl.detach()}
