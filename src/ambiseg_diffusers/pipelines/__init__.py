import json
import os

from .pipeline_ambiseg import AmbiSegPipeline, AmbiSegPipelineOutput
from .pipeline_prob_unet import ProbUNetPipeline

__all__ = ["AmbiSegPipeline", "AmbiSegPipelineOutput", "ProbUNetPipeline", "load_pipeline"]

PIPELINE_CLASSES = {cls.__name__: cls for cls in (AmbiSegPipeline, ProbUNetPipeline)}


def load_pipeline(pretrained_model_name_or_path: str | os.PathLike, **kwargs):
    """Any pipeline of this package from a folder or Hub id, the class read from its `model_index.json` (a LoRA
    folder without one is a TDG-DiffDPO adapter: an `AmbiSegPipeline`). `kwargs` go to `from_pretrained`."""
    from ..hub_utils import BASE_DOWNLOAD_KWARGS, download_kwargs_of, resolve_pretrained_path

    download_kwargs = download_kwargs_of(kwargs)
    path = resolve_pretrained_path(pretrained_model_name_or_path, **download_kwargs)
    kwargs.update({k: v for k, v in download_kwargs.items() if k in BASE_DOWNLOAD_KWARGS})  # an adapter's base needs them
    index = os.path.join(path, "model_index.json")
    name = "AmbiSegPipeline"
    if os.path.isfile(index):
        with open(index) as f:
            name = json.load(f).get("_class_name", name)
        name = name[1] if isinstance(name, list) else name  # the Hub's custom-code layout: [module, class]
    if name not in PIPELINE_CLASSES:
        raise ValueError(f"{index} names the pipeline class {name!r}; this package loads {sorted(PIPELINE_CLASSES)}.")
    return PIPELINE_CLASSES[name].from_pretrained(path, **kwargs)
