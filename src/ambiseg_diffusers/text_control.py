"""Text control: what a prompt says about a mask, training pairs in which the text is needed, and the measures the
text-control benchmark (benchmarks/text_control.py) reads off the samples.

Why training pairs are edited: the raters' own prompts state sizes that differ little between raters of one
nodule while their masks differ at the boundary, so a model trained on them alone learns to read the image and
treat the size sentence as weak evidence. A *counterfactual* pair takes a rater's mask, grows or shrinks it to a drawn
diameter (optionally rounding it into a disk or stretching it along its long axis) and restates the prompt's size
and shape sentences from the edited mask: the image no longer tells the target's size, the text does (docs/design.md, "Text control").
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
SHAPE_EDITS = ("none", "round", "elongated")
# What a shape edit says (the LIDC sphericity rating): a disk -> 5 "Round"; stretched -> 1 "Linear" or 2
# "Ovoid/Linear". Sphericity, not spiculation: a roughened boundary's spikes fall at random places, so the
# x0-predicting denoiser learns their mean, a smooth outline (tried: 625 steps with every edited pair smoothed or
# roughened moved compactness in the stated direction for 4 and 1 of 10 selection nodules); a disk or a stretch
# along the mask's own long axis is a shape the image and the text together decide.
SHAPE_RATINGS = {"round": {"sphericity": 5}, "elongated": {"sphericity": 1}}


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
def resize_to_diameter(mask: np.ndarray, diameter_mm: float, pixel_spacing_mm: float) -> np.ndarray:
    """`mask` scaled about its centroid until its Feret diameter is near `diameter_mm`: the rater's shape kept (an
    elongated mask stays elongated, so the stated longest axis means what it means on real masks; growing along the
    signed distance instead turned every large target into a round blob, and the model then drew blobs twice the
    raters' area for their own stated diameters). A mask the scaling would erase becomes a disk of that diameter at
    its centroid."""
    mask = np.asarray(mask, bool)
    rows, cols = np.nonzero(mask)
    centre = np.array([rows.mean(), cols.mean()])
    factor, best, best_error = 1.0, mask, float("inf")
    for _ in range(3):  # the corners of the scaled pixels shift the diameter a little: two corrections
        factor *= diameter_mm / max(feret_diameter(best, pixel_spacing_mm), pixel_spacing_mm) if best.any() else 1.0
        scaled = ndimage.affine_transform(mask.astype(np.float32), np.eye(2) / factor, offset=centre - centre / factor,
                                          order=1, mode="constant") >= 0.5
        error = abs(feret_diameter(scaled, pixel_spacing_mm) - diameter_mm)
        if scaled.any() and error < best_error:
            best, best_error = scaled, error
        if best_error <= pixel_spacing_mm / 2:
            break
    if best_error > pixel_spacing_mm:
        grid_rows, grid_cols = np.ogrid[: mask.shape[0], : mask.shape[1]]
        radius = max(diameter_mm / pixel_spacing_mm / 2 - 0.5, 0.0)
        best = (grid_rows - round(centre[0])) ** 2 + (grid_cols - round(centre[1])) ** 2 <= radius**2
    return best


def round_shape(mask: np.ndarray) -> np.ndarray:
    """A disk of the mask's area at its centroid (compactness near 1)."""
    mask = np.asarray(mask, bool)
    rows, cols = np.nonzero(mask)
    grid_rows, grid_cols = np.ogrid[: mask.shape[0], : mask.shape[1]]
    radius = math.sqrt(rows.size / math.pi)
    return (grid_rows - rows.mean()) ** 2 + (grid_cols - cols.mean()) ** 2 <= radius**2


def elongate(mask: np.ndarray, stretch: float) -> np.ndarray:
    """The mask's aspect ratio multiplied by `stretch` about its centroid: longer by `sqrt(stretch)` along its long
    (principal) axis, narrower by as much across it, so its area stays (compactness falls)."""
    mask = np.asarray(mask, bool)
    points = np.argwhere(mask).astype(np.float64)
    centre = points.mean(0)
    if len(points) < 2:
        return mask
    _, vectors = np.linalg.eigh(np.cov((points - centre).T) + 1e-6 * np.eye(2))
    axes = vectors[:, ::-1]  # columns: the long axis, then the short one
    scale = axes @ np.diag([math.sqrt(stretch), 1 / math.sqrt(stretch)]) @ axes.T  # output = centre + scale (input - centre)
    inverse = np.linalg.inv(scale)
    stretched = ndimage.affine_transform(mask.astype(np.float32), inverse, offset=centre - inverse @ centre, order=1,
                                         mode="constant") >= 0.5
    return stretched if stretched.any() else mask


def counterfactual_pair(mask: np.ndarray, ratings: Mapping[str, int], pixel_spacing_mm: float,
                        rng: np.random.Generator, shape_rate: float = 0.5) -> tuple[np.ndarray, dict[str, int], float]:
    """One edited training pair from a rater's non-empty mask `(H, W)`: with probability `shape_rate` first rounded
    into a disk or stretched (aspect ratio x1.6-2.6) along its long axis, then scaled to a diameter drawn log-uniformly in
    `COUNTERFACTUAL_DIAMETER_MM` (capped by what the crop holds). Returns the edited mask (bool), the ratings with the
    shape edit's sphericity, and the edited mask's measured diameter (mm), which the prompt states."""
    low, high = COUNTERFACTUAL_DIAMETER_MM
    high = min(high, 0.8 * mask.shape[0] * pixel_spacing_mm)
    target = math.exp(rng.uniform(math.log(low), math.log(high)))
    edit = SHAPE_EDITS[0] if rng.uniform() >= shape_rate else SHAPE_EDITS[1 + int(rng.integers(2))]
    edited = np.asarray(mask, bool)
    if edit == "round":
        edited = round_shape(edited)
    elif edit == "elongated":
        edited = elongate(edited, rng.uniform(1.6, 2.6))
    edited = resize_to_diameter(edited, target, pixel_spacing_mm)
    ratings = {**ratings, **SHAPE_RATINGS.get(edit, {})}
    return edited, ratings, feret_diameter(edited, pixel_spacing_mm)


# ----------------------------------------------------------------------------------------------- prompt forms
_TEXTURE = ("ground-glass", "mostly ground-glass", "part-solid", "mostly solid", "solid")
_SHAPE = (("linear", "elongated"), ("ovoid-linear", "elongated"), ("ovoid",), ("roundish",), ("round",))
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
    adjectives = [_TEXTURE[ratings["texture"] - 1]] if rng.uniform() < 0.5 else []
    if rng.uniform() < 0.7:
        adjectives.append(str(rng.choice(_SHAPE[ratings["sphericity"] - 1])))
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
