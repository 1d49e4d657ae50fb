# `DiffusionPipeline.from_pretrained(<this repository>, trust_remote_code=True)` imports AmbiguityEncoder from this file. The
# class is the installed ambiseg-diffusers package's (pip install ambiseg-diffusers): this repository carries no code.
from ambiseg_diffusers.models.ambiguity_encoder import AmbiguityEncoder

__all__ = ["AmbiguityEncoder"]
