"""The Hugging Face Hub side: resolving a local folder or a repo id, model and dataset cards, uploads.

Cards are built with `huggingface_hub.ModelCard` / `DatasetCard` from the templates in `model_cards/`, which ship
inside the package (a wheel install finds them too).
"""

from __future__ import annotations

import json
import os
import re
from importlib import resources
from pathlib import Path

from huggingface_hub import CommitInfo, DatasetCard, DatasetCardData, ModelCard, ModelCardData
from safetensors import safe_open

LIDC_ATTRIBUTION = (
    "LIDC-IDRI, distributed by The Cancer Imaging Archive under CC BY 3.0. Armato III, S. G., et al. (2011) \"The Lung "
    "Image Database Consortium (LIDC) and Image Database Resource Initiative (IDRI)\", Medical Physics 38(2); and "
    "Armato III, S. G., et al. (2015) Data from LIDC-IDRI, TCIA, doi:10.7937/K9/TCIA.2015.LO9QL9SX."
)
OWN_DATA_ATTRIBUTION = "Trained on the dataset named above: cite it, and follow its licence, as its authors ask."
# `library_name` must be one the Hub knows; this package is named in the tags.
CARD_TAGS = ["ambiseg-diffusers", "medical-imaging", "ambiguous-segmentation", "lidc-idri"]
DOWNLOAD_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download")
# What an adapter's base repo inherits from the call that loads the adapter: not `revision`, a commit of the adapter's
# own repo.
BASE_DOWNLOAD_KWARGS = ("cache_dir", "token", "local_files_only", "force_download")


def download_kwargs_of(kwargs: dict) -> dict:
    """Pops the Hub download options from `kwargs` (refusing `proxies`, which huggingface_hub >= 1.0 no longer
    takes: its HTTP client reads HTTP(S)_PROXY from the environment)."""
    if "proxies" in kwargs:
        raise ValueError("`proxies` is not supported (huggingface_hub >= 1.0 dropped it); set the HTTPS_PROXY "
                         "environment variable instead.")
    return {k: kwargs.pop(k) for k in DOWNLOAD_KWARGS if k in kwargs}
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def looks_local(name_or_path: str) -> bool:
    """True for what can only be a path: absolute, `./`, `../`, `~`, several `/`, or not a valid repo id."""
    return (
        os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1
        or "\\" in name_or_path or not _REPO_ID.match(name_or_path)
    )


