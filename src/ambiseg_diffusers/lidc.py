"""LIDC-IDRI as 🤗 datasets: the shared 64x64 multi-rater crops, the 128x128 sample, and rating-to-text prompts.

Prompt protocol (documented here because results depend on it):
- Training pairs each rater slot's mask with that rater's own prompt (`prompts[m]`, from `ratings[m]`).
- A slot with no reading of the nodule (`annotator_valid[m]` False: empty mask, no ratings) gets the
  *nodule-level* prompt (the per-characteristic median of the raters who did read it), so an empty mask is never
  paired with a text that reveals "nobody marked this" and nothing leaks at test time.
- Evaluation (`eval_prompts`): "annotator" = the prompts of the raters who read the nodule, round-robin over the
  samples (the paper's protocol); "nodule" = the one nodule-level prompt; "none" = the empty prompt.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from datasets import Array2D, Array3D, Dataset, Features, Sequence as SequenceFeature, Value
from diffusers.utils import logging
from scipy.spatial import ConvexHull

from .data import DataSource, load_multirater, register_source

logger = logging.get_logger(__name__)


RATING_NAMES = (
    "subtlety", "internalStructure", "calcification", "sphericity", "margin",
    "lobulation", "spiculation", "texture", "malignancy",
)
# LIDC's meaning of each score, as pylidc names them.
RATING_MEANINGS: dict[str, tuple[str, ...]] = {
    "subtlety": ("Extremely Subtle", "Moderately Subtle", "Fairly Subtle", "Moderately Obvious", "Obvious"),
    "internalStructure": ("Soft Tissue", "Fluid", "Fat", "Air"),
    "calcification": ("Popcorn", "Laminated", "Solid", "Non-central", "Central", "Absent"),
    "sphericity": ("Linear", "Ovoid/Linear", "Ovoid", "Ovoid/Round", "Round"),
    "margin": ("Poorly Defined", "Near Poorly Defined", "Medium Margin", "Near Sharp", "Sharp"),
    "lobulation": ("No Lobulation", "Nearly No Lobulation", "Medium Lobulation", "Near Marked Lobulation", "Marked Lobulation"),
    "spiculation": ("No Spiculation", "Nearly No Spiculation", "Medium Spiculation", "Near Marked Spiculation", "Marked Spiculation"),
    "texture": ("Non-Solid/GGO", "Non-Solid/Mixed", "Part Solid/Mixed", "Solid/Mixed", "Solid"),
    "malignancy": ("Highly Unlikely", "Moderately Unlikely", "Indeterminate", "Moderately Suspicious", "Highly Suspicious"),
}
PROMPT_STYLES = ("paper", "ratings", "short", "slice")
# What a pipeline records as its `prompt_style`: one of the LIDC styles above, or "free" for a dataset's own text.
FREE_TEXT = "free"
RECORDED_PROMPT_STYLES = PROMPT_STYLES + (FREE_TEXT,)
# The closing sentence of the paper's Figure 5 prompt, and the one of the "ratings" style (the first checkpoints' form).
PAPER_CLOSING = ("Although there are descriptions of the concerned region, the requirement is to identify the "
                 "segmentation boundaries.")
RATINGS_CLOSING = "Please identify the boundaries of the lung nodule in this CT image."

_SHORT_TEXTURE = ("ground-glass", "mostly ground-glass", "part-solid", "mostly solid", "solid")
_SHORT_SHAPE = ("linear", "ovoid-linear", "ovoid", "roundish", "round")
_SHORT_DEGREE = ("no", "slight", "moderate", "marked", "marked")
_SHORT_MARGIN = ("a poorly defined", "a fairly poorly defined", "a medium", "a fairly sharp", "a sharp")
_SHORT_CALC = {1: "popcorn", 2: "laminated", 3: "solid", 4: "non-central", 5: "central"}


def _checked(ratings: Mapping[str, int]) -> dict[str, int]:
    if not isinstance(ratings, Mapping):
        raise ValueError(f"`ratings` must be a mapping of the nine LIDC characteristics to scores, got {type(ratings)}.")
    missing = [n for n in RATING_NAMES if n not in ratings]
    if missing:
        raise ValueError(f"`ratings` is missing {missing}; expected all of {list(RATING_NAMES)}.")
    out = {}
    for name in RATING_NAMES:
        value, top = ratings[name], len(RATING_MEANINGS[name])
        if isinstance(value, bool) or int(value) != value or not 1 <= int(value) <= top:
            raise ValueError(f"`ratings[{name!r}]` must be an integer in 1..{top}, got {value!r}.")
        out[name] = int(value)
    return out


def _size_sentences(diameter_mm: float | None, volume_mm3: float | None) -> str:
    for name, value in (("diameter_mm", diameter_mm), ("volume_mm3", volume_mm3)):
        if value is None or not np.isfinite(value) or value < 0:
            raise ValueError(
                f"style='paper' states the nodule's size: `{name}` must be a finite number >= 0, got {value!r} "
                "(use style='ratings' for the prompt without diameter and volume)."
            )
    return f"The diameter is {diameter_mm:.1f} mm. The volume is {volume_mm3:.0f} mm3."


def slice_size_sentence(diameter_mm: float | None) -> str:
    """The size sentence of style "slice": this slice's extent in whole millimetres ("The diameter is 12 mm."), one
    word piece for the number (a frozen BERT reads "12.3" as "12", ".", "3")."""
    if diameter_mm is None or not np.isfinite(diameter_mm) or diameter_mm < 0:
        raise ValueError(f"style='slice' states the nodule's extent on this slice: `diameter_mm` must be a finite "
                         f"number >= 0, got {diameter_mm!r}.")
    return f"The diameter is {diameter_mm:.0f} mm."


def ratings_to_prompt(ratings: Mapping[str, int], style: str = "paper", diameter_mm: float | None = None,
                      volume_mm3: float | None = None) -> str:
    """The nine LIDC ratings of one rater (and, for the paper's prompt, that rater's nodule size) -> text.

    `style="paper"`: the seed paper's Figure 5 prompt: numeric sentences ("The subtlety is 5."), semantic ones ("The
    Subtlety is Obvious."), the diameter and volume ("The diameter is 12.3 mm. The volume is 456 mm3.") and the
    paper's closing sentence; needs `diameter_mm` and `volume_mm3`. `style="ratings"`: the same without the size
    sentences and with a shorter closing instruction (the form the first checkpoints were trained on).
    `style="short"`: one natural sentence, as in the paper's control experiments ("A solid, round nodule with marked
    spiculation and a sharp margin.").
    `style="slice"`: the paper's prompt with one size sentence, the extent of the mask *on this slice* in whole
    millimetres ("The diameter is 12 mm.", `diameter_mm` = the slice's Feret diameter), no volume: what a 2-D
    denoiser can draw, and what the controllable checkpoints are trained on (docs/design.md, "Text control").
    Raises `ValueError` for a missing or out-of-range rating or size, or an unknown style.
    """
    if style not in PROMPT_STYLES:
        raise ValueError(f"`style` must be one of {PROMPT_STYLES}, got {style!r}.")
    r = _checked(ratings)
    if style == "short":
        text = f"A {_SHORT_TEXTURE[r['texture'] - 1]}, {_SHORT_SHAPE[r['sphericity'] - 1]} nodule"
        text += f" with {_SHORT_DEGREE[r['spiculation'] - 1]} spiculation, {_SHORT_DEGREE[r['lobulation'] - 1]} lobulation"
        text += f" and {_SHORT_MARGIN[r['margin'] - 1]} margin"
        if r["calcification"] in _SHORT_CALC:
            text += f", with {_SHORT_CALC[r['calcification']]} calcification"
        return text + "."
    numeric = " ".join(f"The {name} is {r[name]}." for name in RATING_NAMES)
    semantic = " ".join(f"The {name[0].upper() + name[1:]} is {RATING_MEANINGS[name][r[name] - 1]}." for name in RATING_NAMES)
    if style == "ratings":
        return f"{numeric} {semantic} {RATINGS_CLOSING}"
    if style == "slice":
        return f"{numeric} {semantic} {slice_size_sentence(diameter_mm)} {PAPER_CLOSING}"
    return f"{numeric} {semantic} {_size_sentences(diameter_mm, volume_mm3)} {PAPER_CLOSING}"


def nodule_ratings(ratings: np.ndarray, valid: np.ndarray) -> dict[str, int]:
    """Per-characteristic median (rounded half up) of the valid raters' ratings `(M, 9)` -> one nodule's ratings."""
    if not valid.any():
        raise ValueError("`valid` marks no rater; a nodule-level prompt needs at least one reading.")
    median = np.floor(np.median(ratings[valid].astype(np.float64), axis=0) + 0.5).astype(int)
    return dict(zip(RATING_NAMES, median.tolist()))


def slice_prompts(ratings: np.ndarray, valid: np.ndarray, style: str = "paper", diameter_mm: np.ndarray | None = None,
                  volume_mm3: np.ndarray | None = None) -> tuple[list[str], str]:
    """One prompt per rater slot (the nodule-level prompt for slots without a reading) and the nodule-level prompt.

    `ratings` `(M, 9)`, `valid` `(M,)`; for style "paper" also each slot's `diameter_mm` and `volume_mm3` `(M,)`,
    for style "slice" each slot's diameter on this slice as `diameter_mm` (`volume_mm3` unused).
    The nodule-level prompt uses the median rating and the median size of the raters who read the nodule.
    """
    if style == "slice" and diameter_mm is not None:
        volume_mm3 = np.zeros(len(valid)) if volume_mm3 is None else volume_mm3
    sizes = [None, None] if diameter_mm is None or volume_mm3 is None else [np.asarray(diameter_mm, np.float64),
                                                                          np.asarray(volume_mm3, np.float64)]
    slot_size = lambda m: [None if s is None else float(s[m]) for s in sizes]  # noqa: E731
    nodule_size = [None if s is None else float(np.median(s[valid])) for s in sizes] if valid.any() else [None, None]
    nodule = ratings_to_prompt(nodule_ratings(ratings, valid), style, *nodule_size)
    per_slot = [
        ratings_to_prompt(dict(zip(RATING_NAMES, ratings[m].tolist())), style, *slot_size(m)) if valid[m] else nodule
        for m in range(len(valid))
    ]
    return per_slot, nodule


def feret_diameter(mask: np.ndarray, pixel_spacing_mm: float) -> float:
    """The longest distance (mm) across a 2-D mask `(H, W)`, measured between the corners of its pixel squares (as a
    caliper would across the marked region; the farthest pair lies on their convex hull); 0 for an empty mask."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return 0.0
    corners = np.unique(np.concatenate([np.stack([rows + dr, cols + dc], 1) for dr in (0, 1) for dc in (0, 1)]),
                        axis=0).astype(np.float64)
    if len(corners) > 4:
        corners = corners[ConvexHull(corners).vertices]
    gaps = corners[:, None, :] - corners[None, :, :]
    return float(np.sqrt((gaps**2).sum(-1).max())) * float(pixel_spacing_mm)


def rater_sizes(masks: np.ndarray, annotation_ids: np.ndarray, pixel_spacing_mm: np.ndarray,
                slice_thickness_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each rater's nodule size from the masks, for the paper's prompt: diameter (mm, the longest axial extent over
    all slices of that rater's annotation) and volume (mm3, marked pixels x pixel area x slice thickness).

    `masks` `(N, M, H, W)` {0, 1}, `annotation_ids` `(N, M)` (the rater reading each slot, -1 = none; one reading
    spans the rows of its slices), `pixel_spacing_mm`, `slice_thickness_mm` `(N,)`. Returns two `(N, M)` float32
    arrays, 0 where a slot has no reading. Against pylidc's own measurements of the same 441 lidc64 readings: the
    diameter is a median 0.5 mm below `Annotation.diameter` (84% within 0.7 mm; at most 9 mm below, where the crop
    or the stored slices miss part of the reading); the volume is a median 0.84x `Annotation.volume` (5-95%:
    0.3-1.8x; pylidc measures from its contours and slice spacing).
    """
    diameter = np.zeros(annotation_ids.shape, np.float32)
    volume = np.zeros(annotation_ids.shape, np.float32)
    for annotation in np.unique(annotation_ids[annotation_ids >= 0]):
        rows, slots = np.nonzero(annotation_ids == annotation)
        spacing = float(pixel_spacing_mm[rows[0]])
        marked = [masks[r, s] for r, s in zip(rows, slots)]
        diameter[rows, slots] = max(feret_diameter(m, spacing) for m in marked)
        volume[rows, slots] = sum(int(m.sum()) for m in marked) * spacing**2 * float(slice_thickness_mm[rows[0]])
    return diameter, volume


def pipeline_prompt_style(pipeline) -> str:
    """The prompt style `pipeline` was trained on (its config's `prompt_style`; "paper" for pipelines that do not
    record one, such as the Probabilistic U-Net, which reads no prompt)."""
    return getattr(pipeline.config, "prompt_style", None) or "paper"


def eval_prompts(example: Mapping, protocol: str) -> list[str]:
    """Prompts for one dataset row under an evaluation protocol: "annotator", "nodule" or "none" (module docstring)."""
    if protocol == "annotator":
        return [p for p, v in zip(example["prompts"], example["annotator_valid"]) if v]
    if protocol == "nodule":
        if example.get("nodule_prompt") is None:
            raise ValueError("`prompts` protocol 'nodule' needs one text per image; this dataset's texts are per rater "
                             "(use 'annotator').")
        return [example["nodule_prompt"]]
    if protocol == "none":
        return [""]
    raise ValueError(f"`prompts` protocol must be 'annotator', 'nodule' or 'none', got {protocol!r}.")


# ---------------------------------------------------------------------------------------------------------------
LIDC64_SPLITS = {"train": ("train_a", "train_b"), "train_a": ("train_a",), "train_b": ("train_b",),
                 "validate": ("validate",), "mini": ("mini",),
                 "selection": ("train_a", "train_b"), "train_fit": ("train_a", "train_b")}
# Every choice (checkpoint step, learning rate, sampler, steps, knob values) is made on "selection", a seeded
# patient-level 10% of the training patients; "train_fit" is the rest. Validate reports, never chooses.
SELECTION_FRACTION = 0.1
SELECTION_SEED = 0


def selection_patients(patients) -> set[str]:
    """The seeded ~10% of the (training) patients that form the selection split."""
    unique = sorted({str(p) for p in patients})
    count = max(1, round(len(unique) * SELECTION_FRACTION))
    return {unique[i] for i in np.random.default_rng(SELECTION_SEED).permutation(len(unique))[:count]}


DATA_MARKERS = {"lidc64": "lidc64_*.npz", "cimd128": "cimd_lidc128_4rater.npz"}
# The Hub dataset `load_lidc64` downloads when no local folder is given or found (the files of ../shared/data/lidc64,
# pushed by `scripts/prepare_lidc.py --from_learnvae ... --push_to_hub`); AMBISEG_LIDC64_REPO or `repo_id` override.
LIDC64_HUB_REPO = "ambiseg-diffusers/lidc64"
LIDC64_HUB_FILES = ["lidc64_*.npz", "lidc64_nodules.json", "README.md"]
LEARNVAE_GIT = "https://github.com/rCampSemp/learn-vae-noisy-label"


def _holds(folder: Path, name: str) -> bool:
    return folder.is_dir() and any(folder.glob(DATA_MARKERS.get(name, "*")))


def lidc64_repo_id(repo_id: str | None = None) -> str:
    """The Hub dataset repo of the lidc64 files: `repo_id`, else `$AMBISEG_LIDC64_REPO`, else `LIDC64_HUB_REPO`."""
    return repo_id or os.environ.get("AMBISEG_LIDC64_REPO") or LIDC64_HUB_REPO


def how_to_get(name: str, repo_id: str | None = None) -> str:
    """Where the `name` data comes from, in the order to try (the end of every missing-data error)."""
    dicom = ("build your own crops from the 120 GB DICOM collection with `python scripts/prepare_lidc.py --dicom_dir "
             "<LIDC-IDRI> --output_dir <dir>` (pylidc; a `save_to_disk` folder, read with `load_split(<dir>, split)`)")
    if name != "lidc64":
        return f"The crops come from LIDC-IDRI (TCIA, CC BY 3.0); {dicom}."
    return (
        "Get the lidc64 crops (LIDC-IDRI, TCIA, CC BY 3.0) in one of three ways: (1) from the TIFFs published in "
        f"rCampSemp/learn-vae-noisy-label (MIT): `git clone {LEARNVAE_GIT} && python scripts/prepare_lidc.py "
        "--from_learnvae learn-vae-noisy-label --output_dir ../shared/data/lidc64` (needs pylidc and tifffile: "
        f"pip install \"ambiseg-diffusers[lidc]\"); (2) from the Hub dataset {lidc64_repo_id(repo_id)!r}, which "
        "`load_lidc64` downloads when neither `data_dir` nor AMBISEG_DATA_DIR is set (another repo: `repo_id` or "
        f"AMBISEG_LIDC64_REPO); (3) {dicom}."
    )


def default_data_dirs(name: str) -> list[Path]:
    """Where a data set is looked for when no folder is named: `../shared/data/<name>` from the working directory,
    then from this checkout."""
    return [Path.cwd().parent / "shared" / "data" / name,
            Path(__file__).resolve().parents[3] / "shared" / "data" / name]


def resolve_data_dir(data_dir: str | os.PathLike | None, name: str) -> Path:
    """The local folder holding the `name` data set ("lidc64" or "cimd128"); never downloads (see `find_lidc64`).

    `data_dir` (else `$AMBISEG_DATA_DIR`) may be that folder itself or the folder above it; without either, the
    default is `../shared/data/<name>` (from the working directory, then from this checkout). A `data_dir` or
    `AMBISEG_DATA_DIR` that holds neither is an error, never a silent fall-back to another folder.
    """
    given, origin = (data_dir, "`data_dir`") if data_dir is not None else (os.environ.get("AMBISEG_DATA_DIR"), "AMBISEG_DATA_DIR")
    if given:
        for folder in (Path(given), Path(given) / name):
            if _holds(folder, name):
                return folder
        raise FileNotFoundError(
            f"{origin} = {str(given)!r} holds no {name} data ({DATA_MARKERS.get(name)}), neither itself nor in "
            f"{name}/. Point it at the {name} folder or the folder above it. {how_to_get(name)}"
        )
    candidates = default_data_dirs(name)
    for folder in candidates:
        if _holds(folder, name):
            return folder
    raise FileNotFoundError(
        f"LIDC data folder {name!r} not found (looked in {[str(c) for c in candidates]}). Pass `data_dir`, or set "
        f"AMBISEG_DATA_DIR to the {name} folder or the folder above it. {how_to_get(name)}"
    )


def find_lidc64(data_dir: str | os.PathLike | None = None, repo_id: str | None = None) -> Path:
    """The folder of the lidc64 files: a local one (`resolve_data_dir`), else, only when neither `data_dir` nor
    AMBISEG_DATA_DIR names a folder, a snapshot of the Hub dataset `lidc64_repo_id(repo_id)`, downloaded with
    `huggingface_hub.snapshot_download` (cached; with HF_HUB_OFFLINE=1 the cache alone). Raises FileNotFoundError
    naming the three ways to get the data when neither works."""
    try:
        return resolve_data_dir(data_dir, "lidc64")
    except FileNotFoundError:
        if data_dir is not None or os.environ.get("AMBISEG_DATA_DIR"):
            raise  # a folder that was named and holds nothing is an error, never a download of something else
    from huggingface_hub import snapshot_download

    repo = lidc64_repo_id(repo_id)
    try:
        logger.info(f"no local lidc64 folder: reading the Hub dataset {repo!r} (downloaded once, then cached)")
        folder = Path(snapshot_download(repo, repo_type="dataset", allow_patterns=LIDC64_HUB_FILES))
    except Exception as error:  # offline without a cached copy, no such repo, no network: say what to do instead
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        raise FileNotFoundError(
            f"No local lidc64 folder (looked in {[str(c) for c in default_data_dirs('lidc64')]}) and the Hub dataset "
            f"{repo!r} could not be fetched ({reason}). {how_to_get('lidc64', repo_id)}"
        ) from error
    if not _holds(folder, "lidc64"):
        raise FileNotFoundError(f"the Hub dataset {repo!r} holds no lidc64_*.npz files. "
                                f"{how_to_get('lidc64', repo_id)}")
    return folder


def load_split(dataset: str, split: str, data_dir: str | os.PathLike | None = None,
               prompt_style: str | None = None) -> Dataset:
    """`dataset="lidc64"` (the shared crops, see `load_lidc64`; `prompt_style` defaults to "paper"), or a folder or
    Hub dataset in the multi-rater contract with its default columns, and one of its splits, checked row by row: a
    shorthand for `data.load_multirater` (a LIDC folder written by scripts/prepare_lidc.py is re-prompted from its
    ratings in `prompt_style`; None keeps its stored prompts)."""
    return load_multirater(dataset, split, data_dir=data_dir, prompt_style=prompt_style)


def with_prompt_style(dataset: Dataset, style: str) -> Dataset:
    """The rows of a LIDC dataset (columns as `load_lidc64`'s) with `prompts` and `nodule_prompt` rebuilt in `style`."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"`prompt_style` must be one of {PROMPT_STYLES}, got {style!r}.")
    if "ratings" not in dataset.column_names:
        return dataset  # no ratings (e.g. cimd128): there is no prompt to rebuild
    if style == "paper" and "diameter_mm" not in dataset.column_names:
        raise ValueError("prompt_style='paper' needs the columns diameter_mm and volume_mm3 (rebuild the data set with "
                         "scripts/prepare_lidc.py) or use prompt_style='ratings'.")

    if style == "slice" and "slice_diameter_mm" not in dataset.column_names:
        raise ValueError("prompt_style='slice' needs the column slice_diameter_mm (load the data with load_lidc64) or "
                         "use prompt_style='paper'.")

    def reprompt(row):
        sizes = {"paper": (row["diameter_mm"], row["volume_mm3"]),
                 "slice": (row.get("slice_diameter_mm"), None)}.get(style, (None, None))
        per_slot, nodule = slice_prompts(np.asarray(row["ratings"]), np.asarray(row["annotator_valid"]), style, *sizes)
        return {"prompts": per_slot, "nodule_prompt": nodule}

    return dataset.map(reprompt, desc=f"prompts ({style})", keep_in_memory=True)  # no cache beside the data


def lidc64_features(size: int = 64, raters: int = 4) -> Features:
    return Features({
        "image": Array2D((size, size), "float32"),
        "masks": Array3D((raters, size, size), "uint8"),
        "annotator_valid": SequenceFeature(Value("bool"), length=raters),
        "ratings": Array2D((raters, len(RATING_NAMES)), "int8"),
        "diameter_mm": SequenceFeature(Value("float32"), length=raters),
        "volume_mm3": SequenceFeature(Value("float32"), length=raters),
        "slice_diameter_mm": SequenceFeature(Value("float32"), length=raters),
        "pixel_spacing_mm": Value("float32"),
        "prompts": SequenceFeature(Value("string"), length=raters),
        "nodule_prompt": Value("string"),
        "patient_id": Value("string"),
        "nodule_id": Value("string"),
        "slice": Value("int16"),
    })


def load_lidc64(split: str = "train", data_dir: str | os.PathLike | None = None, prompt_style: str = "paper",
                repo_id: str | None = None) -> Dataset:
    """The real LIDC-IDRI 64x64 multi-rater crops as a `datasets.Dataset`.

    `split`: "train" (train_a + train_b, 570 slices), "train_a", "train_b", "validate" (114), "mini" (14), and the
    patient-level partition of "train" into "selection" (6 of its 55 patients, seeded; for every choice) and
    "train_fit" (the other 49).
    Columns: image `(64, 64)` float32 (z-scored per slice, as stored), masks `(4, 64, 64)` uint8 {0, 1},
    annotator_valid `(4,)` bool, ratings `(4, 9)` int8 (0 where not valid), diameter_mm / volume_mm3 `(4,)` float32
    (each rater's nodule size from its masks, `rater_sizes`; 0 where not valid), slice_diameter_mm `(4,)` float32
    (each slot's mask's Feret diameter on this slice), pixel_spacing_mm (the scan's in-plane spacing), prompts (4 str in `prompt_style`,
    see module docstring and `ratings_to_prompt`), nodule_prompt, patient_id, nodule_id ("<patient>_<nodule
    index>"), slice. A model answers best to the prompt style it was trained on: pass its
    `pipeline.config.prompt_style`.
    The files are read from `data_dir`, else `$AMBISEG_DATA_DIR`, else `../shared/data/lidc64`, else the Hub dataset
    `repo_id` (default `$AMBISEG_LIDC64_REPO` or `LIDC64_HUB_REPO`); see `find_lidc64`.
    """
    if split not in LIDC64_SPLITS:
        raise ValueError(f"`split` must be one of {sorted(LIDC64_SPLITS)}, got {split!r}.")
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"`prompt_style` must be one of {PROMPT_STYLES}, got {prompt_style!r}.")
    folder = find_lidc64(data_dir, repo_id)
    parts = [np.load(folder / f"lidc64_{part}.npz") for part in LIDC64_SPLITS[split]]
    stack = lambda key: np.concatenate([p[key] for p in parts])  # noqa: E731
    keep = slice(None)
    if split in ("selection", "train_fit"):
        chosen = selection_patients(stack("patient_id"))
        in_selection = np.array([str(p) in chosen for p in stack("patient_id")])
        keep = in_selection if split == "selection" else ~in_selection
    stack = lambda key, _stack=stack: _stack(key)[keep]  # noqa: E731
    valid, ratings, patients = stack("annotator_valid"), stack("ratings"), stack("patient_id")
    diameter, volume = _lidc64_sizes(folder, split, stack("pylidc_annotation_id"))
    nodule_ids = [f"{str(p)[-4:]}_{int(n)}" for p, n in zip(patients, stack("nodule_idx"))]
    spacing = _pixel_spacings(folder.resolve(), tuple(nodule_ids))
    masks = stack("masks").astype(np.uint8)
    slice_diameter = np.array([[feret_diameter(m, s) for m in row] for row, s in zip(masks, spacing)], np.float32)
    sizes = (slice_diameter, np.zeros_like(slice_diameter)) if prompt_style == "slice" else (diameter, volume)
    prompts = [slice_prompts(r, v, prompt_style, d, vol) for r, v, d, vol in zip(ratings, valid, *sizes)]
    columns = {
        "image": stack("images").astype(np.float32),
        "masks": masks,
        "annotator_valid": valid.tolist(),
        "ratings": ratings.astype(np.int8),
        "diameter_mm": diameter,
        "volume_mm3": volume,
        "slice_diameter_mm": slice_diameter,
        "pixel_spacing_mm": spacing,
        "prompts": [p[0] for p in prompts],
        "nodule_prompt": [p[1] for p in prompts],
        "patient_id": [str(p) for p in patients],
        "nodule_id": nodule_ids,
        "slice": stack("slice_idx").astype(np.int16),
    }
    return Dataset.from_dict(columns, features=lidc64_features())


def _pixel_spacings(folder: Path, nodule_ids: tuple[str, ...]) -> np.ndarray:
    """In-plane pixel spacing (mm) of each row's scan, from lidc64_nodules.json. `(N,)` float32."""
    nodules = json.loads((folder / "lidc64_nodules.json").read_text())
    return np.array([nodules[k]["pixel_spacing_mm"] for k in nodule_ids], np.float32)


@lru_cache(maxsize=8)
def _annotation_sizes(folder: Path, parts: tuple[str, ...]) -> dict[int, tuple[float, float]]:
    """{pylidc annotation id: (diameter mm, volume mm3)} over the slices of `parts` (see `rater_sizes`)."""
    files = [np.load(folder / f"lidc64_{part}.npz") for part in parts]
    stack = lambda key: np.concatenate([f[key] for f in files])  # noqa: E731
    nodules = json.loads((folder / "lidc64_nodules.json").read_text())
    keys = [f"{str(p)[-4:]}_{int(n)}" for p, n in zip(stack("patient_id"), stack("nodule_idx"))]
    spacing = np.array([nodules[k]["pixel_spacing_mm"] for k in keys])
    thickness = np.array([nodules[k]["slice_thickness_mm"] for k in keys])
    ids = stack("pylidc_annotation_id")
    diameter, volume = rater_sizes(stack("masks"), ids, spacing, thickness)
    return {int(a): (float(d), float(v)) for a, d, v in zip(ids[ids >= 0], diameter[ids >= 0], volume[ids >= 0])}


def _lidc64_sizes(folder: Path, split: str, annotation_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # "mini" holds one slice per validate nodule: the sizes are measured over the nodule's slices in validate.
    parts = ("validate",) if split == "mini" else LIDC64_SPLITS[split]
    sizes = _annotation_sizes(folder.resolve(), parts)
    table = np.array([[sizes.get(int(a), (0.0, 0.0)) for a in row] for row in annotation_ids], np.float32)
    return table[..., 0], table[..., 1]


def load_cimd128(split: str | None = None, data_dir: str | os.PathLike | None = None) -> Dataset:
    """The 28 real LIDC 128x128 crops with four rater masks (no ratings, no prompts).

    `split`: None (all 28), "training" (19) or "testing" (9). Columns: image `(128, 128)` float32 (grey levels
    0-255 as stored), masks `(4, 128, 128)` uint8, annotator_valid (all True), source_path.
    """
    folder = resolve_data_dir(data_dir, "cimd128")
    data = np.load(folder / "cimd_lidc128_4rater.npz")
    keep = np.ones(len(data["images"]), bool) if split is None else data["split"] == split
    if split is not None and split not in ("training", "testing"):
        raise ValueError(f"`split` must be None, 'training' or 'testing', got {split!r}.")
    features = Features({
        "image": Array2D((128, 128), "float32"),
        "masks": Array3D((4, 128, 128), "uint8"),
        "annotator_valid": SequenceFeature(Value("bool"), length=4),
        "source_path": Value("string"),
    })
    return Dataset.from_dict({
        "image": data["images"][keep].astype(np.float32),
        "masks": data["masks"][keep],
        "annotator_valid": [[True] * 4] * int(keep.sum()),
        "source_path": data["source_path"][keep].tolist(),
    }, features=features)


# ---------------------------------------------------------------------------------------------------------------
def augment(image: torch.Tensor, masks: torch.Tensor, generator: torch.Generator | None = None):
    """The same random flip / 90-degree rotation for an image `(C, H, W)` and all its masks `(M, H, W)`."""
    k = int(torch.randint(0, 4, (1,), generator=generator))
    flip = bool(torch.randint(0, 2, (1,), generator=generator))
    image, masks = torch.rot90(image, k, (-2, -1)), torch.rot90(masks, k, (-2, -1))
    if flip:
        image, masks = image.flip(-1), masks.flip(-1)
    return image, masks


# LIDC is one source on top of the multi-rater contract (data.py), which knows no source: "lidc64" in the data flags
# and `load_multirater` means these crops, and rows written by scripts/prepare_lidc.py are re-prompted from their
# ratings.
register_source("lidc64", DataSource(load=lambda split, data_dir, style: load_lidc64(split, data_dir, style or "paper"),
                                     restyle=with_prompt_style, locate=find_lidc64))
