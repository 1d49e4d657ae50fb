"""Cards and uploads, recorded offline: model cards from the packaged templates, dataset cards with the LIDC-IDRI
attribution, and what the scripts upload."""

import huggingface_hub
from datasets import Dataset
from huggingface_hub import DatasetCard

import build_preferences as build_preferences_script
from ambiseg_diffusers.hub_utils import dataset_card, model_card

from conftest import make_pipeline, needs_data


def test_model_cards_come_from_the_packaged_templates():
    card = model_card("tdg-diffdpo.md", "user/dpo", base_model="user/ambiseg", extra_tags=["tdg-diffdpo"],
                      preferences="runs/prefs", num_pairs=12, config_json="{}", metrics="{}")
    assert card.data.base_model == "user/ambiseg" and card.data.library_name == "diffusers"
    assert card.data.tags[:1] == ["ambiseg-diffusers"] and "tdg-diffdpo" in card.data.tags
    assert 'AmbiSegPipeline.from_pretrained("user/dpo")' in card.text and "12 preference" in card.text
    assert "CC BY 3.0" in card.text and "{{" not in card.text


def test_dataset_cards_carry_the_licence_and_attribution():
    card = dataset_card("Pairs", "Some pairs.", "python scripts/build_preferences.py ...")
    assert card.data.license == "cc-by-3.0" and "ambiseg-diffusers" in card.data.tags
    assert "Armato III" in card.text and "python scripts/build_preferences.py" in card.text


@needs_data
def test_build_preferences_pushes_the_pairs_with_their_card(tokenizer, tmp_path, monkeypatch):
    make_pipeline(tokenizer).save_pretrained(tmp_path / "reference")
    pushed = {}
    monkeypatch.setattr(Dataset, "push_to_hub", lambda self, repo_id, **kw: pushed.update(data=(repo_id, len(self))))
    monkeypatch.setattr(DatasetCard, "push_to_hub",
                        lambda self, repo_id, **kw: pushed.update(card=(repo_id, kw.get("repo_type"), str(self))))
    pairs, report = build_preferences_script.main([
        "--reference", str(tmp_path / "reference"), "--split", "mini", "--fraction", "0.3", "--num_candidates", "2",
        "--num_inference_steps", "1", "--output_dir", str(tmp_path / "pairs"), "--push_to_hub", "user/pairs"])
    assert pushed["data"] == ("user/pairs", report["pairs"])
    repo_id, repo_type, text = pushed["card"]
    assert (repo_id, repo_type) == ("user/pairs", "dataset")
    assert "license: cc-by-3.0" in text and "CC BY 3.0" in text and f"{report['pairs']} (winner, loser)" in text


def test_training_runs_upload_weights_and_card_but_not_checkpoints(tmp_path, monkeypatch):
    from ambiseg_diffusers.hub_utils import push_folder_to_hub

    run = tmp_path / "run"
    for name in ("README.md", "model_index.json", "training_summary.json", "unet/diffusion_pytorch_model.safetensors",
                 "checkpoint-2/model.safetensors", "checkpoint-2/ema_0.safetensors", ".checkpoint-4.partial/optimizer.bin",
                 "snapshots/step-000010/unet/diffusion_pytorch_model.safetensors", "logs/ambiseg/events.out",
                 "validation-000002.png"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    calls = []

    class Repo:
        repo_id = "user/run"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: Repo())
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.append(kw))
    push_folder_to_hub(run, "run")
    (call,) = calls
    # What huggingface_hub's own filter keeps of the folder with the recorded patterns: the pipeline and its card.
    files = [str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()]
    uploaded = set(huggingface_hub.utils.filter_repo_objects(files, ignore_patterns=call["ignore_patterns"]))
    assert call["repo_id"] == "user/run" and call["folder_path"] == str(run)
    assert uploaded == {"README.md", "model_index.json", "training_summary.json", "unet/diffusion_pytorch_model.safetensors"}
