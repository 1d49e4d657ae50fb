"""The wheel carries the model-card templates of the top-level model_cards/ folder (built here, no network)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_every_card_template_inside_the_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("ambiseg_diffusers-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = sorted(p.name for p in (ROOT / "model_cards").glob("*.md"))
    assert templates and all(f"ambiseg_diffusers/model_cards/{name}" in names for name in templates)
    assert "ambiseg_diffusers/pipelines/pipeline_ambiseg.py" in names and "ambiseg_diffusers/models/unet_ambiseg.py" in names
    # the example crop of the cards' snippets, with its CC BY 3.0 attribution
    assert {"ambiseg_diffusers/assets/lidc_example.npz", "ambiseg_diffusers/assets/README.md"} <= names


def test_the_example_crop_is_a_real_nodule_with_its_raters_and_attribution():
    from ambiseg_diffusers.assets import ATTRIBUTION, example_image, example_masks, example_prompt

    image, masks = example_image(), example_masks()
    assert image.shape == (64, 64) and image.dtype == np.float32 and image.std() > 0.5
    assert masks.shape == (3, 64, 64) and all(100 < m.sum() < 400 for m in masks)  # three readings of one nodule
    assert image[masks.any(0)].mean() > image[~masks.any(0)].mean() + 0.5  # the nodule is brighter than its surround
    assert "The diameter is 14.3 mm." in example_prompt("paper") and "CC BY 3.0" in ATTRIBUTION
