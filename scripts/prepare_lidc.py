#!/usr/bin/env python
"""Build the LIDC-IDRI data: the lidc64 files from public TIFF crops, or the paper's training set from the raw DICOM.

    pip install "ambiseg-diffusers[lidc]"
    git clone https://github.com/rCampSemp/learn-vae-noisy-label
    python scripts/prepare_lidc.py --from_learnvae learn-vae-noisy-label --output_dir ../shared/data/lidc64 \\
        [--push_to_hub org/name]
    python scripts/prepare_lidc.py --dicom_dir /data/LIDC-IDRI --output_dir data/lidc128 [--push_to_hub org/name]

`--from_learnvae`: the lidc64 files (lidc64_{train_a,train_b,validate,mini}.npz, lidc64_nodules.json), equal array for
array to ../shared/data/lidc64, from the TIFF crops of rCampSemp/learn-vae-noisy-label (MIT) and the ratings in
pylidc's bundled annotation database (every TIFF rater mask is checked against its reading's contours); no DICOM
files, about 20 s. What comes from where: `ambiseg_diffusers.learnvae`. `--push_to_hub` uploads the files with a
card carrying the CC BY 3.0 attribution and the MIT notice; `load_lidc64` reads that Hub dataset as it reads a folder.

`--dicom_dir`, from the 120 GB DICOM collection:

Every nodule (no size filter): its rater annotations clustered per nodule by pylidc, one 2-D sample per axial slice
that any rater marked, exactly four mask slots (empty masks for raters who did not mark the nodule), each rater's
nine ratings and prompt, and a seeded patient-level train/test split (80/20) with a validation fraction of the
training patients. Crop geometries:
- `paper` (default): a square of `--crop_mm` around the centre of the 50% consensus box, resized to 128x128
  (bilinear image, nearest masks), HU clipped to [-1000, 400] and scaled to [-1, 1];
- `lidc64`: 64x64 at native spacing with origin at the 50% consensus box centre minus 32 (the geometry of
  ../shared/data/lidc64; `--crop_origins lidc64_nodules.json` reuses its recorded origins), image z-scored per slice.
A scan that fails to load is reported and skipped (a run where none loads fails and writes nothing). Each scan's
samples are kept beside the output as they finish, so a rerun with the same arguments resumes per scan (other
arguments are refused unless `--overwrite`); the dataset is written atomically (a temporary folder swapped in at the
end), so an interrupt never leaves half a dataset and nothing replaces a dataset with an empty one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from datasets import DatasetDict, Dataset
from tqdm.auto import tqdm

from ambiseg_diffusers.hub_utils import dataset_card, push_dataset_to_hub, push_files_to_hub
from ambiseg_diffusers.learnvae import LIDC64_FILES, consensus_origin, examples_dir, learnvae_to_lidc64
from ambiseg_diffusers.lidc import LEARNVAE_GIT, RATING_NAMES, feret_diameter, lidc64_features, slice_prompts
from ambiseg_diffusers.run_records import check_resumable

warnings.filterwarnings("ignore", category=DeprecationWarning)
MAX_RATERS = 4


def _pylidc():
    try:
        import pylidc
    except ImportError as error:  # pragma: no cover - message for users
        raise ImportError('prepare_lidc.py needs pylidc: pip install "ambiseg-diffusers[lidc]"') from error
    return pylidc


def use_dicom_dir(dicom_dir: str) -> None:
    """Point pylidc at the DICOM root without writing its ~/.pylidcrc."""
    sys.modules["pylidc.Scan"]._get_dicom_file_path_from_config_file = lambda: str(dicom_dir)


def dicom_volume(scan) -> np.ndarray:
    """The scan in Hounsfield units, `(512, 512, slices)` int16, read by pylidc from the DICOM files."""
    return scan.to_volume(verbose=False)


def annotation_ratings(annotation) -> list[int]:
    return [int(getattr(annotation, name)) for name in RATING_NAMES]


def nodule_samples(volume: np.ndarray, annotations: list, geometry: str = "paper", origin: tuple[int, int] | None = None,
                   crop_mm: float = 64.0, resolution: int = 128) -> list[dict]:
    """One sample per axial slice any rater marked: image, 4 mask slots, validity, ratings, slice index."""
    annotations = sorted(annotations, key=lambda a: a.id)[:MAX_RATERS]
    slices = sorted({int(k) for a in annotations for k in a.contour_slice_indices})
    if geometry == "lidc64":
        size = 64
    elif geometry == "paper":
        size = int(round(crop_mm / float(annotations[0].scan.pixel_spacing)))
    else:
        raise ValueError(f"`geometry` must be 'paper' or 'lidc64', got {geometry!r}.")
    r0, c0 = origin if origin is not None else consensus_origin(annotations, size, volume.shape[:2])
    box = np.array([[r0, r0 + size - 1], [c0, c0 + size - 1], [slices[0], slices[-1]]])
    masks = np.zeros((MAX_RATERS, size, size, len(range(slices[0], slices[-1] + 1))), bool)
    ratings = np.zeros((MAX_RATERS, len(RATING_NAMES)), np.int8)
    valid = np.zeros(MAX_RATERS, bool)
    diameter_mm, volume_mm3 = np.zeros(MAX_RATERS, np.float32), np.zeros(MAX_RATERS, np.float32)
    for slot, annotation in enumerate(annotations):
        masks[slot] = annotation.boolean_mask(bbox=box)
        ratings[slot] = annotation_ratings(annotation)
        valid[slot] = True
        # pylidc's own measurements of this reading (mm, mm3), for the paper's prompt
        diameter_mm[slot], volume_mm3[slot] = annotation.diameter, annotation.volume

    # the crop's own in-plane spacing once resized: what the 'slice' prompt's diameters are measured in
    spacing = float(annotations[0].scan.pixel_spacing) * (size / resolution if geometry == "paper" else 1.0)
    samples = []
    for k in slices:
        image = volume[r0 : r0 + size, c0 : c0 + size, k].astype(np.float32)
        slot_masks = masks[..., k - slices[0]].astype(np.uint8)
        if geometry == "lidc64":
            image = (image - image.mean()) / max(float(image.std()), 1e-6)
        else:
            image = np.clip(image, -1000.0, 400.0) / 700.0 + 3.0 / 7.0  # [-1000, 400] HU -> [-1, 1]
            image = torch.nn.functional.interpolate(torch.from_numpy(image)[None, None], size=resolution, mode="bilinear",
                                                    align_corners=False)[0, 0].numpy()
            slot_masks = torch.nn.functional.interpolate(torch.from_numpy(slot_masks)[None].float(), size=resolution,
                                                         mode="nearest-exact")[0].numpy().astype(np.uint8)
        samples.append({"image": image, "masks": slot_masks, "annotator_valid": valid.copy(), "ratings": ratings.copy(),
                        "diameter_mm": diameter_mm.copy(), "volume_mm3": volume_mm3.copy(), "slice": k - slices[0],
                        "slice_diameter_mm": np.array([feret_diameter(m, spacing) for m in slot_masks], np.float32),
                        "pixel_spacing_mm": np.float32(spacing),
                        "annotation_ids": [a.id for a in annotations]})
    return samples


def split_patients(patients: list[str], seed: int, test_fraction: float = 0.2, validation_fraction: float = 0.1) -> dict:
    """Seeded patient-level split: {patient: "train" | "validation" | "test"}."""
    order = sorted(set(patients))
    order = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    n_test = int(round(len(order) * test_fraction))
    n_validation = int(round((len(order) - n_test) * validation_fraction))
    return {p: "test" if i < n_test else "validation" if i < n_test + n_validation else "train" for i, p in enumerate(order)}


def scan_key(scan) -> str:
    return f"{scan.patient_id}_{scan.series_instance_uid}"


def scan_samples(scan, volume: np.ndarray, geometry: str, crop_origins: dict | None, crop_mm: float,
                 resolution: int) -> list[dict]:
    """The samples of every nodule of one scan."""
    samples = []
    for nodule_idx, cluster in enumerate(scan.cluster_annotations()):
        origin = (crop_origins or {}).get(frozenset(a.id for a in cluster))
        for sample in nodule_samples(volume, cluster, geometry, origin, crop_mm, resolution):
            sample.update(patient_id=scan.patient_id, nodule_id=f"{scan.patient_id[-4:]}_{nodule_idx}")
            samples.append(sample)
    return samples


SAMPLE_ARRAYS = ("image", "masks", "annotator_valid", "ratings", "diameter_mm", "volume_mm3", "slice_diameter_mm",
                 "pixel_spacing_mm", "slice")


def save_scan_part(path: Path, samples: list[dict]) -> None:
    """One scan's samples as plain arrays (no pickle), written atomically: a part is complete or absent."""
    arrays = {key: np.stack([s[key] for s in samples]) if samples else np.zeros(0)
              for key in SAMPLE_ARRAYS}
    arrays["patient_id"] = np.array([s["patient_id"] for s in samples], dtype=str)
    arrays["nodule_id"] = np.array([s["nodule_id"] for s in samples], dtype=str)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_scan_part(path: Path) -> list[dict] | None:
    """A stored scan's samples; None for a part written before all of SAMPLE_ARRAYS existed (the scan is redone)."""
    with np.load(path, allow_pickle=False) as part:
        if part["patient_id"].size == 0:
            return []
        if any(key not in part for key in SAMPLE_ARRAYS):
            return None
        keys = (*SAMPLE_ARRAYS, "patient_id", "nodule_id")
        return [{k: part[k][i] for k in keys} for i in range(len(part["patient_id"]))]


