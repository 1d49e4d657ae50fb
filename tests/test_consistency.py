"""Consistency distillation (training/train_consistency.py): the teacher's DDIM solver step, that sampling with
LCMScheduler evaluates the function distillation trains, and the script end to end (adapter + scheduler loaded the
standard way, exact resume)."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler

import train_consistency
from ambiseg_diffusers.losses import consistency_output, ddim_solver_step
from conftest import SIZE, make_pipeline, needs_data


def test_ddim_solver_step_is_the_ddim_schedulers_step():
    scheduler = DDIMScheduler(num_train_timesteps=1000, prediction_type="sample", clip_sample=False,
                              timestep_spacing="trailing")
    scheduler.set_timesteps(50)  # stride 20: 999 -> 979 -> ... -> 19
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(3, 1, 4, 4, generator=generator) * 2 - 1
    noisy = torch.randn(3, 1, 4, 4, generator=generator)
    for t in (999, 499, 39):
        expected = scheduler.step(clean, t, noisy, eta=0.0).prev_sample
        mine = ddim_solver_step(scheduler, clean, noisy, torch.full((3,), t), torch.full((3,), t - 20))
        torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-5)
    # the schedule's last step, 19 -> 0, ends at alpha_cumprod[0] (by hand)
    a19, a0 = scheduler.alphas_cumprod[19], scheduler.alphas_cumprod[0]
    eps = (noisy - a19.sqrt() * clean) / (1 - a19).sqrt()
    mine = ddim_solver_step(scheduler, clean, noisy, torch.full((3,), 19), torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(mine, a0.sqrt() * clean + (1 - a0).sqrt() * eps, rtol=1e-5, atol=1e-6)


def test_sampling_with_lcm_evaluates_the_distilled_consistency_function(tokenizer, image):
    """One LCMScheduler call of the pipeline = f(x_T, T) as training computes it (scalings, clamp, timestep)."""
    pipe = make_pipeline(tokenizer)
    lcm = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=10, timestep_scaling=10.0,
                                   clip_sample=True, set_alpha_to_one=True)
    pipe.scheduler = lcm
    noise = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    z = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    sampled = pipe(image, "a solid nodule", num_samples=2, num_inference_steps=1, latents=noise.clone(),
                   ambiguity_latents=z, output_type="latent").masks
    lcm.set_timesteps(1)
    t = lcm.timesteps[0]
    assert int(t) == 99  # the last of the distilled schedule 9, 19, ..., 99
    images = pipe.preprocess(image).repeat(2, 1, 1, 1)
    text, mask = pipe.encode_prompt("a solid nodule", "cpu", 2)[:2]
    x0 = pipe.unet(torch.cat([images, noise], 1), t, encoder_hidden_states=text, encoder_attention_mask=mask,
                   class_labels=z).sample.clamp(-1, 1)
    by_hand = consistency_output(lcm.get_scalings_for_boundary_condition_discrete(torch.full((2,), float(t))), noise, x0)
    torch.testing.assert_close(sampled, by_hand, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_consistency.parse_args(["--teacher", "x", "--output_dir", str(tmp_path), "--sampling_steps", "0"])
    assert "--sampling_steps must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_consistency.parse_args(["--teacher", "x", "--output_dir", str(tmp_path), "--num_ddim_timesteps", "4",
                                      "--sampling_steps", "5"])
    assert "cannot exceed --num_ddim_timesteps" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an uploaded adapter must name a base others can download
        train_consistency.parse_args(["--teacher", str(tmp_path), "--output_dir", str(tmp_path / "o"), "--push_to_hub"])
    assert "needs --base_model_id" in capsys.readouterr().err


@pytest.fixture
def teacher(tokenizer, tmp_path):
    make_pipeline(tokenizer).save_pretrained(tmp_path / "teacher")
    return tmp_path / "teacher"


def distil_args(teacher, output, *extra) -> list:
    return ["--teacher", str(teacher), "--output_dir", str(output), "--train_split", "mini", "--num_ddim_timesteps",
            "10", "--max_train_steps", "4", "--train_batch_size", "4", "--checkpointing_steps", "2", "--lora_rank", "4",
            "--learning_rate", "1e-2", "--report_to", "none", *extra]


@needs_data
def test_distillation_saves_an_adapter_the_pipeline_loads_and_resumes_exactly(teacher, tmp_path, image):
    from safetensors.numpy import load_file

    from ambiseg_diffusers import AmbiSegPipeline

    straight = train_consistency.main(distil_args(teacher, tmp_path / "a", "--num_validation_images", "1",
                                                  "--validation_split", "mini", "--snapshot_minutes", "1e-9",
                                                  "--base_model_id", "org/teacher", "--hub_token", "secret"))
    info = json.loads((straight / "consistency.json").read_text())
    assert info["train_steps"] == 4 and info["base_model_path"] == "../teacher" and "ged" in info["validation"]
    assert info["base_model"] == "org/teacher" and "hub_token" not in info["config"]
    assert (straight / "validation-000004.png").exists()
    card = (straight / "README.md").read_text()
    assert "base_model: org/teacher" in card and '"ged": ' + str(info["validation"]["ged"]) in card
    # a snapshot after every step (each takes longer than 1e-9 min): loadable folders, the last one the final adapter
    snapshots = sorted(p.name for p in (straight / "snapshots").iterdir())
    assert snapshots == ["step-000001", "step-000002", "step-000003", "step-000004"]
    last = straight / "snapshots" / "step-000004"
    assert json.loads((last / "consistency.json").read_text())["base_model_path"] == "../../../teacher"
    final, kept = (load_file(str(d / "pytorch_lora_weights.safetensors")) for d in (straight, last))
    first = load_file(str(straight / "snapshots" / "step-000001" / "pytorch_lora_weights.safetensors"))
    assert all(np.array_equal(final[k], kept[k]) for k in final)
    assert any(not np.array_equal(final[k], first[k]) for k in final)

    train_consistency.main(distil_args(teacher, tmp_path / "b", "--num_validation_images", "0", "--stop_after_steps", "2"))
    assert not (tmp_path / "b" / "pytorch_lora_weights.safetensors").exists()
    resumed = train_consistency.main(distil_args(teacher, tmp_path / "b", "--num_validation_images", "0",
                                                 "--resume_from_checkpoint", "latest"))
    a = load_file(str(straight / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # the EMAs (target network, saved weights) act: with them the same steps give another adapter
    with_emas = train_consistency.main(distil_args(teacher, tmp_path / "emas", "--num_validation_images", "0",
                                                   "--target_ema_decay", "0.95", "--ema_decay", "0.99"))
    c = load_file(str(with_emas / "pytorch_lora_weights.safetensors"))
    assert c.keys() == a.keys() and not all(np.array_equal(a[k], c[k]) for k in a)

    # --init_adapter starts the student from a distilled folder: at learning rate 0 it saves that folder's adapter
    init = train_consistency.main(distil_args(teacher, tmp_path / "init", "--num_validation_images", "0",
                                              "--init_adapter", str(straight), "--learning_rate", "0"))
    d = load_file(str(init / "pytorch_lora_weights.safetensors"))
    assert d.keys() == a.keys() and all(np.array_equal(a[k], d[k]) for k in a)
    other = tmp_path / "other-teacher"
    shutil.copytree(teacher, other)
    with pytest.raises(ValueError, match="not from `--teacher`"):
        train_consistency.main(distil_args(other, tmp_path / "x", "--num_validation_images", "0",
                                           "--init_adapter", str(straight)))

    # the LCM-LoRA way: the teacher, the adapter, the scheduler
    pipe = AmbiSegPipeline.from_pretrained(teacher)
    pipe.scheduler = LCMScheduler.from_pretrained(straight, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    call = dict(image=image, prompt="a solid nodule", num_samples=3, output_type="latent")
    before = pipe(**call, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).masks
    pipe.load_lora_weights(straight, weight_name="pytorch_lora_weights.safetensors", adapter_name="consistency")
    after = pipe(**call, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).masks
    assert pipe.scheduler.config.original_inference_steps == 10
    assert (after - before).abs().max() > 1e-3  # the trained adapter changes the samples
    # ... and in one line, the number of calls from consistency.json (what evaluate.py and the sweep read)
    from ambiseg_diffusers import load_pipeline
    from ambiseg_diffusers.pipelines.pipeline_ambiseg import recommended_steps

    one_line = load_pipeline(str(straight))
    one_line.set_progress_bar_config(disable=True)
    assert isinstance(one_line.scheduler, LCMScheduler) and recommended_steps(straight) == 2
    again = one_line(**call, num_inference_steps=recommended_steps(straight), generator=torch.Generator().manual_seed(0)).masks
    torch.testing.assert_close(again, after)


@needs_data
def test_distillation_refuses_more_ddim_steps_than_the_teacher_has(teacher, tmp_path):
    with pytest.raises(ValueError, match="exceeds the teacher's 100 training timesteps"):
        train_consistency.main(distil_args(teacher, tmp_path / "c", "--num_ddim_timesteps", "200",
                                           "--num_validation_images", "0"))


@needs_data
def test_a_run_resumed_past_its_last_step_saves_without_training(teacher, tmp_path):
    from safetensors.numpy import load_file

    done = train_consistency.main(distil_args(teacher, tmp_path / "a", "--num_validation_images", "0"))
    before = load_file(str(done / "pytorch_lora_weights.safetensors"))
    again = train_consistency.main(distil_args(teacher, tmp_path / "a", "--num_validation_images", "0",
                                               "--max_train_steps", "2", "--resume_from_checkpoint", "latest"))
    after = load_file(str(again / "pytorch_lora_weights.safetensors"))  # the step-4 checkpoint, nothing trained
    assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)


def mini_at_teacher_size(pipe):
    """The mini split as record_trajectories.py reads it: resized to the teacher's size, in its prompt style."""
    from ambiseg_diffusers.data import load_multirater, model_image_processor
    from ambiseg_diffusers.lidc import pipeline_prompt_style

    return load_multirater("lidc64", "mini", image_processor=model_image_processor(pipe), prompt_style=pipeline_prompt_style(pipe))


