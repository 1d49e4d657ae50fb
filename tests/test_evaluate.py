"""The evaluation and sweep scripts end to end on the real mini split, with a tiny pipeline."""

import json
import sys
from pathlib import Path

from conftest import needs_data

from conftest import make_pipeline



@needs_data
def test_evaluate_writes_reports_figures_and_resumes(tokenizer, tmp_path):
    import evaluate

    make_pipeline(tokenizer).save_pretrained(tmp_path / "model")
    args = ["--model", str(tmp_path / "model"), "--split", "mini", "--num_samples", "4", "--steps", "2",
            "--max_images", "5", "--output_dir", str(tmp_path / "eval"), "--images_per_call", "2",
            "--prompt_control", "a solid round nodule", "a ground glass nodule"]
    summary = evaluate.main(args)
    out = tmp_path / "eval"
    records = [json.loads(line) for line in (out / "per_image.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 3, 4]
    assert set(records[0]) >= {"ged", "ci", "dmax", "sc", "da", "avg_dice", "n1", "n2", "n4"}
    assert 0 <= summary["ged"]["low"] <= summary["ged"]["mean"] <= summary["ged"]["high"]
    text = (out / "summary.md").read_text()
    assert "avg_dice" in text and "N = 4" in text
    for figure in ("figure_samples.png", "quality_vs_n.png", "prompt_control.png"):
        assert (out / figure).stat().st_size > 1000
    # With one sample, D_max (mean over raters of the best sample's Dice) is the average Dice.
    assert all(abs(r["n1"]["dmax"] - r["n1"]["avg_dice"]) < 1e-9 for r in records)

    # Resume: a partial results file is continued, not recomputed.
    part = out / "per_image.part0.jsonl"
    lines = part.read_text().splitlines()
    part.write_text("\n".join(lines[:3]) + "\n")
    evaluate.main(args[:-3])
    again = [json.loads(line) for line in part.read_text().splitlines()]
    assert [r["index"] for r in again] == [0, 1, 2, 3, 4]
    assert again[3]["ged"] == records[3]["ged"]  # per-image seeds: the same samples after a resume

    evaluate.main(args[:-3] + ["--deterministic", "--output_dir", str(tmp_path / "det")])
    det = [json.loads(line) for line in (tmp_path / "det" / "per_image.jsonl").read_text().splitlines()]
    # One sample repeated: more copies change nothing.
    assert all(abs(r["n4"]["ged"] - r["n1"]["ged"]) < 1e-9 and r["n4"]["sc"] == r["n1"]["sc"] for r in det)


@needs_data
def test_sampler_sweep(tokenizer, tmp_path):
    import sweep_samplers

    make_pipeline(tokenizer).save_pretrained(tmp_path / "model")
    rows = sweep_samplers.main(["--model", str(tmp_path / "model"), "--max_images", "2", "--num_samples", "2",
                                "--configs", "ddim:2", "dpm:2", "unipc:3", "--output_dir", str(tmp_path / "sweep")])
    assert set(rows) == {"ddim:2", "dpm:2", "unipc:3"}
    assert (tmp_path / "sweep" / "quality_vs_steps.png").exists() and "s/image" in (tmp_path / "sweep" / "sweep.md").read_text()
