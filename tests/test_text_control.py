"""Text control: the "slice" prompt style, counterfactual training pairs, restated prompts and the benchmark's
measures (benchmarks/text_control.py)."""

import math
import re
import sys

import numpy as np
import pytest
import torch

from ambiseg_diffusers.configs import AmbiSegTrainingConfig
from ambiseg_diffusers.lidc import RATING_NAMES, feret_diameter, load_lidc64, ratings_to_prompt, slice_prompts
from ambiseg_diffusers.text import PromptCache
from ambiseg_diffusers.text_control import (
    boundary_length, compactness, counterfactual_pair, elongate, plain_prompt, resize_to_diameter, round_shape,
)
from ambiseg_diffusers.training_utils import step_generator, training_batch

from conftest import ROOT, needs_data

sys.path.insert(0, str(ROOT / "benchmarks"))
import text_control as benchmark  # noqa: E402

RATINGS = dict(zip(RATING_NAMES, [5, 1, 6, 3, 4, 1, 2, 5, 4]))


def disk(radius: float, size: int = 40) -> np.ndarray:
    rows, cols = np.ogrid[:size, :size]
    return (rows - size / 2) ** 2 + (cols - size / 2) ** 2 <= radius**2


def stated_mm(prompt: str) -> int:
    return int(re.search(r"(\d+) mm", prompt).group(1))


def test_slice_prompt_states_the_slice_diameter_in_whole_millimetres():
    text = ratings_to_prompt(RATINGS, "slice", diameter_mm=12.46)
    assert "The Malignancy is Moderately Suspicious. The diameter is 12 mm. Although there are" in text
    assert "volume" not in text and text.startswith("The subtlety is 5.")
    with pytest.raises(ValueError, match="style='slice' states the nodule's extent on this slice"):
        ratings_to_prompt(RATINGS, "slice")
    ratings = np.array([list(RATINGS.values())] * 3)
    per_slot, nodule = slice_prompts(ratings, np.array([True, True, False]), "slice", np.array([9.6, 13.2, 0.0]))
    assert [stated_mm(p) for p in per_slot] == [10, 13, 11]  # the unread slot: the median of the two readers (11.4)
    assert per_slot[2] == nodule


def test_compactness_and_perimeter_by_hand():
    square = np.zeros((12, 12), bool)
    square[1:11, 1:11] = True  # 10 x 10: 40 boundary edges -> perimeter 10 pi, compactness 4 pi 100 / (10 pi)^2
    assert boundary_length(square) == pytest.approx(10 * math.pi)
    assert compactness(square) == pytest.approx(4 / math.pi)
    # a digital disk of radius 8 is 17 pixels wide and high: 2 (17 + 17) = 68 staircase edges
    assert compactness(disk(8)) == pytest.approx(4 * math.pi * disk(8).sum() / (68 * math.pi / 4) ** 2)
    assert compactness(disk(8)) > 0.85 and compactness(disk(15)) > 0.92  # near 1, nearer as the disk grows
    assert math.isnan(compactness(np.zeros((4, 4), bool)))


def test_resize_to_diameter_hits_the_target_and_keeps_the_position():
    mask = disk(5)
    assert feret_diameter(mask, 0.5) == pytest.approx(5.5, abs=0.3)  # 11 pixels across at 0.5 mm
    for target in (2.0, 4.0, 9.0, 14.0):
        edited = resize_to_diameter(mask, target, 0.5)
        assert feret_diameter(edited, 0.5) == pytest.approx(target, abs=0.5)
        rows, cols = np.nonzero(edited)
        assert (rows.mean(), cols.mean()) == pytest.approx((20.0, 20.0), abs=0.6)
    tiny = resize_to_diameter(mask, 1.0, 0.5)  # smaller than any erosion leaves: a 2-pixel disk at the centre
    assert 0 < tiny.sum() <= 5 and tiny[20, 20]


def test_shape_edits_round_or_stretch_the_mask_at_the_same_area():
    blob = disk(7) | (np.roll(disk(4), 7, axis=1))  # a lobulated blob, longer left to right
    rounded, stretched = round_shape(blob), elongate(blob, 4.0)
    assert compactness(rounded) > compactness(blob) > compactness(stretched)
    assert rounded.sum() == pytest.approx(blob.sum(), rel=0.08) and stretched.sum() == pytest.approx(blob.sum(), rel=0.1)
    rows, cols = np.nonzero(stretched)
    assert np.ptp(cols) > 1.6 * np.ptp(rows)  # stretched along the blob's own long axis (the columns)
    assert np.ptp(cols) == pytest.approx(2.0 * np.ptp(np.nonzero(blob)[1]), rel=0.15)  # sqrt(4) longer


