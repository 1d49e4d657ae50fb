"""Text control: what a prompt says about a mask, training pairs in which the text is needed, and the measures the
text-control benchmark (benchmarks/text_control.py) reads off the samples.

Why training pairs are edited: the raters' own prompts state sizes that differ little between raters of one
nodule while their masks differ at the boundary, so a model trained on them alone learns to read the image and
treat the size sentence as weak evidence. A *counterfactual* pair takes a rater's mask, grows or shrinks it to a drawn
diameter (optionally smoothing or roughening its boundary) and restates the prompt's size and shape sentences from
the edited mask: the image no longer tells the target's size, the text does (docs/design.md, "Text control").
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from scipy import ndimage

from .lidc import RATING_NAMES, feret_diameter, ratings_to_prompt

# Stated diameters the counterfactual masks are drawn at (mm, log-uniform): the benchmark's 3-25 mm and a margin.
COUNTERFACTUAL_DIAMETER_MM = (2.0, 32.0)
SHAPE_EDITS = ("none", "smooth", "rough")
# What a shape edit says: smoothing -> no spiculation or lobulation; roughening -> marked spiculation and lobulation.
SHAPE_RATINGS = {"smooth": {"spiculation": 1, "lobulation": 1}, "rough": {"spiculation": 5, "lobulation": 4}}


# ----------------------------------------------------------------------------------------------- measures
def boundary_length(mask: np.ndarray) -> float:
    """Perimeter estimate of a 2-D mask `(H, W)` in pixels: its 4-neighbour boundary edges times pi/4 (the mean
    ratio of a curve's length to its staircase length), so a digital disk measures close to 2 pi r."""
    padded = np.pad(np.asarray(mask, bool), 1)
    edges = np.count_nonzero(padded[1:, :] != padded[:-1, :]) + np.count_nonzero(padded[:, 1:] != padded[:, :-1])
    return edges * math.pi / 4


def compactness(mask: np.ndarray) -> float:
    """4 pi area / perimeter^2 of a 2-D mask (1 for a disk, lower for elongated or jagged shapes); nan if empty."""
    area = float(np.count_nonzero(mask))
    if area == 0:
        return float("nan")
    return 4 * math.pi * area / boundary_length(mask) ** 2


# ----------------------------------------------------------------------------------------------- counterfactuals
def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Pixels' distance to the mask's boundary, negative inside, positive outside `(H, W)` float."""
    mask = np.asarray(mask, bool)
    return ndimage.distance_transform_edt(~mask) - ndimage.distance_transform_edt(mask)


def resize_to_diameter(mask: np.ndarray, diameter_mm: float, pixel_spacing_mm: float) -> np.ndarray:
    """`mask` grown or shrunk along its signed distance until its Feret diameter is near `diameter_mm` (a grown
    or shrunk shape changes its diameter by about twice the offset: three corrections of the offset suffice); a mask
    that an erosion would erase becomes a disk of that diameter at its deepest point."""
    sdf = signed_distance(mask)
    offset, best, best_error = 0.0, np.asarray(mask, bool), float("inf")
    for _ in range(4):
        edited = sdf <= offset
        error = diameter_mm - feret_diameter(edited, pixel_spacing_mm)
        if edited.any() and abs(error) < best_error:
            best, best_error = edited, abs(error)
        if best_error <= pixel_spacing_mm / 2:
            break
        offset += error / pixel_spacing_mm / 2
    if best_error > pixel_spacing_mm:  # erased before it got that small: a disk of that size at the deepest point
        centre = np.unravel_index(np.argmin(sdf), sdf.shape)
        rows, cols = np.ogrid[: mask.shape[0], : mask.shape[1]]
        radius = max(diameter_mm / pixel_spacing_mm / 2 - 0.5, 0.0)
        best = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2
    return best


def smooth_boundary(mask: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """Blurred and re-thresholded: corners rounded, spikes and notches gone (compactness rises)."""
    blurred = ndimage.gaussian_filter(np.asarray(mask, np.float32), sigma)
    smoothed = blurred >= 0.5
    return smoothed if smoothed.any() else np.asarray(mask, bool)


def roughen_boundary(mask: np.ndarray, rng: np.random.Generator, amplitude: float = 1.6,
                     spikes: int = 6) -> np.ndarray:
    """A jagged boundary: the signed distance perturbed by a fine random field (lobulation), plus thin radial
    spikes of a third to two thirds of the nodule's radius (spiculation). Compactness falls."""
    mask = np.asarray(mask, bool)
    field = ndimage.gaussian_filter(rng.standard_normal(mask.shape), 0.8)
    field *= amplitude / max(float(np.abs(field).max()), 1e-6)
    rough = signed_distance(mask) + field <= 0
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return mask
    centre = np.array([rows.mean(), cols.mean()])
    edge = np.argwhere(mask & ~ndimage.binary_erosion(mask, border_value=0))
    radius = math.sqrt(rows.size / math.pi)
    for point in edge[rng.choice(len(edge), size=min(spikes, len(edge)), replace=False)]:
        direction = point - centre
        direction = direction / max(float(np.linalg.norm(direction)), 1e-6)
        for step in np.arange(0.0, rng.uniform(0.3, 0.7) * radius + 1.0, 0.5):  # spikes in proportion to the nodule
            r, c = np.round(point + direction * step).astype(int)
            if 0 <= r < mask.shape[0] and 0 <= c < mask.shape[1]:
                rough[r, c] = True
    return rough if rough.any() else mask


def counterfactual_pair(mask: np.ndarray, ratings: Mapping[str, int], pixel_spacing_mm: float,
                        rng: np.random.Generator, shape_rate: float = 0.5) -> tuple[np.ndarray, dict[str, int], float]:
    """One edited training pair from a rater's non-empty mask `(H, W)`: a diameter drawn log-uniformly in
    `COUNTERFACTUAL_DIAMETER_MM` (capped by what the crop holds), then, with probability `shape_rate`, a smoothed or
    roughened boundary. Returns the edited mask (bool), the ratings with the shape edit's spiculation and lobulation,
    and the edited mask's measured diameter (mm), which the prompt states."""
    low, high = COUNTERFACTUAL_DIAMETER_MM
    high = min(high, 0.8 * mask.shape[0] * pixel_spacing_mm)
    target = math.exp(rng.uniform(math.log(low), math.log(high)))
    edited = resize_to_diameter(mask, target, pixel_spacing_mm)
    ratings = dict(ratings)
    edit = SHAPE_EDITS[0] if rng.uniform() >= shape_rate else SHAPE_EDITS[1 + int(rng.integers(2))]
    if edit == "smooth":
        edited = smooth_boundary(edited)
    elif edit == "rough":
        edited = roughen_boundary(edited, rng)
    ratings.update(SHAPE_RATINGS.get(edit, {}))
    return edited, ratings, feret_diameter(edited, pixel_spacing_mm)


# ----------------------------------------------------------------------------------------------- prompt forms
_TEXTURE = ("ground-glass", "mostly ground-glass", "part-solid", "mostly solid", "solid")
_SHAPE = ("linear", "ovoid-linear", "ovoid", "roundish", "round")
_MARGIN = ("a poorly defined margin", "a fairly poorly defined margin", "a medium margin", "a fairly sharp margin",
           "a sharp margin")


def _spiculation_phrases(score: int) -> tuple[str, ...]:
    if score <= 2:
        return ("a smooth margin", "no spiculation", "a smooth outline")
    if score == 3:
        return ("some spiculation", "medium spiculation")
    return ("marked spiculation", "a spiculated margin", "spiculation")


def plain_prompt(ratings: Mapping[str, int], diameter_mm: float, rng: np.random.Generator) -> str:
    """One short sentence a user might type, drawn from a few templates with a random subset of the ratings it
    mentions, always with the diameter in whole millimetres: "A 12 mm round nodule with a smooth margin.",
    "Solid nodule, 8 mm, with marked spiculation.". Training on such forms beside the paper's prompt lets a plain
    sentence steer the model."""
    size = f"{diameter_mm:.0f} mm"
    adjectives = [words[ratings[name] - 1] for name, words in (("texture", _TEXTURE), ("sphericity", _SHAPE))
                  if rng.uniform() < 0.5]
    details = [str(rng.choice(_spiculation_phrases(ratings["spiculation"])))] if rng.uniform() < 0.7 else []
    if rng.uniform() < 0.3:
        details.append(_MARGIN[ratings["margin"] - 1])
    noun = " ".join(adjectives + ["nodule"]) if not adjectives else ", ".join(adjectives) + " nodule"
    tail = f" with {' and '.join(details)}" if details else ""
    if rng.uniform() < 0.7:
        text = f"A {size} {noun}{tail}."
    else:
        text = f"{noun[0].upper() + noun[1:]}, {size}{tail}."
    return text


def training_prompt(ratings: Mapping[str, int], diameter_mm: float, rng: np.random.Generator,
                    plain_rate: float) -> str:
    """The prompt of one training pair in style "slice": the paper's form, or with probability `plain_rate` a plain
    sentence (`plain_prompt`), both stating the target mask's diameter on this slice."""
    if rng.uniform() < plain_rate:
        return plain_prompt(ratings, diameter_mm, rng)
    return ratings_to_prompt(ratings, "slice", diameter_mm=diameter_mm)


def ratings_of(row_ratings: np.ndarray) -> dict[str, int]:
    """One rater's `(9,)` LIDC scores -> the mapping `ratings_to_prompt` reads."""
    return dict(zip(RATING_NAMES, np.asarray(row_ratings).astype(int).tolist()))


def as_bool_mask(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(mask.cpu().numpy() if isinstance(mask, torch.Tensor) else mask) > 0.5
