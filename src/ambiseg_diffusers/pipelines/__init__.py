from .pipeline_ambiseg import AmbiSegPipeline, AmbiSegPipelineOutput

__all__ = ["AmbiSegPipeline", "AmbiSegPipelineOutput"]
