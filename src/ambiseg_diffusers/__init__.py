"""ambiseg-diffusers: ambiguous medical image segmentation with mask diffusion (AmbiSeg) and TDG-DiffDPO."""

from ._version import __version__

from . import lidc  # noqa: F401  (registers the "lidc64" data source of data.load_multirater)
from .image_processing import normalize_image, prepare_image
from .image_processor import AmbiSegImageProcessor
from .metrics import compute_metrics, compute_metrics_batch
from .models import AmbiguityEncoder, AmbiSegUNet, DiagonalGaussian, ProbUNetModel
from .pipelines import AmbiSegPipeline, AmbiSegPipelineOutput, ProbUNetPipeline, load_pipeline

__all__ = [
    "AmbiSegImageProcessor", "AmbiSegPipeline", "AmbiSegPipelineOutput", "AmbiSegUNet", "AmbiguityEncoder", "DiagonalGaussian",
    "ProbUNetModel", "ProbUNetPipeline", "compute_metrics", "compute_metrics_batch", "load_pipeline",
    "normalize_image", "prepare_image",
]