@pytest.fixture
def recorded(teacher, tmp_path):
    import record_trajectories

    return record_trajectories.main(["--teacher", str(teacher), "--split", "mini", "--max_images", "3",
                                     "--images_per_call", "2", "--samples_per_image", "3", "--num_inference_steps", "4",
                                     "--output_dir", str(tmp_path / "trajectories")])


@needs_data
def test_recorded_trajectories_are_the_teachers_ddim_samples(teacher, recorded):
    """Each recorded row, sampled again from its recorded noise, z, prompt and image, ends at its recorded mask, and
    its recorded states are the DDIM states on the way."""
    from ambiseg_diffusers import AmbiSegPipeline
    from ambiseg_diffusers.evaluation import build_sampling_scheduler

    shards = [np.load(p) for p in sorted(recorded.glob("shard-*.npz"))]
    assert [len(s["final"]) for s in shards] == [6, 3]  # 2 + 1 images, 3 rows each
    shard = shards[0]
    # the 64 x 64 crops at the teacher's size (16), as evaluation resizes them
    assert shard["timesteps"].tolist() == [99, 74, 49, 24] and shard["states"].shape == (6, 4, 1, 16, 16)
    assert shard["positions"].tolist() == [0, 0, 0, 1, 1, 1]
    pipe = AmbiSegPipeline.from_pretrained(teacher)
    pipe.scheduler = build_sampling_scheduler(pipe.scheduler, "ddim")
    pipe.set_progress_bar_config(disable=True)
    raw = mini_at_teacher_size(pipe)[:2]["image"]
    states = []
    for row in (0, 4):  # two rows of two images, one at a time: nothing depends on the batch they were recorded in
        image = np.asarray(raw[shard["positions"][row]], np.float32)
        np.testing.assert_array_equal(pipe.preprocess(image)[0].numpy(), shard["images"][row])  # what the UNet saw
        out = pipe(image, [str(shard["prompts"][row])], num_samples=1, num_inference_steps=4,
                   latents=torch.from_numpy(shard["states"][row, :1].astype(np.float32)),
                   ambiguity_latents=torch.from_numpy(shard["z"][row:row + 1]), output_type="latent",
                   callback_on_step_end=lambda p, i, t, k: states.append(k["latents"].clone()) or {},
                   callback_on_step_end_tensor_inputs=["latents"])
        # atol: the noise is stored in float16 (3 significant digits); another row's mask is 0.5 away
        np.testing.assert_allclose(out.masks[0].numpy(), shard["final"][row], atol=3e-3)
    np.testing.assert_allclose(states[0][0].numpy(), shard["states"][0, 1], atol=2e-3)  # float16 storage
    np.testing.assert_allclose(states[5][0].numpy(), shard["states"][4, 2], atol=2e-3)
    # the rows of one image differ (their own noise and prompt), the images differ
    assert np.abs(shard["states"][0, 0] - shard["states"][1, 0]).max() > 0.5
    assert not np.array_equal(shard["images"][0], shard["images"][3])


