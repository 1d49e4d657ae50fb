import numpy as np
import pytest
import torch

from ambiseg_diffusers.metrics import compute_metrics, compute_metrics_batch, format_table, summarize


def masks(*pixel_lists, size=4):
    out = np.zeros((len(pixel_lists), size, size), bool)
    for i, pixels in enumerate(pixel_lists):
        for r, c in pixels:
            out[i, r, c] = True
    return out


def test_identical_sets_are_perfect():
    g = masks([(0, 0), (0, 1)], [(1, 1), (2, 2), (1, 2)])
    m = compute_metrics(g, g)
    # GED of a set against itself is 0; coverage, D_max and DA are 1.
    assert m["ged"] == pytest.approx(0.0) and m["ged_iou"] == pytest.approx(0.0)
    assert m["sc"] == 1.0 and m["dmax"] == 1.0 and m["da"] == 1.0 and m["ci"] == pytest.approx(1.0)
    # avg Dice over all 4 pairs: two self pairs at 1, two disjoint pairs at 0.
    assert m["avg_dice"] == pytest.approx(0.5)


def test_hand_computed_case():
    # s1 = {a, b}, s2 = {a}; g1 = {a}, g2 = {c}
    s = masks([(0, 0), (0, 1)], [(0, 0)])
    g = masks([(0, 0)], [(3, 3)])
    m = compute_metrics(s, g)
    d = {("s1", "g1"): 2 / 3, ("s1", "g2"): 0.0, ("s2", "g1"): 1.0, ("s2", "g2"): 0.0}
    cross = np.mean([1 - v for v in d.values()])  # 1 - Dice over the 4 pairs
    within_s = (0 + 2 * (1 - 2 / 3) + 0) / 4  # ordered pairs, diagonal included
    within_g = (0 + 2 * 1 + 0) / 4
    assert m["ged"] == pytest.approx(2 * cross - within_s - within_g)
    iou = {("s1", "g1"): 0.5, ("s2", "g1"): 1.0}
    assert m["ged_iou"] == pytest.approx(2 * np.mean([1 - iou.get(k, 0) for k in d]) - (2 * 0.5) / 4 - 2 / 4)
    assert m["sc"] == pytest.approx(0.5)  # union(G) = {a, c}, covered: a
    assert m["dmax"] == pytest.approx((1.0 + 0.0) / 2)
    # V over distinct pairs: samples {1/3}, raters {1}; DA = 1 - (|1/3 - 1| + |1/3 - 1|) / 2
    assert m["da"] == pytest.approx(1 - (2 / 3 + 2 / 3) / 2)
    sc, dmax, da = 0.5, 0.5, 1 / 3
    assert m["ci"] == pytest.approx(3 * sc * dmax * da / (sc * dmax + dmax * da + sc * da))
    assert m["avg_dice"] == pytest.approx(np.mean(list(d.values())))
    assert m["avg_iou"] == pytest.approx((0.5 + 0 + 1 + 0) / 4)


def test_empty_masks_follow_the_documented_convention():
    empty = np.zeros((2, 4, 4), bool)
    m = compute_metrics(empty, empty)
    assert m["avg_dice"] == 1.0 and m["avg_iou"] == 1.0 and m["ged"] == 0.0 and m["sc"] == 1.0
    # A model that predicts something where every rater saw nothing: Dice 0 against each.
    some = masks([(1, 1)], [(1, 1)])
    m = compute_metrics(some, empty)
    assert m["avg_dice"] == 0.0 and m["sc"] == 1.0 and m["dmax"] == 0.0 and m["ci"] == 0.0
    assert m["ged"] == pytest.approx(2.0)


def test_single_sample_sets():
    s = masks([(0, 0), (0, 1)])
    g = masks([(0, 0)])
    m = compute_metrics(s, g)
    assert m["da"] == 1.0  # both sets have V_min = V_max = 0
    assert m["ged"] == pytest.approx(2 * (1 - 2 / 3))
    assert m["dmax"] == pytest.approx(2 / 3)


def test_batch_matches_single_and_torch_matches_numpy():
    rng = np.random.default_rng(0)
    s = rng.random((3, 5, 8, 8)) > 0.6
    g = rng.random((3, 4, 8, 8)) > 0.6
    batch = compute_metrics_batch(s, g)
    for b in range(3):
        single = compute_metrics(torch.from_numpy(s[b]), torch.from_numpy(g[b]))
        for key, value in single.items():
            assert batch[key][b] == pytest.approx(value)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="samples"):
        compute_metrics(np.zeros((4, 4)), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="mismatch"):
        compute_metrics_batch(np.zeros((1, 2, 4, 4)), np.zeros((1, 2, 5, 5)))


@pytest.mark.parametrize("bad,match", [
    (np.full((1, 2, 4, 4), 0.7), "binary"),             # probabilities
    (np.where(np.eye(4) > 0, 1, -1)[None, None].repeat(2, 1), "binary"),  # {-1, 1} model-range masks
    (np.full((1, 2, 4, 4), np.nan), "NaN"),
    (torch.full((1, 2, 4, 4), 2.0), "binary"),
])
def test_non_binary_or_nan_masks_are_refused(bad, match):
    good = np.zeros((1, 2, 4, 4), bool)
    with pytest.raises(ValueError, match=f"`samples`.*{match}|{match}.*`samples`"):
        compute_metrics_batch(bad, good)
    with pytest.raises(ValueError, match=f"`annotations`.*{match}|{match}.*`annotations`"):
        compute_metrics_batch(good, bad)
    # 0/1 integers and floats are binary masks too, and give the bool result.
    ones = np.zeros((1, 2, 4, 4))
    ones[0, 0, :2, :2] = 1
    assert compute_metrics_batch(ones, ones.astype(np.uint8)) == compute_metrics_batch(ones > 0, ones > 0)


def test_summary_and_table():
    summary = summarize({k: np.array([0.2, 0.4]) for k in ("ged", "ged_iou", "sc", "dmax", "da", "ci", "avg_dice", "avg_iou")})
    assert summary["ged"]["mean"] == pytest.approx(0.3)
    assert 0.2 <= summary["ged"]["low"] <= summary["ged"]["high"] <= 0.4
    table = format_table({"model": summary})
    assert "| model | 0.300 |" in table