def test_counterfactual_pair_restates_what_the_edited_mask_shows():
    rng = np.random.default_rng(3)
    draws = [counterfactual_pair(disk(6), RATINGS, 0.7, rng, shape_rate=1.0) for _ in range(40)]
    diameters = [d for _, _, d in draws]
    assert min(diameters) < 4 and max(diameters) > 18  # the drawn range spans the benchmark's 3-25 mm
    for mask, ratings, diameter in draws:
        assert diameter == pytest.approx(feret_diameter(mask, 0.7))
        assert ratings["sphericity"] in (1, 5)
        assert {k: v for k, v in ratings.items() if k != "sphericity"} == {
            k: v for k, v in RATINGS.items() if k != "sphericity"}


def test_plain_prompts_state_the_size_and_the_shape_words():
    rng = np.random.default_rng(0)
    rounded = [plain_prompt({**RATINGS, "sphericity": 5, "spiculation": 1}, 12.4, rng) for _ in range(60)]
    linear = [plain_prompt({**RATINGS, "sphericity": 1, "spiculation": 5}, 7.0, rng) for _ in range(60)]
    assert all("12 mm" in p and p.endswith(".") for p in rounded) and all("7 mm" in p for p in linear)
    assert any("round" in p for p in rounded) and not any("elongated" in p or "linear" in p for p in rounded)
    assert any("elongated" in p for p in linear) and any("linear" in p for p in linear)
    assert not any("round" in p for p in linear)
    assert any("smooth" in p for p in rounded) and any("marked spiculation" in p for p in linear)
    assert len(set(rounded)) > 5  # several forms, not one template


def _lidc_like_rows():
    """Two LIDC-like rows of 16 x 16 crops: a 6-pixel square marked by raters 0 and 1, rater 2 unread."""
    masks = np.zeros((2, 3, 16, 16), np.uint8)
    masks[:, :2, 5:11, 5:11] = 1
    return {"image": [np.random.default_rng(i).normal(size=(16, 16)).astype(np.float32) for i in range(2)],
            "masks": list(masks), "annotator_valid": [[True, True, False]] * 2,
            "ratings": [np.array([list(RATINGS.values())] * 3)] * 2, "pixel_spacing_mm": [0.5, 0.5],
            "prompts": [["stored a", "stored b", "stored nodule"]] * 2}


class _Rows(dict):
    def __getitem__(self, key):
        if isinstance(key, list):
            return {k: [v[i] for i in key] for k, v in self.items()}
        return super().__getitem__(key)


def test_training_batches_restate_each_prompt_from_the_mask_they_train_on():
    rows = _Rows(_lidc_like_rows())
    config = AmbiSegTrainingConfig(resolution=16, prompt_style="slice", prompt_dropout=0.0, counterfactual_rate=1.0)
    stated, seen = [], 0
    for step in range(12):
        batch = training_batch(rows, [0, 1], config, step_generator(0, step))
        for mask, prompt in zip(batch["mask_values"], batch["prompts"]):
            if prompt == "stored nodule":  # the unread slot keeps its stored prompt and empty mask
                assert (mask == -1).all()
                continue
            seen += 1
            measured = feret_diameter((mask[0] > 0).numpy(), 0.5)
            assert stated_mm(prompt) == round(measured)
            stated.append(stated_mm(prompt))
    assert seen >= 8 and len(set(stated)) >= 4  # edited to many sizes (the real square is 4.2 mm; at most 6.4 here)
    real = training_batch(rows, [0, 1], config.override(counterfactual_rate=0.0), step_generator(0, 0))
    for mask, prompt in zip(real["mask_values"], real["prompts"]):
        assert prompt == "stored nodule" or ("The diameter is 4 mm." in prompt and (mask > 0).sum() == 36)
    again = training_batch(rows, [0, 1], config, step_generator(0, 5))
    first = training_batch(rows, [0, 1], config, step_generator(0, 5))
    assert again["prompts"] == first["prompts"] and torch.equal(again["mask_values"], first["mask_values"])


def test_prompt_cache_keeps_the_most_recent_entries(tokenizer):
    from conftest import tiny_text_encoder

    cache = PromptCache(tokenizer, tiny_text_encoder(), max_entries=2)
    first, _ = cache(["a nodule"])
    cache(["solid nodule", "round nodule"])
    assert list(cache._cache) == ["solid nodule", "round nodule"]  # "a nodule", the least recently used, dropped
    again, _ = cache(["a nodule"])
    torch.testing.assert_close(again, first)  # re-encoded, the same states


