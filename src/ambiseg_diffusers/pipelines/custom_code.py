"""The Hub's custom-code layout, so that `DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)` (the snippet
the Hub shows for `library_name: diffusers`) loads this package's pipelines.

diffusers' convention for pipelines it does not ship: `model_index.json` names the pipeline and each custom component
as `[module, class]` pairs, and the repository carries those modules: `pipeline_ambiseg.py` at its root,
`unet/unet_ambiseg.py`, `prior/ambiguity_encoder.py`, ... Here each module is a two-line shim importing the class from
the installed `ambiseg-diffusers` package (docs/usage.md says why: the code a repository runs is the reviewed,
versioned package a user installed, not a copy that drifts from it, and the shims hold nothing to review).

This package's own loaders (`AmbiSegPipeline.from_pretrained`, `load_pipeline`) read the same folder without running
any of its code: `CustomCodeLayoutMixin.load_config` maps the pairs back onto the installed modules.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
from pathlib import Path

PACKAGE = "ambiseg_diffusers"
SHIM = """# `DiffusionPipeline.from_pretrained(<this repository>, trust_remote_code=True)` imports {cls} from this file. The
# class is the installed ambiseg-diffusers package's (pip install ambiseg-diffusers): this repository carries no code.
from {module} import {cls}

__all__ = ["{cls}"]
"""


def _file_of(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def package_classes(pipeline_class: type) -> dict[str, str]:
    """{class name: its module} for the classes a folder of `pipeline_class` can name: the pipeline (given by the
    pipeline that saves or loads, so this helper imports no pipeline), the models and the image processor."""
    from ..image_processor import AmbiSegImageProcessor
    from ..models import AmbiguityEncoder, AmbiSegUNet
    from ..models.prob_unet import ProbUNetModel

    shipped = [c for c in pipeline_class.__mro__  # the pipeline, or the package's pipeline a user's subclass extends
               if c.__module__.split(".")[0] == __name__.split(".")[0] and hasattr(c, "_get_signature_keys")]
    return {c.__name__: c.__module__ for c in (*shipped, AmbiSegUNet, AmbiguityEncoder, ProbUNetModel,
                                                AmbiSegImageProcessor)}


def write_custom_code_layout(folder: str | os.PathLike, pipeline_class: type) -> None:
    """Rewrites a saved `pipeline_class` folder's `model_index.json` in the Hub layout and writes the shim modules.
    Idempotent: a folder already in the layout (a re-save, a re-push) keeps it. A pipeline class this package does
    not ship (a user's subclass) keeps diffusers' own layout: the Hub layout would point at a module it cannot
    import."""
    folder = Path(folder)
    index_file = folder / "model_index.json"
    index = from_custom_code_layout(json.loads(index_file.read_text()), pipeline_class)
    known = package_classes(pipeline_class)
    pipeline = index["_class_name"]
    if pipeline not in known:
        return
    index["_class_name"] = [_file_of(known[pipeline]), pipeline]
    (folder / f"{_file_of(known[pipeline])}.py").write_text(SHIM.format(module=known[pipeline], cls=pipeline))
    for name, spec in index.items():
        if isinstance(spec, list) and len(spec) == 2 and spec[0] and spec[0].startswith(f"{PACKAGE}."):
            module, cls = spec
            index[name] = [_file_of(module), cls]
            (folder / name).mkdir(exist_ok=True)
            (folder / name / f"{_file_of(module)}.py").write_text(SHIM.format(module=module, cls=cls))
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def from_custom_code_layout(config: dict, pipeline_class: type) -> dict:
    """A `pipeline_class` folder's `model_index.json` dict in the Hub layout -> the same with this package's
    importable modules (a plain `_class_name`, `[ambiseg_diffusers.models.unet_ambiseg, AmbiSegUNet]`); other entries
    unchanged."""
    known = package_classes(pipeline_class)
    config = dict(config)
    if isinstance(config.get("_class_name"), (list, tuple)) and config["_class_name"][1] in known:
        config["_class_name"] = config["_class_name"][1]
    for name, spec in config.items():
        if (not name.startswith("_") and isinstance(spec, (list, tuple)) and len(spec) == 2 and spec[1] in known
                and spec[0] == _file_of(known[spec[1]])):
            config[name] = [known[spec[1]], spec[1]]
    return config


# Set while this package's own `from_pretrained` runs diffusers' loader: a pipeline built outside it was built by
# `DiffusionPipeline.from_pretrained`, which knows nothing of the folder's adapter files.
_OWN_LOADER = contextvars.ContextVar("ambiseg_own_loader", default=False)


@contextlib.contextmanager
def own_loader():
    token = _OWN_LOADER.set(True)
    try:
        yield
    finally:
        _OWN_LOADER.reset(token)


class CustomCodeLayoutMixin:
    """Saves in the Hub's custom-code layout and loads it with this package's classes (no repository code runs).

    `DiffusionPipeline.from_pretrained` builds the pipeline from its components only, then records the folder as
    `_name_or_path`; a pipeline class that keeps more in the folder (an adapter) implements
    `_loaded_by_diffusers(name_or_path)`, called then, so that both loaders give the same pipeline."""

    def register_to_config(self, **kwargs) -> None:
        super().register_to_config(**kwargs)
        if "_name_or_path" in kwargs and not _OWN_LOADER.get() and hasattr(self, "_loaded_by_diffusers"):
            self._loaded_by_diffusers(kwargs["_name_or_path"])

    @classmethod
    def load_config(cls, *args, **kwargs):
        loaded = super().load_config(*args, **kwargs)
        if isinstance(loaded, tuple):  # (config, unused kwargs[, commit hash])
            return (from_custom_code_layout(loaded[0], cls), *loaded[1:])
        return from_custom_code_layout(loaded, cls)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """diffusers' `save_pretrained`, then the layout, written beside `save_directory` and moved in only once both
        succeeded (a failed save leaves no half-written pipeline; other files of the folder, e.g. a run's checkpoints,
        stay); `push_to_hub=True` uploads the folder once it is complete."""
        hub = pop_hub_kwargs(kwargs)
        with staged_folder(save_directory) as staging:
            super().save_pretrained(staging, **kwargs)
            write_custom_code_layout(staging, type(self))
        if push_to_hub:
            upload_saved_folder(save_directory, hub)


class staged_folder:
    """A temporary folder beside `target` whose entries replace `target`'s on a clean exit; removed on an error."""

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)

    def __enter__(self) -> str:
        import tempfile

        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.saving-", dir=self.target.parent))
        return str(self.staging)

    def __exit__(self, kind, error, traceback) -> bool:
        import shutil

        try:
            if kind is None:
                self.target.mkdir(exist_ok=True)
                for entry in sorted(self.staging.iterdir()):
                    destination = self.target / entry.name
                    if destination.is_dir() and not destination.is_symlink():
                        shutil.rmtree(destination)
                    elif destination.exists() or destination.is_symlink():
                        destination.unlink()
                    os.replace(entry, destination)
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
        return False


HUB_KWARGS = ("repo_id", "token", "private", "create_pr", "commit_message")


def pop_hub_kwargs(kwargs: dict) -> dict:
    """The Hub options of diffusers' `save_pretrained(..., push_to_hub=True, ...)`, removed from `kwargs`."""
    return {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}


def upload_saved_folder(folder: str | os.PathLike, hub: dict) -> None:
    """Uploads a saved folder to `hub["repo_id"]` (default: the folder's name), creating the repository if needed."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(hub.get("repo_id") or Path(folder).name, private=hub.get("private"), token=hub.get("token"),
                          exist_ok=True).repo_id
    upload_folder(repo_id=repo_id, folder_path=str(folder), token=hub.get("token"),
                  create_pr=hub.get("create_pr", False), commit_message=hub.get("commit_message"))
