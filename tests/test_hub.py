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

    (tmp_path / "run" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "run" / "README.md").write_text("card")
    calls = []

    class Repo:
        repo_id = "user/run"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: Repo())
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.append(kw))
    push_folder_to_hub(tmp_path / "run", "run")
    (call,) = calls
    assert call["repo_id"] == "user/run" and "checkpoint-*" in call["ignore_patterns"]
