"""The multi-rater segmentation dataset contract: every script and every evaluation reads data through `load_multirater`.

A multi-rater dataset is (docs/own_data.md):
- an image column: one image per row, any dtype PIL or numpy can hold (8- or 16-bit PNG, float arrays), one channel
  `(H, W)` or several `(H, W, C)` / `(C, H, W)`; values as stored (the pipeline normalises);
- a mask column: a *list* of rater masks per row, one or more, the count varying per row; each `(H, W)` like the
  image, binary: bool, 0/1 or 0/255 (read as 0/1); anything else is refused;
- an optional text column: one string per rater, or one per image (used for every rater).

`datasets` loads this from an imagefolder (`metadata.jsonl` lines with `file_name`, `mask_file_names` (a list, which
becomes the `mask` column of images) and `text`), from a `save_to_disk` folder or from a Hub dataset. The LIDC crops
(`lidc64`) are one source of the same contract: their columns `image`, `masks` (four rater slots; a slot without a
reading is an empty mask, LIDC's convention) and `prompts` are mapped and checked like any other dataset's.

Every row is checked when it is loaded, before the first training step; the first bad row is named with its index,
column and what was found. The rows come out in the form the library uses: `image` float32 `(H, W)` or `(C, H, W)`,
`masks` uint8 {0, 1} `(M, H, W)` with M the row's own rater count, `prompts` (M strings), `annotator_valid` (M
flags), `nodule_id` and `nodule_prompt` (the per-image text, None where the text is per rater).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Array2D, Array3D, Dataset, DatasetDict, Features, List, Value
from diffusers.utils import logging

from .image_processor import AmbiSegImageProcessor

logger = logging.get_logger(__name__)

IMAGE_COLUMN, MASK_COLUMN, CAPTION_COLUMN = "image", "mask", "text"
# The package's own LIDC rows (lidc.load_lidc64, scripts/prepare_lidc.py) hold the contract under these names.
LIDC_COLUMNS = {"image_column": "image", "mask_column": "masks", "caption_column": "prompts"}
# Where a dataset has no validation split, a seeded share of its training rows is held out as "selection" (choices
# and validation) and the rest is "train_fit" (as lidc64's training patients are split).
HOLDOUT_FRACTION = 0.1
HOLDOUT_SEED = 0
HOLDOUT_SPLITS = ("selection", "train_fit")
SOURCE_ROW = "__source_row"  # a carved split's row number in "train"
# Masks are resized with the pixel-centre rule bilinear images use (align_corners=False); torch's "nearest" picks
# floor(i * scale), which shifts a mask about half a target pixel up-left of its image.
MASK_RESIZE_MODE = "nearest-exact"


class DatasetContractError(ValueError):
    """A dataset that breaks the multi-rater contract (module docstring); the message names the row and column."""


# ----------------------------------------------------------------------------------------------- named sources
@dataclass(frozen=True)
class DataSource:
    """A data source with its own loader, on top of the contract: `load(split, data_dir, prompt_style)` gives its rows
    (columns as `LIDC_COLUMNS` name them); `restyle(rows, prompt_style)` rebuilds the prompts of stored rows of this
    source (from their ratings) in another style; `locate(data_dir)` (optional) the folder its files are read from,
    for records of what a run used."""

    load: Callable[[str, str | os.PathLike | None, str | None], Dataset]
    restyle: Callable[[Dataset, str], Dataset]
    locate: Callable[[str | os.PathLike | None], os.PathLike] | None = None


# The contract knows no source: a source registers itself here (lidc.py registers "lidc64" when imported, which
# the package's `__init__` does), so the arrows run from the sources to the contract only.
SOURCES: dict[str, DataSource] = {}


def register_source(name: str, source: DataSource) -> None:
    """Makes `name` a dataset name `load_multirater` and the data flags accept."""
    SOURCES[name] = source


def _source(name: str) -> DataSource:
    if name not in SOURCES:
        raise DatasetContractError(f"no data source named {name!r} is registered (import the module that registers "
                                   f"it, e.g. ambiseg_diffusers.lidc for 'lidc64'); registered: {sorted(SOURCES)}.")
    return SOURCES[name]


# ----------------------------------------------------------------------------------------------- loading
def load_multirater(
    dataset_name: str | None = "lidc64", split: str = "train", train_data_dir: str | os.PathLike | None = None,
    image_column: str = IMAGE_COLUMN, mask_column: str = MASK_COLUMN, caption_column: str | None = CAPTION_COLUMN,
    resolution: int | None = None, data_dir: str | os.PathLike | None = None, prompt_style: str | None = None,
    image_processor: AmbiSegImageProcessor | None = None,
) -> Dataset:
    """One split of a multi-rater dataset, every row checked, in the library's form (module docstring).

    `dataset_name`: "lidc64" (the shared LIDC crops, `lidc.load_lidc64`; `data_dir` and `prompt_style` apply), a Hub
    dataset id (offline: from the `datasets` cache), or a local folder (an imagefolder, or a `save_to_disk` folder).
    `train_data_dir`: an imagefolder (diffusers' flag; it wins over `dataset_name`). `split`: a split of the data;
    "selection" / "train_fit" carve a seeded 10% of "train" when the data has no such split. The three column names
    say where the contract's columns are; LIDC's own rows are mapped without them. `image_processor` (a model's:
    what training decided) resizes every image and mask to its size as it resizes them; `resolution` stands for a
    default processor of that size (images bilinear, masks nearest-exact); without either, all rows must share one
    size.
    Raises `DatasetContractError` naming the first bad row, a missing column (with the columns there are) or split.
    """
    if names_lidc64(dataset_name, train_data_dir):
        rows, source = _source("lidc64").load(split, data_dir, prompt_style), "lidc64"
    else:
        source = str(train_data_dir if train_data_dir is not None else dataset_name)
        rows = pick_split(_load_raw(dataset_name, train_data_dir), split, source)
        if prompt_style not in (None, "free") and is_lidc_rows(rows) and "ratings" in rows.column_names:
            rows = _source("lidc64").restyle(rows, prompt_style)  # a LIDC folder written by scripts/prepare_lidc.py
    columns = dict(image_column=image_column, mask_column=mask_column, caption_column=caption_column)
    if is_lidc_rows(rows) and mask_column not in rows.column_names:
        columns = LIDC_COLUMNS
    return to_contract(rows, **columns, resolution=resolution, image_processor=image_processor,
                       source=f"{source} `{split}`")


def _load_raw(dataset_name: str | None, train_data_dir: str | os.PathLike | None) -> Dataset | DatasetDict:
    from datasets import load_dataset, load_from_disk

    if train_data_dir is not None:
        if not Path(train_data_dir).is_dir():
            raise FileNotFoundError(f"`--train_data_dir` {str(train_data_dir)!r} is not a folder.")
        return load_dataset("imagefolder", data_dir=str(train_data_dir))
    folder = Path(dataset_name)
    if folder.is_dir():
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            return load_from_disk(str(folder))
        return load_dataset(str(folder))  # an imagefolder (or any folder `datasets` can read)
    return load_dataset(dataset_name)  # a Hub id: with HF_HUB_OFFLINE=1 from the datasets cache


def pick_split(data: Dataset | DatasetDict, split: str, source: str = "the dataset") -> Dataset:
    """`split` of `data`; "selection" and "train_fit" are carved from "train" (a seeded `HOLDOUT_FRACTION` of its
    rows, and the rest) when `data` has no split of that name."""
    if isinstance(data, Dataset):
        data = DatasetDict({"train": data})
    if split in data:
        return data[split]
    if split in HOLDOUT_SPLITS and "train" in data:
        train = data["train"]
        groups = train["patient_id"] if "patient_id" in train.column_names else range(len(train))
        held = holdout_rows(groups)
        keep = held if split == "selection" else sorted(set(range(len(train))) - set(held))
        # each row's place in "train", for errors that name a row (to_contract drops the column)
        return train.add_column(SOURCE_ROW, list(range(len(train)))).select(keep)
    raise DatasetContractError(f"{source} has no split {split!r}; it has {sorted(data)} (and 'selection' / "
                               f"'train_fit', a seeded {HOLDOUT_FRACTION:.0%} of 'train' and the rest).")


def holdout_rows(groups) -> list[int]:
    """The rows held out as "selection": a seeded `HOLDOUT_FRACTION` (at least one) of the distinct `groups`, one
    entry per row (a dataset's `patient_id` column, so no patient is on both sides; else the row indices)."""
    groups = [str(g) for g in groups]
    unique = sorted(set(groups))
    count = max(1, round(len(unique) * HOLDOUT_FRACTION))
    chosen = {unique[i] for i in np.random.default_rng(HOLDOUT_SEED).permutation(len(unique))[:count]}
    return [i for i, g in enumerate(groups) if g in chosen]


def is_lidc_rows(rows: Dataset) -> bool:
    """The package's own LIDC rows (`annotator_valid` is written only by lidc.py and scripts/prepare_lidc.py)."""
    return {"masks", "prompts", "annotator_valid"} <= set(rows.column_names)


def names_lidc64(dataset_name: str | None, train_data_dir) -> bool:
    """The data flags name the shared LIDC crops (their loader, prompt styles, splits and card apply)."""
    return train_data_dir is None and dataset_name in (None, "lidc64")


def _data_name(dataset_name: str | None, train_data_dir) -> str:
    """The data the flags name, for messages: --train_data_dir wins over --dataset_name (as it does at loading)."""
    return str(train_data_dir) if train_data_dir is not None else str(dataset_name)


def _split_names(dataset_name: str | None, train_data_dir) -> list[str]:
    data = _load_raw(dataset_name, train_data_dir)
    return sorted(data) if isinstance(data, DatasetDict) else ["train"]


# Splits that hold another's rows (lidc64 and the carved holdout of any data): "selection" and "train_fit" are carved
# from "train" (lidc64: from train_a + train_b), "mini" is one slice per nodule of "validate".
_CONTAINED = {"train": {"selection", "train_fit", "train_a", "train_b"}, "train_a": {"selection", "train_fit"},
              "train_b": {"selection", "train_fit"}, "validate": {"mini"}}


def splits_overlap(first: str, second: str) -> bool:
    """Whether two splits share rows: the same split, or one carved from the other (`_CONTAINED`)."""
    return first == second or second in _CONTAINED.get(first, ()) or first in _CONTAINED.get(second, ())


def _check_disjoint(train_split: str, validation_split: str) -> tuple[str, str]:
    """Refuses a training split that holds the rows validation is carved from (`--train_split train` with
    "selection"): those validation numbers, and any choice made on them, would be on trained rows. The same split
    named twice stays allowed (a smoke test's `mini` / `mini`)."""
    if train_split != validation_split and splits_overlap(train_split, validation_split):
        fit = "train_fit" if validation_split == "selection" else None
        raise DatasetContractError(
            f"--train_split {train_split!r} holds the rows of --validation_split {validation_split!r}, so validation "
            f"(and the choices made on it) would see training rows: "
            + (f"pass --train_split {fit} (train without the selection rows)" if fit else "pass disjoint splits")
            + " or a --validation_split of its own (the data's validation split).")
    return train_split, validation_split


def default_splits(dataset_name: str | None, train_data_dir, train_split: str | None,
                   validation_split: str | None) -> tuple[str, str]:
    """The training and validation splits to use when the flags leave them unset.

    lidc64: train on "train", validate on "mini". Other data: validate on its "validation" split (or "valid",
    "val"; never "test", which reports); without one, on "selection" (a seeded 10% of "train", by `patient_id` where
    the data has one) and train on "train_fit" (the rest), so validation never sees a training row. Validating on
    "selection" always trains on "train_fit" unless a training split is named; a named training split that holds
    the validation rows ("train" with "selection") is refused (`DatasetContractError`), never silently replaced."""
    fit = "train_fit" if validation_split == "selection" else "train"
    if names_lidc64(dataset_name, train_data_dir):
        return _check_disjoint(train_split or fit, validation_split or "mini")
    if validation_split is not None:
        return _check_disjoint(train_split or fit, validation_split)
    names = _split_names(dataset_name, train_data_dir)
    for name in ("validation", "valid", "val"):
        if name in names:
            return train_split or "train", name
    if train_split is not None:
        return _check_disjoint(train_split, "selection")
    logger.warning(f"no validation split in {_data_name(dataset_name, train_data_dir)} (splits: {names}): validating on "
                   f"'selection', a seeded {HOLDOUT_FRACTION:.0%} of 'train', and training on 'train_fit', the rest")
    return "train_fit", "selection"


def distillation_splits(dataset_name: str | None, train_data_dir, train_split: str | None,
                        validation_split: str | None) -> tuple[str, str]:
    """The training and validation splits of a script that goes on from a trained model (distillation): lidc64
    "train_fit" and "selection"; other data the splits the model's own training used (`default_splits`)."""
    if names_lidc64(dataset_name, train_data_dir):
        return _check_disjoint(train_split or "train_fit", validation_split or "selection")
    return default_splits(dataset_name, train_data_dir, train_split, validation_split)


def selection_split(dataset_name: str | None, train_data_dir) -> str:
    """The split choices (checkpoint, knob) are made on when none is named: lidc64 "selection" (training patients
    held out of training); other data the split training validates on."""
    return distillation_splits(dataset_name, train_data_dir, None, None)[1]


def check_choosing_split(dataset_name: str | None, train_data_dir, split: str) -> None:
    """A split choices are made on: one that reports ("validate", "test", lidc64's "mini", a subset of "validate")
    is refused; the split evaluation reports on by default (other data without a test split: its validation split)
    is allowed with a warning."""
    mini = split == "mini" and names_lidc64(dataset_name, train_data_dir)
    if split in ("validate", "test") or mini:
        within = " (a subset of 'validate')" if mini else ""
        raise DatasetContractError(f"split {split!r}{within} reports, it never chooses: choose on "
                                   f"{selection_split(dataset_name, train_data_dir)!r}")
    if not names_lidc64(dataset_name, train_data_dir) and split == evaluation_split(dataset_name, train_data_dir):
        logger.warning(f"choosing on {split!r}, the split results are reported on ({_data_name(dataset_name, train_data_dir)} "
                       "has no test split): report on other data, or train with --validation_split selection (a "
                       "held-out 10% of train) and choose on selection")


def evaluation_split(dataset_name: str | None, train_data_dir) -> str:
    """The split results are reported on when none is named: lidc64 "validate"; other data its "test" split, else
    "validation" (or "valid", "val")."""
    if names_lidc64(dataset_name, train_data_dir):
        return "validate"
    names = _split_names(dataset_name, train_data_dir)
    for name in ("test", "validation", "valid", "val"):
        if name in names:
            return name
    raise DatasetContractError(f"{_data_name(dataset_name, train_data_dir)} has no test or validation split (splits: {names}); "
                               "name the split to evaluate with --split.")


# ----------------------------------------------------------------------------------------------- the contract
def to_contract(rows: Dataset, image_column: str = IMAGE_COLUMN, mask_column: str = MASK_COLUMN,
                caption_column: str | None = CAPTION_COLUMN, resolution: int | None = None,
                source: str = "the dataset", image_processor: AmbiSegImageProcessor | None = None) -> Dataset:
    """`rows` checked row by row and mapped onto the library's columns (module docstring), resized by
    `image_processor` (or a default one of size `resolution`) where given. A missing caption column trains and
    evaluates on the empty prompt, and says so; a missing image or mask column is an error. Errors name the row, its
    file (where the data has files) and, in a carved split, its row in "train"; an image of one value is warned about
    by name (it trains on nothing)."""
    have = [c for c in rows.column_names if c != SOURCE_ROW]
    for flag, name in (("--image_column", image_column), ("--mask_column", mask_column)):
        if name not in have:
            raise DatasetContractError(f"{source} has no column {name!r} ({flag}); its columns are {have}.")
    if caption_column is not None and caption_column not in have:
        if caption_column != CAPTION_COLUMN:
            raise DatasetContractError(f"{source} has no column {caption_column!r} (--caption_column); its columns "
                                       f"are {have}.")
        logger.warning(f"{source} has no text column {CAPTION_COLUMN!r} (columns: {have}): every prompt is the empty "
                       "string; name the text column with --caption_column")
        caption_column = None
    if resolution is not None and resolution < 2:
        raise DatasetContractError(f"`resolution` must be at least 2 pixels, got {resolution}.")
    if len(rows) == 0:
        raise DatasetContractError(f"{source} has no rows.")
    nesting = mask_nesting(rows.features[mask_column])
    if nesting not in (2, 3):
        raise DatasetContractError(
            f"`{mask_column}` ({mask_column!r}, --mask_column) holds {rows.features[mask_column]}; expected a list of "
            "rater masks per row (images or 2-D arrays), or one mask per row.")
    single = nesting == 2  # one mask per row: a colour mask must not become a list of raters
    processor = image_processor or (AmbiSegImageProcessor(size=resolution) if resolution else None)
    if processor is not None and not processor.config.do_resize:
        processor = None
    size = (processor.config.size,) * 2 if processor is not None else None
    shape = {}  # row 0's (H, W) and channel count, which every row must share

    def convert(batch: dict, indices: list[int]) -> dict:
        out = {"image": [], "masks": [], "prompts": [], "annotator_valid": [], "nodule_id": [], "nodule_prompt": []}
        for j, index in enumerate(indices):
            try:
                convert_row(batch, j, index, out)
            except DatasetContractError as error:  # the row's file and source row, looked up only now
                raise DatasetContractError(str(error).replace(f"row {index}", describe_row(rows, index, image_column),
                                                              1)) from None
        return out

    def convert_row(batch: dict, j: int, index: int, out: dict) -> None:
        masks = _masks(batch[mask_column][j], index, mask_column, single)
        image = _channels_first(_image_array(batch[image_column][j], index, image_column), masks.shape[1:],
                                index, image_column)
        if size is not None and image.shape[-2:] != size:
            image, masks = processor.resize_pair(image, masks)
            shape["resized"] = shape.get("resized", 0) + 1
        shape.setdefault("hw", image.shape[-2:])
        shape.setdefault("channels", 1 if image.ndim == 2 else image.shape[0])
        if image.shape[-2:] != shape["hw"] or (1 if image.ndim == 2 else image.shape[0]) != shape["channels"]:
            raise DatasetContractError(
                f"`{image_column}` row {index} is {tuple(image.shape)}, row 0 is {tuple(shape['hw'])} with "
                f"{shape['channels']} channel(s); every row must share one size and channel count (pass "
                "--resolution to resize them).")
        texts = _texts(batch[caption_column][j] if caption_column else None, len(masks), index, caption_column)
        out["image"].append(image.astype(np.float32))
        out["masks"].append(masks)
        out["prompts"].append(texts)
        # LIDC's slots without a reading stay marked (their empty masks are annotations, their prompts not a
        # rater's); every row of other data is its own nodule for the largest-consensus view
        out["annotator_valid"].append(batch["annotator_valid"][j].tolist() if "annotator_valid" in batch
                                      else [True] * len(masks))
        out["nodule_id"].append(str(batch["nodule_id"][j]) if "nodule_id" in batch else str(index))
        per_image = caption_column is None or isinstance(batch[caption_column][j], str) or len(set(texts)) == 1
        out["nodule_prompt"].append(
            batch["nodule_prompt"][j] if "nodule_prompt" in batch else (texts[0] if per_image else None))
        if image.size and image.min() == image.max():
            shape.setdefault("constant", []).append(index)

    # The output's fixed image shape is row 0's.
    with _naming_unreadable_files(rows, (image_column, mask_column)):
        probe = convert({k: v[:1] for k, v in rows.with_format("numpy")[:1].items()}, [0])
    shape.pop("resized", None)  # counted again by the map
    shape.pop("constant", None)
    image_shape = probe["image"][0].shape
    features = Features({
        "image": Array2D(image_shape, "float32") if len(image_shape) == 2 else Array3D(image_shape, "float32"),
        "masks": Array3D((None, *image_shape[-2:]), "uint8"),
        "prompts": List(Value("string")),
        "annotator_valid": List(Value("bool")),
        "nodule_id": Value("string"),
        "nodule_prompt": Value("string"),
    })
    # LIDC's own columns stay (ratings re-prompt, sizes, ids); other data keeps the contract's columns only
    keep = [c for c in ("diameter_mm", "volume_mm3", "slice_diameter_mm", "pixel_spacing_mm", "ratings", "patient_id",
                        "slice") if c in have and is_lidc_rows(rows)]
    with _naming_unreadable_files(rows, (image_column, mask_column)):
        converted = rows.with_format("numpy").map(
            convert, batched=True, batch_size=64, with_indices=True, features=Features({**features, **{
                c: rows.features[c] for c in keep}}), remove_columns=[c for c in rows.column_names if c not in keep],
            desc=f"checking {source}", keep_in_memory=True,  # no cache file beside the user's data, none per process
        )
    if shape.get("constant"):
        named = ", ".join(describe_row(rows, i, image_column) for i in shape["constant"][:5])
        logger.warning(f"{source}: {len(shape['constant'])} image(s) hold a single value ({named}"
                       f"{', ...' if len(shape['constant']) > 5 else ''}): blank or failed exports, which give the "
                       "model nothing to segment from; check or drop them")
    if shape.get("resized"):
        logger.warning(f"{source}: {shape['resized']} of {len(rows)} rows resized to {size[0]}x{size[1]} (images "
                       f"{processor.config.resample}, masks {processor.config.mask_resample})")
    return converted.with_format(None)


def _file_name(rows: Dataset, index: int, column: str) -> str | None:
    """The file a row's image was read from (an imagefolder's `file_name`), where the data keeps one."""
    from datasets import Image

    if not isinstance(rows.features.get(column), Image):
        return None
    path = (rows.cast_column(column, Image(decode=False))[index][column] or {}).get("path")
    return Path(path).name if path else None


def describe_row(rows: Dataset, index: int, image_column: str = IMAGE_COLUMN) -> str:
    """"row 17 (img_020.png)", "row 0 (img_005.png; row 4 of `train`)": a row as the user can find it in their files,
    not only by its place in a carved split."""
    details = [_file_name(rows, index, image_column)]
    if SOURCE_ROW in rows.column_names:
        details.append(f"row {rows[index][SOURCE_ROW]} of `train`")
    details = [d for d in details if d]
    return f"row {index}" + (f" ({'; '.join(details)})" if details else "")


class _naming_unreadable_files:
    """Turns an image file that cannot be decoded (`OSError: image file is truncated`, which names nothing) into a
    `DatasetContractError` naming its column, row and file."""

    def __init__(self, rows: Dataset, columns: tuple[str, ...]):
        self.rows, self.columns = rows, columns

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is None or not issubclass(kind, (OSError, SyntaxError)) or isinstance(error, DatasetContractError):
            return False  # PIL raises SyntaxError for some broken PNG chunks
        found = _first_unreadable(self.rows, self.columns)
        if found is None:
            return False
        column, index, name, reason = found
        raise DatasetContractError(f"`{column}` {describe_row(self.rows, index, self.columns[0])} cannot be read: "
                                   f"{name or 'its image'} ({reason}); re-export that file.") from error


def _first_unreadable(rows: Dataset, columns: tuple[str, ...]) -> tuple[str, int, str | None, str] | None:
    """(column, row, file name, reason) of the first image that PIL cannot decode, else None."""
    import io

    import PIL.Image
    from datasets import Image

    for column in columns:
        feature = rows.features.get(column)
        inner = feature if isinstance(feature, Image) else getattr(feature, "feature", None)
        if not isinstance(inner, Image):
            continue
        raw = rows.cast_column(column, Image(decode=False) if inner is feature else type(feature)(Image(decode=False)))
        for index, value in enumerate(raw[column]):
            for item in value if isinstance(value, list) else [value]:
                try:
                    with PIL.Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]) as image:
                        image.load()
                except (OSError, SyntaxError) as error:
                    path = item.get("path")
                    return column, index, Path(path).name if path else None, f"{type(error).__name__}: {error}"
    return None