@needs_data
def test_trajectory_distillation_learns_the_teachers_samples_and_resumes_exactly(teacher, recorded, tmp_path):
    from safetensors.numpy import load_file

    from ambiseg_diffusers import load_pipeline
    from ambiseg_diffusers.pipelines.pipeline_ambiseg import recommended_steps

    def args(output, *extra):
        return ["--teacher", str(teacher), "--trajectories", str(recorded), "--output_dir", str(output),
                "--max_train_steps", "12", "--train_batch_size", "6", "--checkpointing_steps", "4", "--lora_rank", "4",
                "--learning_rate", "3e-2", "--loss_type", "l2", "--top_state_fraction", "0.5", "--sampling_steps", "1",
                "--num_validation_images", "0", "--report_to", "none", *extra]

    shards = [np.load(p) for p in sorted(recorded.glob("shard-*.npz"))]
    noise, z, final = (torch.from_numpy(np.concatenate([s[k] for s in shards]).astype(np.float32))
                       for k in ("states", "z", "final"))

    def one_call_error(folder) -> float:
        """Mean squared distance of the one-call sampler's masks, from the recorded noise, to the teacher's."""
        pipe = load_pipeline(str(folder))
        pipe.set_progress_bar_config(disable=True)
        image = np.asarray(mini_at_teacher_size(pipe)[0]["image"], np.float32)
        out = pipe(image, [[str(p) for p in shards[0]["prompts"][:3]]], num_samples=3, latents=noise[:3, 0],
                   ambiguity_latents=z[:3], output_type="latent", num_inference_steps=recommended_steps(folder))
        assert pipe.scheduler.timesteps.tolist() == [99]
        return float(((out.masks - final[:3]) ** 2).mean())

    untrained = one_call_error(train_consistency.main(args(tmp_path / "zero", "--learning_rate", "0",
                                                           "--max_train_steps", "1")))
    trained_dir = train_consistency.main(args(tmp_path / "a"))
    trained = one_call_error(trained_dir)
    assert json.loads((trained_dir / "consistency.json").read_text())["method"] == "trajectory"
    assert "— trajectory distillation" in (trained_dir / "README.md").read_text()
    assert trained < 0.85 * untrained, (trained, untrained)  # 12 steps: learnt, not noise

    # the LoRA fused into the UNet's weights (the fast way to sample) gives the same samples
    pipe = load_pipeline(str(trained_dir))
    pipe.set_progress_bar_config(disable=True)
    image = np.asarray(mini_at_teacher_size(pipe)[0]["image"], np.float32)
    call = dict(image=image, prompt="a nodule", num_samples=2, output_type="latent",
                num_inference_steps=recommended_steps(trained_dir))
    unfused = pipe(**call, generator=torch.Generator().manual_seed(0)).masks
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert not getattr(pipe.unet, "peft_config", None)
    torch.testing.assert_close(pipe(**call, generator=torch.Generator().manual_seed(0)).masks, unfused, atol=1e-5, rtol=0)

    train_consistency.main(args(tmp_path / "b", "--stop_after_steps", "4"))
    resumed = train_consistency.main(args(tmp_path / "b", "--resume_from_checkpoint", "latest"))
    a = load_file(str(trained_dir / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    # Exact on the machine this was written on; on an AMD EPYC of the CI kind the resumed weights differ from the
    # straight run's by at most 3.6e-7 after 8 steps at this (large) learning rate, while two straight runs agree
    # bit for bit (the source is not found here).
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=2e-6, err_msg=key)


@needs_data
def test_trajectory_distillation_refuses_another_teachers_recording(teacher, recorded, tmp_path, tokenizer, capsys):
    from ambiseg_diffusers import AmbiSegPipeline

    other = AmbiSegPipeline.from_pretrained(teacher)
    with torch.no_grad():
        other.unet.conv_out.bias.add_(1e-3)  # the same teacher but for one weight
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="recorded from another teacher"):
        train_consistency.main(["--teacher", str(tmp_path / "other"), "--trajectories", str(recorded), "--output_dir",
                                str(tmp_path / "x"), "--report_to", "none", "--num_validation_images", "0",
                                "--max_train_steps", "1"])
    with pytest.raises(SystemExit):
        train_consistency.parse_args(["--teacher", str(teacher), "--trajectories", str(recorded), "--output_dir",
                                      str(tmp_path / "y"), "--num_ddim_timesteps", "10"])
    assert "--num_ddim_timesteps 10 differs from the recording's 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # fixed targets: no target network
        train_consistency.parse_args(["--teacher", str(teacher), "--trajectories", str(recorded), "--output_dir",
                                      str(tmp_path / "y"), "--target_ema_decay", "0.9"])
    assert "--target_ema_decay has no target network" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_consistency.parse_args(["--teacher", str(teacher), "--output_dir", str(tmp_path / "y"),
                                      "--top_state_fraction", "0.5"])
    assert "applies to trajectory distillation only" in capsys.readouterr().err
    args = train_consistency.parse_args(["--teacher", str(teacher), "--trajectories", str(recorded), "--output_dir",
                                         str(tmp_path / "y")])
    assert (args.loss_type, args.train_split, args.num_ddim_timesteps, args.top_state_fraction) == ("l2", "mini", 4, 0.5)