def resolve_pretrained_path(name_or_path: str | os.PathLike, **download_kwargs) -> str:
    """A local folder as is, else the folder of a Hub snapshot (`snapshot_download`, honouring `HF_HUB_OFFLINE` and the
    cache). A missing path that can only be local is reported as such before any Hub call."""
    name = str(name_or_path)
    if os.path.isdir(name):
        return name
    if looks_local(name):
        raise FileNotFoundError(f"`pretrained_model_name_or_path` {name!r} is not a folder (resolved to "
                                f"{os.path.abspath(os.path.expanduser(name))!r}) and cannot be a Hub repo id.")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, **download_kwargs)
    except Exception as error:
        raise OSError(
            f"{name!r} is neither a local folder (none at {os.path.abspath(name)!r}) nor a Hub repo that could be "
            f"fetched: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from error


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


PACKAGE_PIPELINES = ("AmbiSegPipeline", "ProbUNetPipeline")


def check_pipeline_class(folder: str | os.PathLike, cls: type) -> None:
    """Before loading a pipeline folder with `cls`: a folder that holds another of this package's pipelines is refused
    naming the one it holds (diffusers would say only that the expected components were not passed). Subclasses of
    the class the folder names, and classes this package does not know, load as diffusers decides."""
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return
    name = json.loads(index.read_text()).get("_class_name")
    name = name[1] if isinstance(name, list) else name  # the Hub's custom-code layout: [module, class]
    if name in PACKAGE_PIPELINES and all(base.__name__ != name for base in cls.__mro__):
        raise ValueError(f"{folder} holds the pipeline {name} (its model_index.json), not {cls.__name__}: load it with "
                         f"`{name}.from_pretrained(...)`, or with `ambiseg_diffusers.load_pipeline(...)`, which reads "
                         "the class from the folder.")


def check_weight_files(folder: str | os.PathLike) -> None:
    """Before loading a pipeline folder: every model component (a sub-folder with `config.json`) must hold weights,
    and every safetensors file must be readable. Raises FileNotFoundError / OSError naming the component and the file.

    Which file of a component is loaded (a `variant`, `.bin` with `use_safetensors=False`) is diffusers' choice, made
    with its own messages: this check only reports what would otherwise fail obscurely (no weights at all, a truncated
    or corrupted file). `.bin` files are read by diffusers with `torch.load(weights_only=True)`, never unpickling code.
    """
    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        return  # not a pipeline folder; diffusers' own loader reports that
    for name, spec in json.loads(index.read_text()).items():
        component = folder / name
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None or not (component / "config.json").is_file():
            continue  # configuration entries, absent components, schedulers and tokenizers
        if not any(next(component.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
            found = sorted(p.name for p in component.iterdir())
            raise FileNotFoundError(f"component `{name}`: its weights are missing from {component} (found {found}).")
        for path in sorted(component.glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as weights:
                    weights.keys()
            except Exception as error:
                raise OSError(f"component `{name}`: {path} is not a readable safetensors file ({error}); the file is "
                              "corrupted or truncated: download or save it again.") from error


def check_finite_weights(pipe, folder: str | os.PathLike) -> None:
    """Raises `ValueError` naming the component and tensor when a loaded weight is NaN or inf (a corrupted file must
    not load silently and give empty masks)."""
    import torch

    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        for key, tensor in component.state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"component `{name}` loaded from {os.path.join(folder, name)} holds non-finite "
                                 f"weights (NaN or inf) in `{key}`: the file is corrupted; download or save it again.")


def _template(name: str) -> str:
    return resources.files("ambiseg_diffusers.model_cards").joinpath(name).read_text()


def model_card(
    template: str, repo_id: str, base_model: str | None = None, extra_tags: list[str] | None = None, lidc: bool = True,
    **values
) -> ModelCard:
    """A model card from `model_cards/<template>` (Jinja `{{ name }}` fields filled from `values`), with the Hub
    metadata: `library_name: diffusers`, this package in `tags`, `base_model` when given; `lidc`: the model was
    trained on LIDC-IDRI (its tag, and the attribution CC BY 3.0 requires, as `{{ attribution }}`)."""
    data = ModelCardData(
        library_name="diffusers", license="apache-2.0", pipeline_tag="image-segmentation", base_model=base_model,
        tags=[t for t in CARD_TAGS if lidc or t != "lidc-idri"] + (extra_tags or []),
    )
    return ModelCard.from_template(
        data, template_str=_template(template), repo_id=repo_id, base_model=base_model,
        attribution=LIDC_ATTRIBUTION if lidc else OWN_DATA_ATTRIBUTION, lidc=lidc, **values,
    )


def dataset_card(title: str, description: str, command: str, extra_tags: list[str] | None = None) -> DatasetCard:
    """A dataset card for data derived from LIDC-IDRI: licence CC BY 3.0 and the attribution it requires."""
    data = DatasetCardData(license="cc-by-3.0", tags=CARD_TAGS + (extra_tags or []), task_categories=["image-segmentation"])
    return DatasetCard.from_template(
        data, template_str=_template("dataset.md"), title=title, description=description, command=command,
        attribution=LIDC_ATTRIBUTION,
    )


def push_dataset_to_hub(dataset, repo_id: str, card: DatasetCard, token: str | None = None) -> None:
    """`Dataset(Dict).push_to_hub` followed by the card (the datasets library writes a bare one)."""
    dataset.push_to_hub(repo_id, token=token)
    card.push_to_hub(repo_id, repo_type="dataset", token=token)


def push_files_to_hub(folder: str | os.PathLike, repo_id: str, card: DatasetCard | ModelCard, patterns: list[str],
                      repo_type: str = "dataset", token: str | None = None, private: bool | None = None,
                      commit_message: str = "Upload with ambiseg-diffusers") -> CommitInfo:
    """Uploads the files of `folder` that match `patterns` (glob, top level) and `card` as README.md in one commit,
    so the repo never holds the data without its licence. Returns the `CommitInfo`; FileNotFoundError when nothing
    matches."""
    from huggingface_hub import CommitOperationAdd, create_commit, create_repo

    folder = Path(folder)
    matched = {path for pattern in patterns for path in folder.glob(pattern) if path.is_file()}
    files = sorted(matched - {folder / "README.md"})  # the card is the README
    if not files:
        raise FileNotFoundError(f"`folder` {str(folder)!r} holds no file matching {patterns}; nothing to upload.")
    repo_id = create_repo(repo_id, repo_type=repo_type, private=private, token=token, exist_ok=True).repo_id
    operations = [CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path)) for path in files]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode()))
    return create_commit(repo_id, operations, commit_message=commit_message, repo_type=repo_type, token=token)


def push_folder_to_hub(folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool | None = None,
                       commit_message: str = "Upload with ambiseg-diffusers") -> str:
    """Uploads a finished run folder (weights and card; never checkpoints, snapshots, logs or validation pictures)."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    return upload_folder(
        repo_id=repo_id, folder_path=str(Path(folder)), token=token, commit_message=commit_message,
        ignore_patterns=["checkpoint-*", ".checkpoint-*", "snapshots/*", "logs/*", "validation-*.png"],
    )