def test_benchmark_summary_by_hand():
    sizes = [3.0, 10.0, 25.0]
    records = [
        {"plain": {"produced_mm": [4.0, 9.0, 20.0], "empty_share": 0.0, "round_compactness": 0.9,
                   "elongated_compactness": 0.5}},
        {"plain": {"produced_mm": [8.0, 7.0, 12.0], "empty_share": 0.5, "round_compactness": 0.4,
                   "elongated_compactness": 0.6}},
    ]
    summary = benchmark.summarize(records, sizes, ["plain"])["plain"]
    assert summary["within_nodule_spearman"] == pytest.approx((1.0 + 0.5) / 2)
    assert summary["monotone_nodules"] == 0.5 and summary["shape_in_stated_direction"] == 0.5
    assert summary["mean_produced_mm"] == {"3.0": 6.0, "10.0": 8.0, "25.0": 16.0}
    stated, produced = np.array(sizes * 2), np.array([4.0, 9.0, 20.0, 8.0, 7.0, 12.0])
    assert summary["pooled_pearson"] == pytest.approx(np.corrcoef(stated, produced)[0, 1])
    assert summary["mean_abs_error_mm"] == pytest.approx(np.mean(np.abs(produced - stated)))


def test_benchmark_prompts_differ_in_one_statement():
    paper = benchmark.size_prompt("paper", "paper", RATINGS, 10.0)
    assert "The diameter is 10.0 mm. The volume is 524 mm3." in paper  # a sphere of 10 mm: 523.6 mm3
    assert benchmark.size_prompt("paper", "slice", RATINGS, 10.0) == ratings_to_prompt(RATINGS, "slice", 10.0)
    rounded, linear = benchmark.shape_prompts("paper", "slice", RATINGS, 8.0)
    assert rounded.replace("The sphericity is 5.", "The sphericity is 1.").replace(
        "The Sphericity is Round.", "The Sphericity is Linear.") == linear != rounded
    with pytest.raises(ValueError, match="states no size"):
        benchmark.size_prompt("paper", "short", RATINGS, 10.0)


@needs_data
def test_lidc64_rows_carry_the_pixel_spacing_and_each_slots_slice_diameter():
    rows = load_lidc64("mini", prompt_style="slice")
    row = rows[0]
    masks = np.asarray(row["masks"])
    assert row["pixel_spacing_mm"] == pytest.approx(0.703125)
    np.testing.assert_allclose(row["slice_diameter_mm"], [feret_diameter(m, 0.703125) for m in masks], rtol=1e-6)
    assert f"The diameter is {row['slice_diameter_mm'][0]:.0f} mm." in row["prompts"][0]


def test_slice_models_read_prompts_sentence_by_sentence(tokenizer):
    from conftest import make_pipeline, tiny_text_encoder

    from ambiseg_diffusers.text import encode_prompts, split_sentences

    assert split_sentences("A 12.5 mm round nodule. Solid!  No spiculation?") == [
        "A 12.5 mm round nodule.", "Solid!", "No spiculation?"]
    encoder = tiny_text_encoder()
    whole, whole_mask = encode_prompts(tokenizer, encoder, ["a round nodule. no spiculation."])
    parts = [encode_prompts(tokenizer, encoder, [s])[0][0] for s in ("a round nodule.", "no spiculation.")]
    by_sentence, mask = encode_prompts(tokenizer, encoder, ["a round nodule. no spiculation.", "solid."],
                                       by_sentence=True)
    assert mask.sum(1).tolist() == [len(parts[0]) + len(parts[1]), 4]  # [CLS] solid . [SEP]
    assert len(parts[0]) == 6  # [CLS] a round nodule . [SEP]
    torch.testing.assert_close(by_sentence[0], torch.cat(parts))
    assert whole_mask.sum() == len(parts[0]) + len(parts[1]) - 2  # one [CLS]/[SEP] pair instead of two
    assert not torch.allclose(whole[0, 1:4], parts[0][1:4])  # whole-prompt context changes the states
    pipe = make_pipeline(tokenizer)
    pipe.register_to_config(prompt_style="slice")
    embeds = pipe.encode_prompt("a round nodule. no spiculation.", "cpu", 1, False)[0]
    torch.testing.assert_close(embeds[0, : len(parts[0]) + len(parts[1])], torch.cat(parts))