def build_dataset(scans, load_volume: Callable = dicom_volume, geometry: str = "paper", seed: int = 0,
                  crop_origins: dict[frozenset, tuple[int, int]] | None = None, crop_mm: float = 64.0, resolution: int = 128,
                  test_fraction: float = 0.2, validation_fraction: float = 0.1,
                  parts_dir: str | os.PathLike | None = None) -> tuple[DatasetDict, dict]:
    """Samples of every nodule of `scans` (pylidc Scan objects) as a DatasetDict, and a report of skipped scans.

    `crop_origins` maps a nodule's set of annotation ids to a recorded crop origin (else the consensus centre).
    With `parts_dir`, each scan's samples are stored there as it finishes and a rerun skips the scans already done
    (failed scans are retried). Raises RuntimeError when no scan could be read.
    """
    parts = Path(parts_dir) if parts_dir is not None else None
    if parts is not None:
        parts.mkdir(parents=True, exist_ok=True)
    rows, failed, reused = [], {}, 0
    for scan in tqdm(scans, desc="scans"):
        part = parts / f"{scan_key(scan)}.npz" if parts is not None else None
        stored = load_scan_part(part) if part is not None and part.exists() else None
        if stored is not None:
            rows += stored
            reused += 1
            continue
        try:
            volume = load_volume(scan)
        except Exception as error:  # one unreadable scan must not end a run over 1,018
            failed[scan.patient_id + "/" + scan.series_instance_uid] = f"{type(error).__name__}: {error}"
            tqdm.write(f"skipped {scan.patient_id}: {type(error).__name__}: {error}")
            continue
        samples = scan_samples(scan, volume, geometry, crop_origins, crop_mm, resolution)
        if part is not None:
            save_scan_part(part, samples)
        rows += samples
    if not rows:
        example = next(iter(failed.values()), "no scans given")
        raise RuntimeError(f"no samples: {len(failed)} of {len(scans)} scans could not be read (e.g. {example}); "
                           "check --dicom_dir and --patients.")
    assignment = split_patients([str(r["patient_id"]) for r in rows], seed, test_fraction, validation_fraction)
    splits = {}
    for split in ("train", "validation", "test"):
        chosen = [r for r in rows if assignment[str(r["patient_id"])] == split]
        if not chosen:  # e.g. no validation patients in a small run; an empty split has no arrays to type
            continue
        prompts = [slice_prompts(r["ratings"], np.asarray(r["annotator_valid"]), "paper", r["diameter_mm"], r["volume_mm3"])
                   for r in chosen]
        size = chosen[0]["image"].shape[-1]
        splits[split] = Dataset.from_dict({
            "image": [r["image"] for r in chosen], "masks": [r["masks"] for r in chosen],
            "annotator_valid": [np.asarray(r["annotator_valid"]).tolist() for r in chosen],
            "ratings": [r["ratings"] for r in chosen], "diameter_mm": [r["diameter_mm"] for r in chosen],
            "volume_mm3": [r["volume_mm3"] for r in chosen],
            "slice_diameter_mm": [r["slice_diameter_mm"] for r in chosen],
            "pixel_spacing_mm": [float(r["pixel_spacing_mm"]) for r in chosen], "prompts": [p[0] for p in prompts],
            "nodule_prompt": [p[1] for p in prompts], "patient_id": [str(r["patient_id"]) for r in chosen],
            "nodule_id": [str(r["nodule_id"]) for r in chosen], "slice": [int(r["slice"]) for r in chosen],
        }, features=lidc64_features(size))
    report = {"failed_scans": failed, "samples": len(rows), "patients": len(assignment), "scans_resumed": reused}
    return DatasetDict(splits), report


