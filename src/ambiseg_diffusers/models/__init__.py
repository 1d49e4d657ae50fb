from .ambiguity_encoder import AmbiguityEncoder, DiagonalGaussian
from .prob_unet import ProbUNetModel
from .unet_ambiseg import UNET_PRESETS, AmbiSegUNet

__all__ = ["AmbiSegUNet", "AmbiguityEncoder", "DiagonalGaussian", "ProbUNetModel", "UNET_PRESETS"]
