"""One real LIDC-IDRI crop shipped with the package, for examples and model-card snippets that should segment
something (random noise gives empty masks, which looks broken).

The crop is slice 5 of nodule `0720_0` (patient LIDC-IDRI-0720) of the `lidc64` validate split (its `mini` view: the
nodule's largest-consensus slice), 64x64 pixels of 0.63 mm, stored as in lidc64 (z-scored), with the masks, the nine
ratings and the diameter and volume of the three radiologists who read it. It comes from LIDC-IDRI under CC BY 3.0:
`ATTRIBUTION` (also in this folder's README.md).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

EXAMPLE_FILE = Path(__file__).with_name("lidc_example.npz")
EXAMPLE_SOURCE = {"patient_id": "LIDC-IDRI-0720", "nodule_id": "0720_0", "slice": 5, "split": "validate",
                  "pixel_spacing_mm": 0.62890625}
ATTRIBUTION = (
    "Example crop from LIDC-IDRI (patient LIDC-IDRI-0720), distributed by The Cancer Imaging Archive under CC BY 3.0 "
    "(https://creativecommons.org/licenses/by/3.0/). Armato III, S. G., et al. (2011) \"The Lung Image Database "
    "Consortium (LIDC) and Image Database Resource Initiative (IDRI)\", Medical Physics 38(2), 915-931; Armato III, "
    "S. G., et al. (2015) Data from LIDC-IDRI, TCIA, doi:10.7937/K9/TCIA.2015.LO9QL9SX. Cropped and z-scored."
)


@lru_cache(maxsize=1)
def _example() -> dict[str, np.ndarray]:
    with np.load(EXAMPLE_FILE) as stored:
        return {key: stored[key] for key in stored.files}


def example_image() -> np.ndarray:
    """The example CT crop, `(64, 64)` float32 as stored in lidc64 (z-scored; the pipelines take any value range)."""
    return _example()["image"].copy()


def example_masks() -> np.ndarray:
    """Its three radiologists' masks, `(3, 64, 64)` bool."""
    return _example()["masks"].copy()


def example_prompt(style: str = "paper", rater: int = 0) -> str:
    """The prompt of one of its radiologists (`rater` 0-2) in a model's `prompt_style`, as training built them:
    `example_prompt(pipe.config.prompt_style)`. Style "slice" is measured from that rater's mask on this slice."""
    from ..lidc import RATING_NAMES, feret_diameter, ratings_to_prompt

    example = _example()
    ratings = dict(zip(RATING_NAMES, example["ratings"][rater].tolist()))
    if style == "slice":
        diameter = feret_diameter(example["masks"][rater], EXAMPLE_SOURCE["pixel_spacing_mm"])
        return ratings_to_prompt(ratings, style=style, diameter_mm=diameter)
    return ratings_to_prompt(ratings, style=style, diameter_mm=float(example["diameter_mm"][rater]),
                             volume_mm3=float(example["volume_mm3"][rater]))