def save_atomically(dataset: DatasetDict, report: dict, output_dir: str) -> None:
    """Writes beside `output_dir` and swaps it in only when complete; an empty dataset never replaces anything."""
    if sum(len(split) for split in dataset.values()) == 0:
        raise RuntimeError(f"refusing to write an empty dataset to {output_dir}.")
    output = Path(output_dir)
    tmp = output.parent / f".{output.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    dataset.save_to_disk(str(tmp))
    (tmp / "prepare_report.json").write_text(json.dumps(report, indent=2))
    old = output.parent / f".{output.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if output.exists():
        os.replace(output, old)
    os.replace(tmp, output)
    shutil.rmtree(old, ignore_errors=True)


def learnvae_card(counts: dict[str, int], repo_dir: str, command: str):
    """The Hub card of the lidc64 files: CC BY 3.0 with the LIDC-IDRI attribution, and the crops' MIT notice."""
    licence = Path(examples_dir(repo_dir)).parent / "LICENSE.md"
    if not licence.is_file():  # the MIT licence asks for its full notice with every copy
        raise FileNotFoundError(f"{licence} not found: the crops' MIT notice must go with the uploaded data; push from a "
                                "complete clone of rCampSemp/learn-vae-noisy-label.")
    mit = licence.read_text().strip()
    description = (
        "Real thoracic CT crops (64x64, native spacing) of the LIDC-IDRI nodules in rCampSemp/learn-vae-noisy-label's "
        "train and validate folders, with up to four radiologists' masks and each one's nine LIDC ratings: "
        f"{counts['train_a']} + {counts['train_b']} training slices (lidc64_train_a.npz, lidc64_train_b.npz), {counts['validate']} "
        f"validate slices (lidc64_validate.npz; lidc64_mini.npz: {counts['mini']}, one per validate nodule) of "
        f"{counts['nodules']} nodules (lidc64_nodules.json), split by patient. Keys: images (N,64,64) float32 "
        "z-scored per slice; masks (N,4,64,64) uint8; annotator_valid (N,4); ratings (N,4,9) int8; consensus50; "
        "patient_id, nodule_idx, slice_idx, split, pylidc_annotation_id.\n\n"
        "Load with `ambiseg_diffusers.lidc.load_lidc64(split)` (it downloads this repo when no local folder is "
        "found; `repo_id=` or AMBISEG_LIDC64_REPO names it), or `numpy.load` the files.\n\n"
        f"The crops (images, rater masks, consensus) were published as TIFFs in [rCampSemp/learn-vae-noisy-label]"
        f"({LEARNVAE_GIT}) under the MIT licence; the ratings and annotation ids come from pylidc's annotation "
        "database. The MIT notice of that repository:\n\n"
        + "\n".join(f"> {line}".rstrip() for line in mit.splitlines())
    )
    return dataset_card("LIDC-IDRI 64x64 nodule crops with four rater masks and ratings (lidc64)", description, command,
                        extra_tags=["lidc64"])


