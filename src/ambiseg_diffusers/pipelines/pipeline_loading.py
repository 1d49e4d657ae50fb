"""Loading and saving of `AmbiSegPipeline`: adapter folders (a TDG-DiffDPO adapter, a distilled sampler) on their
base, weights checked before and after loading, a LoRA saved beside the base weights, the Hub; and the preference
adapter's scale for one call."""

from __future__ import annotations

import contextlib
import copy
import json
import os

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging

from ..hub_utils import (
    BASE_DOWNLOAD_KWARGS, check_finite_weights, check_pipeline_class, check_weight_files, download_kwargs_of, model_card,
    resolve_pretrained_path,
)
from .custom_code import own_loader, pop_hub_kwargs, upload_saved_folder

logger = logging.get_logger(__name__)

# A folder holding a LoRA adapter (`pytorch_lora_weights.safetensors`) says which adapter it is and, when the base
# pipeline is not in the same folder, which base it belongs to.
ADAPTER_FILE = "preference.json"
PREFERENCE_ADAPTER = "preference"
# A distilled few-call sampler (training/train_consistency.py): a LoRA, an LCMScheduler in scheduler/ and this file.
CONSISTENCY_FILE = "consistency.json"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def recommended_steps(pretrained_model_name_or_path: str | os.PathLike) -> int | None:
    """The number of denoising steps a local folder states for itself: a distilled sampler's (`consistency.json`),
    else None (`__call__`'s default)."""
    info = os.path.join(str(pretrained_model_name_or_path), CONSISTENCY_FILE)
    if not os.path.isfile(info):
        return None
    with open(info) as f:
        return int(json.load(f)["num_inference_steps"])