def _image_array(value, index: int, column: str) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise DatasetContractError(f"`{column}` row {index} holds {array.dtype} data; expected an image (a PIL image "
                                   "or a numeric array).")
    if np.iscomplexobj(array) or array.ndim not in (2, 3) or 0 in array.shape:
        raise DatasetContractError(f"`{column}` row {index} has shape {array.shape}; expected an image (H, W), "
                                   "(H, W, C) or (C, H, W).")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DatasetContractError(f"`{column}` row {index} holds NaN or inf values.")
    return array


def _channels_first(image: np.ndarray, mask_hw: tuple, index: int, column: str) -> np.ndarray:
    """(H, W) stays; (H, W, C) and (C, H, W) -> (C, H, W), told apart by the masks' (H, W)."""
    if image.ndim == 2 and image.shape == mask_hw:
        return image
    if image.ndim == 3 and image.shape[:2] == mask_hw:
        image = np.moveaxis(image, -1, 0)
    elif not (image.ndim == 3 and image.shape[1:] == mask_hw):
        raise DatasetContractError(f"`{column}` row {index} has shape {image.shape} but its masks are "
                                   f"{'x'.join(map(str, mask_hw))}; image and masks must share height and width.")
    return image[0] if image.shape[0] == 1 else image


def mask_nesting(feature) -> int:
    """How many axes a mask column's feature nests: 2 for one mask per row (an image, a 2-D array), 3 for a list."""
    from datasets import Array2D as A2, Array3D as A3, Image, LargeList, Sequence

    if isinstance(feature, (Image, A2)):
        return 2
    if isinstance(feature, A3):
        return 3
    if isinstance(feature, (List, LargeList, Sequence, list)):
        inner = feature[0] if isinstance(feature, list) else feature.feature
        return 1 + mask_nesting(inner)
    return 0


