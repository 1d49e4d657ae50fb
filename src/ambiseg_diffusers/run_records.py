"""What makes a resumable result folder trustworthy: the arguments that define its results, recorded on the first
run and compared on every resume (evaluation, preference building, preprocessing)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

RECORD_FILE = "run_arguments.json"


def pipeline_fingerprint(pipeline) -> str:
    """sha256 of every weight (LoRA adapters included), the scheduler config and the pipeline config: the same model
    wherever it is loaded from, another one as soon as one value differs."""
    digest = hashlib.sha256()
    for name, component in sorted(pipeline.components.items()):
        if isinstance(component, torch.nn.Module):
            for key, tensor in sorted(component.state_dict().items()):
                digest.update(f"{name}.{key}".encode())
                digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    scheduler = getattr(pipeline, "scheduler", None)  # a Probabilistic U-Net has none
    if scheduler is not None:
        digest.update(json.dumps(dict(scheduler.config), sort_keys=True, default=str).encode())
    digest.update(json.dumps({k: v for k, v in pipeline.config.items() if not k.startswith("_")}, sort_keys=True,
                             default=str).encode())
    return digest.hexdigest()


def dataset_fingerprint(rows) -> str:
    """sha256 of every checked row's image, rater masks, prompts and reading flags (`data.load_multirater`'s
    form): the data a result was computed on, whatever path or flags named it, at the size it was resized to."""
    digest = hashlib.sha256()
    rows = rows.with_format("numpy")  # arrays, not nested Python lists
    for start in range(0, len(rows), 256):
        batch = rows[start : start + 256]
        for image, masks, prompts, valid in zip(batch["image"], batch["masks"], batch["prompts"],
                                                batch["annotator_valid"]):
            for array in (np.asarray(image, np.float32), np.asarray(masks, np.uint8)):
                digest.update(str(array.shape).encode())
                digest.update(np.ascontiguousarray(array).tobytes())
            digest.update(json.dumps([list(prompts), [bool(v) for v in valid]]).encode())
    return digest.hexdigest()


def data_arguments(args, rows, split: str) -> dict:
    """What decides a result about its data, for a resume record: every data flag as given, `split`, where the data
    resolves to (an absolute folder or a Hub id; relative paths and $AMBISEG_DATA_DIR name other folders from other
    places), the rows' size and a fingerprint of their contents (`dataset_fingerprint`)."""
    from .data import DATA_FLAGS, data_source

    return {**{f"data.{name}": getattr(args, name, None) for name in DATA_FLAGS}, "data.split": split,
            "data.source": data_source(args), "data.image_shape": list(np.asarray(rows[0]["image"]).shape),
            "data.rows": len(rows), "data.sha256": dataset_fingerprint(rows)}


def _remove(paths) -> None:
    for path in paths:
        path = Path(path)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def check_resumable(
    folder: str | os.PathLike, arguments: dict, partial_results=(), overwrite: bool = False, write: bool = True
) -> None:
    """Guards a resumable run that keeps its partial results (`partial_results`, paths) beside `folder`.

    The first run records `arguments` in `folder/run_arguments.json`. A later run into the same folder resumes only
    when its arguments are equal; otherwise it raises a ValueError listing what differs, as it does for partial
    results with no record. `overwrite=True` deletes the partial results and the record and starts over.
    `write=False` only checks (the other processes of a multi-process run; the main one writes).
    """
    folder = Path(folder)
    record = folder / RECORD_FILE
    arguments = json.loads(json.dumps(arguments, default=str))
    existing = [p for p in partial_results if Path(p).exists()]
    if overwrite:
        if write:
            _remove(existing + [record])
    elif record.exists():
        previous = json.loads(record.read_text())
        changed = sorted(k for k in set(previous) | set(arguments) if previous.get(k) != arguments.get(k))
        if changed:
            details = "; ".join(f"{k}: {previous.get(k)!r} -> {arguments.get(k)!r}" for k in changed)
            raise ValueError(f"{folder} holds results made with other arguments ({details}). Use another output "
                             "folder, or pass --overwrite to delete them and start over.")
    elif existing:
        raise ValueError(f"{folder} holds partial results ({', '.join(Path(p).name for p in existing)}) with no record "
                         "of the arguments that made them. Use another output folder, or pass --overwrite.")
    if not write:
        return
    folder.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(arguments, indent=2, sort_keys=True))
    os.replace(tmp, record)