class AmbiSegLoadingMixin:
    """`from_pretrained`, `save_pretrained` and `push_to_hub` of `AmbiSegPipeline` (before diffusers' own in the
    method order), and the preference adapter's scale."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> DiffusionPipeline:
        """Loads from a local folder or a Hub repo id, as float32 unless `dtype` is given (checkpoints may be stored
        in fp16 to stay small; CPUs compute in float32 or bf16 autocast).

        diffusers' own download step only accepts components from diffusers or transformers, so a Hub repo is
        fetched whole with `huggingface_hub.snapshot_download` (which honours `HF_HUB_OFFLINE` and the cache).

        A LoRA folder loads its base pipeline first: the one in the same folder, else `base_model_path` (relative to
        the folder, for checkouts) when it exists, else the Hub repo `base_model`; `base_model=...` overrides all
        three. Two kinds: a TDG-DiffDPO adapter (`preference.json` + `pytorch_lora_weights.safetensors`), and a
        distilled sampler (`consistency.json` + the LoRA + an `LCMScheduler` in `scheduler/`, from
        training/train_consistency.py), which also sets the scheduler and the default number of calls.
        """
        download_kwargs = download_kwargs_of(kwargs)
        base_override = kwargs.pop("base_model", None)
        if "torch_dtype" not in kwargs:
            kwargs.setdefault("dtype", torch.float32)
        path = resolve_pretrained_path(pretrained_model_name_or_path, **download_kwargs)
        info_file = next((os.path.join(path, name) for name in (ADAPTER_FILE, CONSISTENCY_FILE)
                          if os.path.isfile(os.path.join(path, name))), None)
        if info_file is None:
            return cls._load_checked(path, **kwargs)

        with open(info_file) as f:
            info = json.load(f)
        if base_override is not None:
            base = base_override
        elif os.path.isfile(os.path.join(path, "model_index.json")):
            base = path
        else:
            local = os.path.normpath(os.path.join(path, info["base_model_path"])) if info.get("base_model_path") else None
            base = local if local and os.path.isdir(local) else info.get("base_model")
            if base is None:
                raise ValueError(f"{info_file} names no `base_model`; pass `base_model=` (a folder or Hub id).")
        if base == path:
            pipe = cls._load_checked(path, **kwargs)
        else:
            base_kwargs = {k: v for k, v in download_kwargs.items() if k in BASE_DOWNLOAD_KWARGS}
            pipe = cls.from_pretrained(base, **kwargs, **base_kwargs)
        pipe._apply_adapter_folder(path, info_file)
        return pipe

    def _apply_adapter_folder(self, path: str, info_file: str) -> None:
        """Loads the LoRA adapter of `path` (its `info_file`: `preference.json` or `consistency.json`) onto this
        pipeline, and for a distilled sampler its LCMScheduler (and a warning naming its number of calls)."""
        with open(info_file) as f:
            info = json.load(f)
        earlier = list(getattr(self.unet, "peft_config", None) or {})
        name = info.get("adapter_name", PREFERENCE_ADAPTER)
        self.load_lora_weights(path, weight_name=LORA_WEIGHT_NAME, adapter_name=name)
        if earlier:  # a distilled sampler on an aligned model: both adapters act
            self.set_adapters(earlier + [name])
        if info_file.endswith(CONSISTENCY_FILE):
            from diffusers import LCMScheduler

            self.scheduler = LCMScheduler.from_pretrained(path, subfolder="scheduler")
            logger.warning(f"{path} is a sampler distilled for {info['num_inference_steps']} UNet calls: call it with "
                           f"`num_inference_steps={info['num_inference_steps']}` (`__call__`'s default is the base "
                           "model's recommendation).")

    def _loaded_by_diffusers(self, name_or_path) -> None:
        """`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` built this pipeline from the folder's
        components only: its adapter (a TDG-DiffDPO or distilled folder) is applied here, as
        `AmbiSegPipeline.from_pretrained` applies it, instead of being dropped."""
        try:
            path = resolve_pretrained_path(name_or_path, local_files_only=True)  # diffusers has just fetched it
        except (OSError, FileNotFoundError):
            return
        info_file = next((os.path.join(path, name) for name in (ADAPTER_FILE, CONSISTENCY_FILE)
                          if os.path.isfile(os.path.join(path, name))), None)
        if info_file is not None and not getattr(self.unet, "peft_config", None):
            logger.info(f"{name_or_path} holds a LoRA adapter ({os.path.basename(info_file)}): applied, as "
                        "AmbiSegPipeline.from_pretrained does")
            self._apply_adapter_folder(path, info_file)

    @classmethod
    def _load_checked(cls, path: str, **kwargs) -> DiffusionPipeline:
        """diffusers' loading, between two cheap checks: weight files present and readable before, every weight
        finite after (a corrupted file must not load silently and give empty masks)."""
        check_pipeline_class(path, cls)
        check_weight_files(path)
        with own_loader():  # the caller applies the folder's adapter itself
            pipe = super().from_pretrained(path, **kwargs)
        check_finite_weights(pipe, path)
        return pipe

    @classmethod
    def load_lora_into_text_encoder(cls, state_dict, network_alphas, text_encoder, prefix=None, *args, **kwargs):
        """The text encoder is frozen and never adapted: skip it (quietly) unless the file has keys for it."""
        prefix = prefix or cls.text_encoder_name
        if any(key.startswith(f"{prefix}.") for key in state_dict):
            super().load_lora_into_text_encoder(state_dict, network_alphas, text_encoder, prefix, *args, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Saves every component (safetensors). A LoRA adapter on the UNet is saved the standard way beside the base
        weights (`pytorch_lora_weights.safetensors` + `preference.json`), never folded into the UNet's keys; to
        save one merged model instead, `fuse_lora()` and `unload_lora_weights()` first."""
        adapters = list(getattr(self.unet, "peft_config", None) or {})
        if not adapters:
            return super().save_pretrained(save_directory, **kwargs)
        push_to_hub, hub = kwargs.pop("push_to_hub", False), pop_hub_kwargs(kwargs)  # uploaded once complete
        if len(adapters) > 1:
            raise ValueError(f"the UNet carries several LoRA adapters {adapters}; delete all but one "
                             "(`delete_adapters`) or fuse them (`fuse_lora`, `unload_lora_weights`) before saving.")
        from peft.utils import get_peft_model_state_dict

        name = adapters[0]
        if any(getattr(m, "merged_adapters", None) for m in self.unet.modules()):
            raise ValueError("the UNet's adapter is fused into its weights (`fuse_lora`): saving both would apply it "
                             "twice on loading. `unload_lora_weights()` first (keeps the fused weights, one merged "
                             "model), or `unfuse_lora()` (base weights + adapter).")
        with_adapter = self.unet
        base = copy.deepcopy(with_adapter)
        base.unload_lora()  # the base weights, without peft's wrapping
        try:
            self.unet = base
            super().save_pretrained(save_directory, **kwargs)
        finally:
            self.unet = with_adapter
        self.save_lora_weights(
            save_directory, unet_lora_layers=get_peft_model_state_dict(with_adapter, adapter_name=name),
            weight_name=LORA_WEIGHT_NAME, unet_lora_adapter_metadata=with_adapter.peft_config[name].to_dict(),
        )
        with open(os.path.join(save_directory, ADAPTER_FILE), "w") as f:
            json.dump({"adapter_name": name}, f, indent=2)
        if push_to_hub:
            upload_saved_folder(save_directory, hub)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        model_card: str | None = None,
    ) -> str:
        """Saves the pipeline (safetensors) with a model card (`model_card` text, or one built from this package's
        template: `library_name`, tags, the clinical-use warning, the LIDC-IDRI attribution) and uploads it."""
        import tempfile

        from huggingface_hub import create_repo, upload_folder

        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            card = model_card if model_card is not None else str(
                _default_card(repo_id, lidc=self.config.get("prompt_style") != "free"))
            with open(os.path.join(folder, "README.md"), "w") as f:
                f.write(card)
            return upload_folder(
                repo_id=repo_id, folder_path=folder, token=token, create_pr=create_pr,
                commit_message=commit_message or "Upload AmbiSegPipeline",
            )

    @contextlib.contextmanager
    def _preference_scale(self, scale: float | None):
        """Scales the "preference" LoRA adapter by `scale` for one call and restores it after (None: leave the
        adapters as `set_adapters` left them)."""
        if scale is None:
            yield
            return
        layers = [m for m in (self.unet.modules() if self.unet is not None else [])
                  if hasattr(m, "set_scale") and PREFERENCE_ADAPTER in getattr(m, "scaling", {})]
        if not layers:
            named = list(getattr(self.unet, "peft_config", None) or {})
            if named:
                raise ValueError(
                    f"`preference_scale` scales the LoRA adapter named '{PREFERENCE_ADAPTER}'; this UNet's adapters are "
                    f"{named}. Load a TDG-DiffDPO adapter under that name (`pipe.load_lora_weights(folder, "
                    f"adapter_name='{PREFERENCE_ADAPTER}')`, as `AmbiSegPipeline.from_pretrained(folder)` does), or "
                    "scale every adapter with `cross_attention_kwargs={'scale': s}`.")
            raise ValueError("`preference_scale` needs a TDG-DiffDPO checkpoint (a 'preference' LoRA adapter on the UNet).")
        if any(PREFERENCE_ADAPTER in getattr(m, "merged_adapters", []) for m in layers):
            raise ValueError("the 'preference' adapter is fused into the UNet's weights (`fuse_lora`), where "
                             "`preference_scale` cannot change it; `unfuse_lora()` first, or fuse at the scale you want.")
        previous = [m.scaling[PREFERENCE_ADAPTER] for m in layers]
        for m in layers:
            m.set_scale(PREFERENCE_ADAPTER, float(scale))
        try:
            yield
        finally:
            for m, value in zip(layers, previous):
                m.scaling[PREFERENCE_ADAPTER] = value


def _default_card(repo_id: str, lidc: bool = True):
    return model_card("pipeline.md", repo_id, lidc=lidc)
