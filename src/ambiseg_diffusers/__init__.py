"""ambiseg-diffusers: ambiguous medical image segmentation with mask diffusion (AmbiSeg) and TDG-DiffDPO."""

__version__ = "0.2.0"

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