@needs_data
def test_recording_resumes_the_missing_images_and_refuses_an_unsampleable_schedule(teacher, recorded, tmp_path):
    import record_trajectories

    first = recorded / "shard-00002.npz"
    kept = {k: v for k, v in np.load(first).items()}
    first.unlink()
    other = recorded / "shard-00000.npz"
    stamp = other.stat().st_mtime_ns
    record_trajectories.main(["--teacher", str(teacher), "--split", "mini", "--max_images", "3", "--images_per_call", "1",
                              "--samples_per_image", "3", "--num_inference_steps", "4", "--output_dir", str(recorded)])
    assert other.stat().st_mtime_ns == stamp  # images 0 and 1 were not recorded again
    again = np.load(first)
    assert sorted(again.files) == sorted(kept) and all(np.array_equal(again[k], kept[k]) for k in kept)
    with pytest.raises(ValueError, match="must divide the teacher's 100 training timesteps"):
        record_trajectories.main(["--teacher", str(teacher), "--split", "mini", "--max_images", "1",
                                  "--num_inference_steps", "3", "--output_dir", str(tmp_path / "three")])


@needs_data
def test_an_aligned_teacher_keeps_its_adapter_in_teacher_and_student(tokenizer, tmp_path, monkeypatch):
    """A TDG-DiffDPO folder as teacher: its 'preference' adapter acts in the teacher's and the student's calls (as
    loading the distilled sampler turns both on) and stays frozen; only the new adapter trains."""
    from ambiseg_diffusers import AmbiSegPipeline, AmbiSegUNet

    from test_pipeline_conventions import add_tiny_adapter

    aligned = make_pipeline(tokenizer)
    add_tiny_adapter(aligned.unet)
    aligned.save_pretrained(tmp_path / "aligned")  # base weights, the adapter and preference.json in one folder
    calls = []
    forward = AmbiSegUNet.forward

    def recording(self, *args, **kwargs):
        disabled = any(getattr(m, "disable_adapters", False) for m in self.modules() if hasattr(m, "scaling"))
        calls.append(("off" if disabled else tuple(sorted(self.active_adapters())),
                      {n.split(".lora_")[1].split(".")[1] for n, p in self.named_parameters() if p.requires_grad}))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(AmbiSegUNet, "forward", recording)
    out = train_consistency.main(distil_args(tmp_path / "aligned", tmp_path / "lcm", "--max_train_steps", "1",
                                             "--num_validation_images", "0"))
    student, teacher, target = (c[0] for c in calls[:3])
    assert student == target == ("consistency", "preference") and teacher == ("preference",)
    assert all(c[1] == {"consistency"} for c in calls[:3])  # the teacher's adapter never trains
    monkeypatch.setattr(AmbiSegUNet, "forward", forward)
    loaded = AmbiSegPipeline.from_pretrained(out)
    assert sorted(loaded.unet.active_adapters()) == ["consistency", "preference"]