def _masks(value, index: int, column: str, single: bool) -> np.ndarray:
    """A row's rater masks (`single`: the column holds one mask per row) -> uint8 {0, 1} `(M, H, W)`."""
    raters = [value] if single else list(value)
    if len(raters) == 0:
        raise DatasetContractError(f"`{column}` row {index} holds no rater mask; expected a list of one or more.")
    out = []
    for rater, mask in enumerate(raters):
        mask = np.asarray(mask)
        if mask.ndim != 2:
            raise DatasetContractError(
                f"`{column}` row {index} rater {rater} has shape {mask.shape}; expected one (H, W) binary mask per "
                "rater (save masks as single-channel PNGs).")
        if mask.dtype == bool:
            out.append(mask.astype(np.uint8))
            continue
        values = set(np.unique(mask).tolist()) if np.issubdtype(mask.dtype, np.number) else {"non-numeric"}
        if values <= {0, 1}:
            out.append(mask.astype(np.uint8))
        elif values <= {0, 255}:
            out.append((mask == 255).astype(np.uint8))
        else:
            shown = sorted(values, key=str)[:6]
            raise DatasetContractError(
                f"`{column}` row {index} rater {rater} holds values {{{', '.join(map(_number, shown))}}}"
                f"{' ...' if len(values) > 6 else ''}; expected a binary mask (bool, 0/1 or 0/255).")
    shapes = {m.shape for m in out}
    if len(shapes) != 1:
        raise DatasetContractError(f"`{column}` row {index}: its rater masks differ in size {sorted(shapes)}.")
    return np.stack(out)


