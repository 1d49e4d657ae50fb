"""Version 0.1's pipeline settings, read so that folders saved by it load with the settings they were saved with.

Version 0.1 wrote a pipeline's settings (image clip, default steps, autocast, prompt style) into a private
`_pipeline_settings` entry of its model's config (the UNet's, or the Probabilistic U-Net's), and `image_clip` /
`default_num_inference_steps` into `model_index.json`. Since 0.2 the image settings live in the image processor
component, the step count is `__call__`'s default and the rest is the pipeline's `model_index.json` configuration;
nothing writes the record any more.
"""

from __future__ import annotations

from typing import Any

RECORD_KEY = "_pipeline_settings"


def legacy_settings(model, **given) -> dict[str, Any]:
    """The settings a version-0.1 `model` recorded, each overridden by a `given` value that is not None (the old
    `model_index.json` keys diffusers passes to `__init__`). Empty for a model saved by 0.2 or later."""
    recorded = dict((model.config.get(RECORD_KEY) or {}) if model is not None else {})
    recorded.update({name: value for name, value in given.items() if value is not None})
    return recorded