def main_learnvae(args, argv) -> dict[str, int]:
    """`--from_learnvae`: writes the lidc64 files and, with `--push_to_hub`, uploads them with their card."""
    try:
        counts = learnvae_to_lidc64(args.from_learnvae, args.output_dir)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"prepare_lidc.py: --from_learnvae: {error}")
    print(counts)
    if args.push_to_hub:
        command = "python scripts/prepare_lidc.py " + " ".join(argv if argv is not None else sys.argv[1:])
        push_files_to_hub(args.output_dir, args.push_to_hub, learnvae_card(counts, args.from_learnvae, command),
                          patterns=list(LIDC64_FILES))
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from_learnvae", metavar="CLONE",
                        help="a clone of rCampSemp/learn-vae-noisy-label: write the lidc64 files from its TIFFs (the "
                             "options below other than --output_dir and --push_to_hub are for --dicom_dir)")
    source.add_argument("--dicom_dir", help="LIDC-IDRI root holding LIDC-IDRI-dddd folders")
    parser.add_argument("--output_dir", required=True,
                        help="where the lidc64 files are written (--from_learnvae) or the DatasetDict is saved")
    parser.add_argument("--geometry", default="paper", choices=["paper", "lidc64"], help="crop geometry (see above)")
    parser.add_argument("--crop_mm", type=float, default=64.0, help="paper geometry: crop side in mm before resizing")
    parser.add_argument("--resolution", type=int, default=128, help="paper geometry: output size in pixels")
    parser.add_argument("--crop_origins", default=None, help="lidc64_nodules.json: reuse its crop origins")
    parser.add_argument("--patients", nargs="*", default=None, help="only these patient ids (default: all 1,018 scans)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient split")
    parser.add_argument("--test_fraction", type=float, default=0.2, help="patients held out for testing")
    parser.add_argument("--validation_fraction", type=float, default=0.1, help="of the other patients, for validation")
    parser.add_argument("--overwrite", action="store_true", help="discard per-scan results made with other arguments")
    parser.add_argument("--push_to_hub", default=None, metavar="REPO_ID",
                        help="also upload the dataset with a card carrying the CC BY 3.0 attribution")
    args = parser.parse_args(argv)
    if args.from_learnvae:
        return main_learnvae(args, argv)

    pl = _pylidc()
    if not Path(args.dicom_dir).is_dir():
        parser.error(f"--dicom_dir {args.dicom_dir!r} is not a folder")
    use_dicom_dir(args.dicom_dir)
    scans = pl.query(pl.Scan)
    if args.patients:
        scans = scans.filter(pl.Scan.patient_id.in_(args.patients))
    origins = None
    if args.crop_origins:
        recorded = json.loads(Path(args.crop_origins).read_text()).values()
        origins = {frozenset(v["annotation_ids"]): tuple(v["crop_origin_rc"]) for v in recorded}
    output = Path(args.output_dir)
    parts = output.parent / f".{output.name}.scans"
    defining = {k: v for k, v in vars(args).items() if k not in ("output_dir", "overwrite", "push_to_hub")}
    defining["dicom_dir"] = os.path.abspath(args.dicom_dir)
    check_resumable(parts, defining, sorted(parts.glob("*.npz")), args.overwrite)
    try:
        dataset, report = build_dataset(scans.all(), geometry=args.geometry, seed=args.seed, crop_origins=origins,
                                        crop_mm=args.crop_mm, resolution=args.resolution, test_fraction=args.test_fraction,
                                        validation_fraction=args.validation_fraction, parts_dir=parts)
    except RuntimeError as error:
        sys.exit(f"prepare_lidc.py: {error}")
    save_atomically(dataset, report, args.output_dir)
    shutil.rmtree(parts)
    print({k: len(v) for k, v in dataset.items()}, f"{len(report['failed_scans'])} scans skipped")
    if args.push_to_hub:
        card = dataset_card(
            "LIDC-IDRI nodule crops with four rater masks and rating prompts",
            f"{report['samples']} axial slices of every LIDC-IDRI nodule in the scans read ({args.geometry} geometry), "
            "each with four radiologist mask slots (empty for raters who did not mark the nodule), their nine LIDC "
            "ratings and the prompts built from them, split by patient.",
            "python scripts/prepare_lidc.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        )
        push_dataset_to_hub(dataset, args.push_to_hub, card)


if __name__ == "__main__":
    main()
