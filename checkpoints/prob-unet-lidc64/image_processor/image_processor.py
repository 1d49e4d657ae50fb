# `DiffusionPipeline.from_pretrained(<this repository>, trust_remote_code=True)` imports AmbiSegImageProcessor from this file. The
# class is the installed ambiseg-diffusers package's (pip install ambiseg-diffusers): this repository carries no code.
from ambiseg_diffusers.image_processor import AmbiSegImageProcessor

__all__ = ["AmbiSegImageProcessor"]
