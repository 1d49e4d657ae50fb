from .ambiguity_encoder import AmbiguityEncoder, DiagonalGaussian
from .unet_ambiseg import UNET_PRESETS, AmbiSegUNet

__all__ = ["AmbiSegUNet", "AmbiguityEncoder", "DiagonalGaussian", "UNET_PRESETS"]