def _number(value) -> str:
    return str(int(value)) if isinstance(value, (int, np.integer)) or float(value).is_integer() else f"{value:g}"


def _texts(value, num_raters: int, index: int, column: str | None) -> list[str]:
    """One prompt per rater from one string per rater or one per image ("" without a text column)."""
    if column is None:
        return [""] * num_raters
    if isinstance(value, str):
        return [value] * num_raters
    texts = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    if not all(isinstance(t, str) for t in texts):
        raise DatasetContractError(f"`{column}` row {index} holds {[type(t).__name__ for t in texts]}; expected a "
                                   "string or a list of strings.")
    if len(texts) == 1:
        return texts * num_raters
    if len(texts) != num_raters:
        raise DatasetContractError(f"`{column}` row {index} holds {len(texts)} texts for {num_raters} rater masks; "
                                   "expected one per rater or one per image.")
    return texts


def resize(image: np.ndarray, masks: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """An image `(H, W)` / `(C, H, W)` resized bilinearly and its masks `(M, H, W)` by nearest neighbour to `size`,
    both sampled at the same pixel centres (`MASK_RESIZE_MODE`), so a mask stays on its image. (Loading resizes
    with the model's `AmbiSegImageProcessor.resize_pair`, the same rule.)"""
    import torch

    picture = torch.as_tensor(image, dtype=torch.float32)
    picture = picture[None, None] if picture.ndim == 2 else picture[None]
    picture = torch.nn.functional.interpolate(picture, size=size, mode="bilinear", align_corners=False)[0]
    raters = torch.nn.functional.interpolate(torch.as_tensor(masks, dtype=torch.float32)[None], size=size,
                                             mode=MASK_RESIZE_MODE)[0]
    return (picture[0] if image.ndim == 2 else picture).numpy(), raters.to(torch.uint8).numpy()


def rater_masks(rows) -> list[np.ndarray]:
    """Each row's rater masks as bool `(M_i, H, W)`: a list, since rows differ in rater count."""
    return [np.asarray(m).astype(bool) for m in rows["masks"]]


# ----------------------------------------------------------------------------------------------- flags
def add_data_arguments(parser, resolution: bool = True) -> None:
    """diffusers' data flags (train_text_to_image.py) plus the contract's mask column, on a parser or argument group.
    `resolution=False` for scripts whose recipe already has a `--resolution`."""
    parser.add_argument("--dataset_name", "--dataset", dest="dataset_name", default="lidc64",
                        help="'lidc64' (the shared LIDC crops), a Hub dataset id (offline: from the datasets cache) "
                             "or a local folder (an imagefolder or a save_to_disk folder); docs/own_data.md")
    parser.add_argument("--train_data_dir", default=None,
                        help="an imagefolder (metadata.jsonl with file_name, mask_file_names, text); wins over "
                             "--dataset_name")
    parser.add_argument("--data_dir", default=None, help="lidc64 only: its folder or the folder above it (default: "
                        "$AMBISEG_DATA_DIR, else ../shared/data)")
    parser.add_argument("--image_column", default=IMAGE_COLUMN, help="the column of images")
    parser.add_argument("--mask_column", default=MASK_COLUMN, help="the column of rater-mask lists (binary: bool, 0/1 "
                        "or 0/255)")
    parser.add_argument("--caption_column", default=CAPTION_COLUMN,
                        help="the column of texts, one per rater or one per image (optional: without it, empty prompts)")
    if resolution:
        parser.add_argument("--resolution", type=int, default=None,
                            help="resize images (bilinear) and masks (nearest-exact) to this size; default: as stored")


DATA_FLAGS = ("dataset_name", "train_data_dir", "data_dir", "image_column", "mask_column", "caption_column",
              "resolution")


def data_flags(args) -> list[str]:
    """The flags of `add_data_arguments` that `args` sets to other than their defaults, as a command line, for a
    script that runs another one on the same data."""
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    defaults = vars(parser.parse_args([]))
    flags = []
    for name in DATA_FLAGS:
        value = getattr(args, name, None)
        if value is not None and value != defaults[name]:
            flags += [f"--{name}", str(value)]
    return flags


def load_from_args(args, split: str, prompt_style: str | None = None, resolution: int | None = None,
                   image_processor: AmbiSegImageProcessor | None = None) -> Dataset:
    """`load_multirater` with the flags of `add_data_arguments`, resized by `image_processor` (a model's, e.g.
    `model_image_processor(pipe)`) or to `resolution`, unless the flags name a `--resolution`."""
    flag = getattr(args, "resolution", None)
    return load_multirater(
        args.dataset_name, split, train_data_dir=args.train_data_dir, image_column=args.image_column,
        mask_column=args.mask_column, caption_column=args.caption_column, resolution=flag or resolution,
        data_dir=args.data_dir, prompt_style=prompt_style, image_processor=None if flag else image_processor,
    )


def image_channels(rows: Dataset) -> int:
    """The channels of a checked dataset's images (row 0's: `to_contract` makes every row share them)."""
    image = np.asarray(rows[0]["image"])
    return 1 if image.ndim == 2 else image.shape[0]


def model_image_processor(pipeline) -> AmbiSegImageProcessor | None:
    """A pipeline's image processor (what its training decided): data of another size is resized by it, as training
    resized it. None for a pipeline without one and without a UNet to build it from."""
    processor = getattr(pipeline, "image_processor", None)
    model = getattr(pipeline, "unet", None) or getattr(pipeline, "prob_unet", None)
    if processor is None and model is not None:
        processor = AmbiSegImageProcessor.for_unet(model)
    return processor


# a private UNet config entry: it travels with the weights (Hub, DPO, distillation)
TRAINING_DATA_KEY = "_training_data"


def record_training_text(unet, rows: Dataset, caption_column: str | None, use_text: bool = True) -> None:
    """Records on the UNet the text column the model was trained on (None: it saw only empty prompts), so that
    sampling it without that text is refused rather than silently done (`check_prompts_for_model`)."""
    has_text = use_text and caption_column is not None and any(p for row in rows["prompts"] for p in row)
    unet.register_to_config(**{TRAINING_DATA_KEY: {"caption_column": caption_column if has_text else None}})


def trained_caption_column(pipeline) -> str | None:
    """The text column recorded at training (`record_training_text`); None for a model trained without text, one
    saved before the record existed, or a model that takes no text (the Probabilistic U-Net)."""
    unet = getattr(pipeline, "unet", None)
    record = (unet.config.get(TRAINING_DATA_KEY) or {}) if unet is not None else {}
    return record.get("caption_column")


def check_prompts_for_model(pipeline, rows: Dataset, prompts: str = "annotator",
                            opt_in: str | None = "--prompts none") -> None:
    """Refuses to sample a text-trained model on empty prompts (data without its text column) unless `prompts` is
    "none", the explicit choice of empty prompts (`opt_in`: the flag that says so, named in the error)."""
    column = trained_caption_column(pipeline)
    if column is None or prompts == "none" or any(p for row in rows["prompts"] for p in row):
        return
    raise DatasetContractError(
        f"the model was trained on text (the column {column!r}), but every prompt of this data is empty (no text "
        f"column; --caption_column names it): pass --caption_column {column} (or the column holding that text)"
        + (f", or {opt_in} to sample on empty prompts on purpose." if opt_in else "."))


def model_image_shape(pipeline) -> str:
    """The shape of an image the pipeline's UNet takes (at its image processor's size), as a card writes it: "64, 64"
    or "3, 64, 64"."""
    size, channels = int(model_image_processor(pipeline).config.size), int(pipeline.unet.image_channels)
    return ", ".join(map(str, ((channels,) if channels > 1 else ()) + (size, size)))


def stored_image_sizes(args, split: str) -> list[str]:
    """The sizes ("HxW") a split's images are stored at, before any --resolution: every row's where the images are
    files (their headers only), else row 0's."""
    import io

    import PIL.Image
    from datasets import Image

    if is_lidc(args):
        return []
    rows = pick_split(_load_raw(args.dataset_name, args.train_data_dir), split)
    feature = rows.features.get(args.image_column)
    if isinstance(feature, Image):
        sizes = set()
        for item in rows.cast_column(args.image_column, Image(decode=False))[args.image_column]:
            with PIL.Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]) as image:
                sizes.add((image.height, image.width))
    else:
        masks = np.asarray(rows[0][args.mask_column])
        sizes = {tuple(masks.shape[-2:])}
    return [f"{h}x{w}" for h, w in sorted(sizes)]


def is_lidc(args) -> bool:
    """`names_lidc64` of a script's data flags."""
    return names_lidc64(args.dataset_name, args.train_data_dir)


def data_source(args) -> str:
    """Where a script's data flags resolve to: the lidc64 folder in use, an absolute local folder, or a Hub id."""
    if is_lidc(args):
        locate = _source("lidc64").locate
        return str(Path(locate(args.data_dir)).resolve()) if locate is not None else "lidc64"
    name = args.train_data_dir if args.train_data_dir is not None else args.dataset_name
    return str(Path(name).resolve()) if Path(str(name)).is_dir() else str(name)


def dataset_label(args) -> str:
    """The dataset's name for cards and logs: a Hub id as it is, a local folder by its own name (not its path)."""
    name = args.train_data_dir if args.train_data_dir is not None else args.dataset_name
    return Path(name).resolve().name if Path(str(name)).is_dir() else str(name)
