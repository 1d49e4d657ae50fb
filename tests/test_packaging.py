"""The wheel carries the model-card templates of the top-level model_cards/ folder (built here, no network)."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_every_card_template_inside_the_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("ambiseg_diffusers-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = sorted(p.name for p in (ROOT / "model_cards").glob("*.md"))
    assert templates and all(f"ambiseg_diffusers/model_cards/{name}" in names for name in templates)
    assert "ambiseg_diffusers/pipelines/pipeline_ambiseg.py" in names and "ambiseg_diffusers/models/unet_ambiseg.py" in names
