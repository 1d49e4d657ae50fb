"""Pipeline settings that survive `Pipeline(**pipe.components)`.

diffusers' `components` holds a pipeline's modules only (its own pipeline tests check exactly that), so a pipeline
rebuilt from them, diffusers' documented way to share models between pipelines, starts from the class defaults: for
this package a silently different number of denoising steps (2 -> 20 for the committed checkpoint), image
normalisation or prompt form. So each pipeline also records its settings on the model the settings describe (the
UNet, or the Probabilistic U-Net) as one private config entry, which diffusers keeps through `save_pretrained`,
`from_pretrained` and `copy.deepcopy`; a pipeline built without a setting takes the value recorded there.
"""

from __future__ import annotations

from typing import Any

RECORD_KEY = "_pipeline_settings"


class SettingsOnModelMixin:
    """For a `DiffusionPipeline` whose `__init__` takes its settings as keyword arguments defaulting to `None`.

    `_setting_defaults`: {setting: value when neither given nor recorded}. `_settings_model`: the component that
    carries the record, written when the pipeline is built or its settings change, and again when its `components`
    are taken or it is saved (a model shared by two pipelines holds the last one's until then).
    """

    _setting_defaults: dict[str, Any] = {}
    _settings_model: str = ""

    def _resolve_settings(self, model, **given) -> dict[str, Any]:
        """Each setting: the given value, else the one recorded on `model`, else the class default."""
        recorded = (model.config.get(RECORD_KEY) or {}) if model is not None else {}
        return {name: given[name] if given.get(name) is not None else recorded.get(name, default)
                for name, default in self._setting_defaults.items()}

    def _record_settings(self, **settings) -> None:
        """Writes `settings` (default: all of this pipeline's) into the record on the carrying model."""
        model = self.__dict__.get(self._settings_model)  # not getattr: ConfigMixin would answer from the config
        settings = settings or {name: self.config[name] for name in self._setting_defaults if name in self.config}
        if not settings or model is None or not hasattr(model, "register_to_config"):
            return
        recorded = model.config.get(RECORD_KEY) or {}
        if any(recorded.get(name) != value for name, value in settings.items()):  # diffusers reads `components`
            # several times a call (`_execution_device`, offload hooks): write only what changed
            model.register_to_config(**{RECORD_KEY: {**recorded, **settings}})

    def register_to_config(self, **kwargs) -> None:
        super().register_to_config(**kwargs)
        settings = {k: v for k, v in kwargs.items() if k in self._setting_defaults}
        if settings:
            self._record_settings(**settings)

    @property
    def components(self) -> dict[str, Any]:
        # Recorded again where they are handed over: a model shared with another pipeline, or assigned with
        # `pipe.unet = ...`, carries this pipeline's settings into the one built from these components.
        self._record_settings()
        return super().components

    def save_pretrained(self, save_directory, **kwargs) -> None:
        self._record_settings()  # the saved model's record agrees with the saved model_index.json
        return super().save_pretrained(save_directory, **kwargs)
