"""The Probabilistic U-Net baseline: its ELBO against a hand computation, the pipeline contract it shares with
AmbiSegPipeline, saving/loading through `load_pipeline`, and its training script (exact resume, wall-clock budget,
snapshots) on the real mini split, scored by the unchanged evaluation CLI and the checkpoint selection."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from ambiseg_diffusers import ProbUNetModel, ProbUNetPipeline, load_pipeline
from ambiseg_diffusers.training_utils import TrainingClock

from conftest import needs_data

TINY = dict(latent_dim=2, block_out_channels=(4, 8), convs_per_block=1, num_1x1_convs=1,
            encoder_block_out_channels=(4, 4), norm_num_groups=2)


def tiny_model() -> ProbUNetModel:
    torch.manual_seed(0)
    return ProbUNetModel(**TINY).eval()


def test_elbo_is_summed_pixel_cross_entropy_plus_beta_kl():
    model = tiny_model()
    last = model.fcomb[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.constant_(last.bias, 0.5)  # every pixel's logit is 0.5
    with torch.no_grad():  # a prior that differs from the (zero-initialised, N(0, I)) posterior
        model.prior.head[-1].bias.copy_(torch.tensor([1.0, -1.0, math.log(4.0), 0.0]))
    image = torch.zeros(2, 1, 8, 8)
    mask = -torch.ones(2, 1, 8, 8)
    mask[0, 0, :2, :3] = 1.0  # 6 foreground pixels in image 0, none in image 1
    loss, parts = model(image, mask, kl_weight=2.0, noise=torch.zeros(2, 2))

    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    expected_bce = ((6 * softplus(-0.5) + 58 * softplus(0.5)) + 64 * softplus(0.5)) / 2
    # KL(N(0, I) || N((1, -1), diag(4, 1))) = 0.5 * sum(var_q/var_p + (mu_p - mu_q)^2/var_p - 1 - log(var_q/var_p))
    expected_kl = 0.5 * ((1 / 4 + 1 / 4 - 1 + math.log(4)) + (1 + 1 - 1 - 0))
    assert parts["reconstruction"].item() == pytest.approx(expected_bce, rel=1e-6)
    assert parts["kl"].item() == pytest.approx(expected_kl, rel=1e-6)
    assert loss.item() == pytest.approx(expected_bce + 2.0 * expected_kl, rel=1e-6)


def test_the_latent_changes_the_mask_and_the_generator_fixes_it():
    model = tiny_model()
    with torch.no_grad():
        model.prior.head[-1].bias.copy_(torch.tensor([0.0, 0.0, 2.0, 2.0]))  # a wide prior
    pipe = ProbUNetPipeline(prob_unet=model)
    image = np.random.default_rng(0).normal(size=(2, 16, 16)).astype(np.float32)
    out = pipe(image, num_samples=4, generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)])
    again = pipe(image[:1], num_samples=4, generator=torch.Generator().manual_seed(0))
    assert out.masks.shape == out.probabilities.shape == (2, 4, 16, 16) and out.masks.dtype == bool
    np.testing.assert_allclose(out.probabilities[0], again.probabilities[0], atol=1e-6)  # image 0 ignores image 1
    assert np.ptp(out.probabilities[0], axis=0).max() > 1e-3  # samples differ: z reaches the logits
    mean_only = pipe(image, num_samples=3, prior_temperature=0.0)
    np.testing.assert_array_equal(mean_only.probabilities[:, 0], mean_only.probabilities[:, 2])
    chunked = pipe(image[:1], num_samples=4, generator=torch.Generator().manual_seed(0), batch_size=3)
    np.testing.assert_allclose(chunked.probabilities, again.probabilities, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_inference_steps": 5}, "num_inference_steps"), ({"num_samples": 0}, "num_samples"),
    ({"threshold": 1.0}, "threshold"), ({"output_type": "latent"}, "output_type"),
    ({"prior_temperature": -1.0}, "prior_temperature"), ({"batch_size": 0}, "batch_size"),
])
def test_bad_arguments_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProbUNetPipeline(prob_unet=tiny_model())(np.zeros((16, 16), np.float32), **kwargs)


def test_save_and_load_through_the_generic_loader(tmp_path, caplog):
    pipe = ProbUNetPipeline(prob_unet=tiny_model(), image_clip=2.0)
    pipe.save_pretrained(tmp_path)
    loaded = load_pipeline(str(tmp_path))
    assert isinstance(loaded, ProbUNetPipeline) and loaded.image_processor.config.image_clip == 2.0
    assert not loaded.image_processor.config.do_resize  # a Probabilistic U-Net built without one: inputs as given
    image = np.random.default_rng(1).normal(size=(16, 16)).astype(np.float32)
    a = pipe(image, num_samples=2, generator=torch.Generator().manual_seed(3)).probabilities
    b = loaded(image, "a solid nodule", num_samples=2, generator=torch.Generator().manual_seed(3)).probabilities
    np.testing.assert_array_equal(a, b)
    assert "ignores `prompt`" in caplog.text


def test_each_pipeline_class_refuses_the_others_folder_naming_what_it_holds(tmp_path, tokenizer):
    from ambiseg_diffusers import AmbiSegPipeline

    from conftest import make_pipeline

    ProbUNetPipeline(prob_unet=tiny_model()).save_pretrained(tmp_path / "prob")
    make_pipeline(tokenizer).save_pretrained(tmp_path / "ambiseg")
    with pytest.raises(ValueError, match=r"prob holds the pipeline ProbUNetPipeline .*not AmbiSegPipeline: load it with "
                                         r"`ProbUNetPipeline.from_pretrained"):
        AmbiSegPipeline.from_pretrained(tmp_path / "prob")
    with pytest.raises(ValueError, match=r"ambiseg holds the pipeline AmbiSegPipeline .*not ProbUNetPipeline"):
        ProbUNetPipeline.from_pretrained(tmp_path / "ambiseg")
    assert isinstance(load_pipeline(tmp_path / "prob"), ProbUNetPipeline)  # the generic loader reads the class


def test_training_clock_counts_snapshots_and_the_budget():
    clock = TrainingClock(max_minutes=1.0, snapshot_minutes=0.25)
    due = [clock.add(6.0) for _ in range(10)]  # 6 s steps: a snapshot every 15 s, crossed at 18, 30, 48, 60 s
    assert due == [False, False, True, False, True, False, False, True, False, True]
    assert clock.expired
    assert not TrainingClock(max_minutes=2.0, seconds=119.0).expired
    with pytest.raises(ValueError, match="max_train_minutes"):
        TrainingClock(max_minutes=0)


def test_a_budget_run_shows_a_bar_over_its_minutes_and_a_step_run_over_its_steps():
    budget = TrainingClock(max_minutes=2.0, seconds=30.0)
    bar = budget.progress_bar(first_step=10, max_steps=100_000_000)
    for _ in range(3):
        budget.add(20.0)
    assert (bar.total, bar.unit) == (2.0, "min") and bar.n == pytest.approx(0.5 + 1.0)
    budget.add(60.0)  # the last step crosses the budget: the bar stops at its end
    assert bar.n == pytest.approx(2.0)
    steps = TrainingClock()
    bar = steps.progress_bar(first_step=10, max_steps=40)
    steps.add(20.0)
    assert (bar.total, bar.unit, bar.n) == (40, "step", 11)


@needs_data
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_train_resume_budget_snapshots_evaluate_and_select(tmp_path):
    import evaluate
    import select_checkpoint
    import train_prob_unet

    fast = ["--train_split", "mini", "--train_batch_size", "2", "--max_train_steps", "4", "--checkpointing_steps", "2",
            "--num_validation_images", "0", "--report_to", "none", "--mixed_precision", "no", "--latent_dim", "2"]
    straight = train_prob_unet.main(fast + ["--output_dir", str(tmp_path / "straight")])
    killed = tmp_path / "killed"
    train_prob_unet.main(fast + ["--output_dir", str(killed), "--stop_after_steps", "3"])
    assert not (killed / "model_index.json").exists()
    train_prob_unet.main(fast + ["--output_dir", str(killed), "--resume_from_checkpoint", "latest"])
    a = load_file(str(straight / "prob_unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(killed / "prob_unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads((straight / "training_summary.json").read_text())["steps"] == 4

    # A budget shorter than one step stops after the first step; every step past the first snapshot period saves one.
    budget = train_prob_unet.main(fast + ["--output_dir", str(tmp_path / "budget"), "--max_train_minutes", "1e-6",
                                          "--snapshot_minutes", "1e-6"])
    assert json.loads((budget / "training_summary.json").read_text())["steps"] == 1
    assert [p.name for p in (budget / "snapshots").iterdir()] == ["step-000001"]

    summary = evaluate.main(["--model", str(straight), "--split", "selection", "--max_images", "2", "--num_samples", "4",
                             "--prompts", "none", "--output_dir", str(tmp_path / "eval")])
    record = select_checkpoint.main(["--run_dir", str(straight), str(budget), "--split", "selection", "--max_images", "2",
                                     "--num_samples", "4", "--prompts", "none"])
    scores = {c["path"]: c["ged"] for c in record["candidates"]}
    # The budget run's snapshot at its last step holds its final weights: scored once, as the final pipeline.
    assert set(scores) == {str(budget), str(straight)}
    assert scores[str(straight)] == pytest.approx(summary["ged"]["mean"], abs=1e-12)  # the same seeds as evaluate.py
    assert record["best"] == min(scores, key=scores.get)
    with pytest.raises(SystemExit):
        select_checkpoint.main(["--run_dir", str(straight), "--split", "validate"])


def test_results_table_lays_rows_out_like_tables_2_and_5_with_paired_differences(tmp_path):
    import results_table

    def row(name: str, label: str, best: str, ged: float, per_image_ged: list[float]) -> None:
        folder = tmp_path / name
        (folder / "validate").mkdir(parents=True)
        metric = {"mean": ged, "low": ged - 0.01, "high": ged + 0.01}
        summary = {k: metric for k in ("avg_dice", "avg_iou", "ged", "ged_iou", "ci", "dmax", "sc", "da")}
        (folder / "validate" / "summary.json").write_text(json.dumps({"label": label, "summary": summary, "images": 2}))
        lines = [json.dumps({"index": i, "ged": g, "ci": 1 - g}) for i, g in enumerate(per_image_ged)]
        (folder / "validate" / "per_image.jsonl").write_text("\n".join(lines) + "\n")
        candidates = [{"path": best, "ged": 0.2}, {"path": str(folder), "ged": 0.3}]
        (folder / "selection.json").write_text(json.dumps({"candidates": candidates, "best": best}))

    row("ambiseg", "AmbiSeg", str(tmp_path / "ambiseg" / "snapshots" / "step-001200"), 0.3, [0.2, 0.4])
    (tmp_path / "prob-unet" / "final").mkdir(parents=True)
    (tmp_path / "prob-unet" / "final" / "training_summary.json").write_text(json.dumps({"steps": 3456}))
    row("prob-unet", "Probabilistic U-Net", str(tmp_path / "prob-unet" / "final"), 0.5, [0.5, 0.5])
    row("no-text", "w/o text", str(tmp_path / "no-text"), 0.35, [0.3, 0.4])
    text = results_table.table(tmp_path, ["ambiseg", "no-text", "prob-unet"], budget_min=45)
    assert "45 min of training per row" in text
    methods, ablations = text.split("Ablations")
    # methods: the baseline first, the reference last; per-image GED differences 0.3 and 0.1 -> mean 0.2, and the
    # bootstrap means of two values can only be 0.1, 0.2, 0.3
    assert methods.index("| Probabilistic U-Net |") < methods.index("| AmbiSeg |") and "w/o text" not in methods
    assert "| Probabilistic U-Net | 0.500 [0.490, 0.510] | 0.500 [0.490, 0.510]" in methods
    assert "| +0.200 [+0.100, +0.300] | -0.200 [-0.300, -0.100] |" in methods
    assert "| ✗ | ✓ | 0.350 [0.340, 0.360]" in ablations and "| +0.050 [+0.000, +0.100] |" in ablations
    assert "| ✓ | ✓ | 0.300 [0.290, 0.310]" in ablations
    assert "| AmbiSeg | 1200 | 2 | 0.200 | 2 |" in text and "| Probabilistic U-Net | 3456 | 2 | 0.200 | 2 |" in text
    (tmp_path / "no-text" / "validate" / "per_image.jsonl").write_text(json.dumps({"index": 5, "ged": 0.1}) + "\n")
    with pytest.raises(ValueError, match="different images"):
        results_table.table(tmp_path, ["ambiseg", "no-text"])


@needs_data
def test_comparison_picture_redraws_each_rows_evaluation_figure(tmp_path):
    import evaluate
    import plot_comparison
    from PIL import Image

    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        ProbUNetPipeline(prob_unet=ProbUNetModel(**TINY).eval()).save_pretrained(tmp_path / name)
        evaluate.main(["--model", str(tmp_path / name), "--split", "mini", "--max_images", "4", "--num_samples", "4",
                       "--prompts", "none", "--output_dir", str(tmp_path / name / "validate"), "--label", f"row {name}"])
    output = plot_comparison.main(["--runs", str(tmp_path), "--rows", "a", "b", "--indices", "0", "1", "2", "3",
                                   "--num_samples", "4", "--output", str(tmp_path / "comparison.png")])
    picture = np.asarray(Image.open(output).convert("RGB"))
    for position, name in enumerate("ab"):
        # the evaluation's own figure draws the same first four images with the same seeds and settings
        figure = np.asarray(Image.open(tmp_path / name / "validate" / "figure_samples.png").convert("RGB"))
        top = plot_comparison.LABEL_HEIGHT + position * (figure.shape[0] + plot_comparison.LABEL_HEIGHT)
        np.testing.assert_array_equal(picture[top:top + figure.shape[0], :figure.shape[1]], figure)
    assert picture.shape[0] == 2 * (figure.shape[0] + plot_comparison.LABEL_HEIGHT)
    with pytest.raises(ValueError, match="--indices"):
        plot_comparison.main(["--runs", str(tmp_path), "--rows", "a", "--indices", "14", "--output", str(output)])


BUDGET_RANKS = """
import sys
from pathlib import Path

from accelerate import Accelerator
from ambiseg_diffusers.training_utils import TrainingClock

accelerator = Accelerator(cpu=True)
lines = []
# Skewed clocks: rank 1 has spent its budget, rank 0 has not yet (and later the other way round).
for rank0, rank1 in ((50.0, 70.0), (70.0, 50.0)):
    clock = TrainingClock(max_minutes=1.0, seconds=rank0 if accelerator.process_index == 0 else rank1)
    lines.append(f"rank {accelerator.process_index}: own {clock.expired} everywhere {clock.expired_everywhere(accelerator)}")
# One file per rank: two processes printing to one pipe interleave mid-line.
Path(sys.argv[1], f"rank{accelerator.process_index}.txt").write_text("\\n".join(lines))
accelerator.end_training()
"""


def test_the_budget_stop_is_one_decision_for_every_rank(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "ranks.py").write_text(BUDGET_RANKS)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(tmp_path / "ranks.py"), str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted((tmp_path / "rank0.txt").read_text().splitlines() + (tmp_path / "rank1.txt").read_text().splitlines())
    assert lines == sorted(["rank 0: own False everywhere False", "rank 1: own True everywhere False",
                            "rank 0: own True everywhere True", "rank 1: own False everywhere True"])
