#!/usr/bin/env python
"""Sampling speed, side by side in one run, on the same model and images:

1. the paper's protocol: 16 separate sampling calls of 1 sample each, DDIM-100, float32, on the base model (a
   distilled sampler's teacher: its LoRA removed);
2. the default call `pipe(image, prompt, num_samples=16)`: one batched call, the default steps, the default precision
   (`autocast="auto"`: bf16 where the CPU or GPU computes it natively);
   2a-2c. the same with each speed option off or traded: float32; DDIM-2, the fast setting (for a distilled
   sampler, its teacher's); one image per call;
   2d-2f. options tried and not made default unless they win here: a `channels_last` UNet, a `torch.compile`d UNet
   (compilation excluded from its time, printed apart), and prompt embeddings computed once and passed as
   `prompt_embeds` (what a caller who segments many slices with one prompt can do);
   2g. for a distilled sampler: its LoRA fused into the UNet (`fuse_lora()`, then `unload_lora_weights()`);
4. with `--distilled <folder>`: that distilled sampler's default call, its LoRA fused, in the same run;
3. the floor: the bare UNet forwards (2) needs (same batch, steps and precision), nothing else; and the parts of
   (2) that are not UNet forwards, timed alone: prompt encoding and the prior.

Prints samples/s, the ratios 2 vs 1 (the claim) and 2 vs 3, and the GED against the raters of (1), (2), (2a) and
DDPM-1000 on the same validation images, so speed is never bought with quality unnoticed.

    python benchmarks/benchmark_sampling.py --model checkpoints/ambiseg-lidc64 --distilled checkpoints/ambiseg-lidc64-lcm
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from ambiseg_diffusers import AmbiSegPipeline
from ambiseg_diffusers.pipelines.pipeline_ambiseg import DEFAULT_NUM_INFERENCE_STEPS, native_bf16, recommended_steps
from ambiseg_diffusers.lidc import eval_prompts, load_lidc64, pipeline_prompt_style
from ambiseg_diffusers.metrics import compute_metrics_batch
from ambiseg_diffusers.evaluation import build_sampling_scheduler, sample_rows


def timed(fn, repeats: int = 1):
    started = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    return (time.perf_counter() - started) / repeats, result


def variant(pipe, **components):
    """A pipeline sharing `pipe`'s weights and config, with some components replaced."""
    clone = AmbiSegPipeline(**{**pipe.components, **components}, autocast=pipe.config.autocast,
                            prompt_style=pipe.config.prompt_style)
    clone.set_progress_bar_config(disable=True)
    return clone


def with_scheduler(pipe, name: str):
    return variant(pipe, scheduler=build_sampling_scheduler(pipe.scheduler, name))


def base_model(pipe):
    """The pipeline without its LoRA adapters (a distilled sampler's teacher; the paper's protocol runs on it), with
    its own DDIM sampler; `pipe` itself when it has none."""
    if not getattr(pipe.unet, "peft_config", None):
        return pipe
    unet = copy.deepcopy(pipe.unet)
    unet.unload_lora()  # removed, not disabled: the paper's protocol must not pay for idle LoRA layers
    return variant(pipe, unet=unet, scheduler=build_sampling_scheduler(pipe.scheduler, "ddim"))


def sample_with_embeds(pipe, rows, indices, n, cache: dict):
    """The default call per image with `prompt_embeds` encoded once per image and reused (`cache`)."""
    out = []
    for j, i in enumerate(indices):
        if i not in cache:
            prompts = eval_prompts({k: rows[k][j] for k in rows}, "annotator")
            cache[i] = pipe.encode_prompt([prompts], pipe.device, n, batch_size=1)[:2]
        embeds, mask = cache[i]
        out.append(pipe(np.asarray(rows["image"][j], np.float32), prompt_embeds=embeds, prompt_attention_mask=mask,
                        num_samples=n, generator=torch.Generator().manual_seed(i)).masks)
    return np.concatenate(out)


def overhead_parts(pipe, rows, indices, n, bf16: bool) -> tuple[float, float]:
    """Seconds per image of prompt encoding and of the prior inside the default call, timed alone."""
    images = [pipe.preprocess(np.asarray(rows["image"][j], np.float32)) for j in range(len(indices))]
    prompts = [[eval_prompts({k: rows[k][j] for k in rows}, "annotator")] for j in range(len(indices))]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        encode, embeds = timed(lambda: [pipe.encode_prompt(p, pipe.device, n, batch_size=1)[:2] for p in prompts], 3)
        prior, _ = timed(lambda: [pipe.prepare_ambiguity_latents(x, e, m, n, 1.0, torch.Generator().manual_seed(0))
                                  for x, (e, m) in zip(images, embeds)], 3)
    return encode / len(indices), prior / len(indices)


def sample(pipe, rows, indices, n, steps, separate=False, images_per_call=1, autocast=None):
    """`(B, n, H, W)` masks for the rows; `separate` = one call per sample (the paper's protocol)."""
    out = []
    for start in range(0, len(indices), images_per_call):
        chunk = list(range(start, min(start + images_per_call, len(indices))))
        part = {k: [rows[k][i] for i in chunk] for k in rows}
        if separate:  # sample s of image i is its own call (seeded (i, s)) with prompt s round-robin
            images = np.stack([np.asarray(x, np.float32) for x in part["image"]])
            prompts = [eval_prompts({k: part[k][j] for k in part}, "annotator") for j in range(len(chunk))]
            masks = [pipe(images, [[p[s % len(p)]] for p in prompts], num_samples=1, num_inference_steps=steps,
                          generator=[torch.Generator().manual_seed(1000 * indices[i] + s) for i in chunk],
                          autocast=autocast).masks
                     for s in range(n)]
            out.append(np.concatenate(masks, axis=1))
        else:
            out.append(sample_rows(pipe, part, [indices[i] for i in chunk], n, "annotator", 0, steps, autocast=autocast))
    return np.concatenate(out)


def unet_floor(pipe, batch: int, steps: int, bf16: bool) -> float:
    """Seconds for `steps` bare UNet calls on a batch of `batch` rows (text, z and image already prepared)."""
    unet = pipe.unet
    size = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, size, size)
    text = torch.randn(batch, 160, pipe.text_encoder.config.hidden_size)
    z = torch.randn(batch, unet.latent_dim) if unet.latent_dim else None
    t = torch.tensor(500)

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for _ in range(steps):
                unet(x, t, encoder_hidden_states=text, class_labels=z)

    return timed(run)[0]


def ged(masks, rows) -> float:
    return float(compute_metrics_batch(masks, np.asarray(rows["masks"]).astype(bool))["ged"].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="checkpoints/ambiseg-lidc64")
    parser.add_argument("--distilled", default=None,
                        help="a distilled sampler's folder (e.g. checkpoints/ambiseg-lidc64-lcm), timed beside in row 4")
    parser.add_argument("--num_images", type=int, default=4, help="validation images for the GED columns")
    parser.add_argument("--timing_images", type=int, default=2, help="images timed for the slow paper protocol")
    parser.add_argument("--num_samples", type=int, default=16)
    parser.add_argument("--skip_ddpm", action="store_true", help="skip the DDPM-1000 quality reference")
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    pipe = AmbiSegPipeline.from_pretrained(args.model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    default_steps = recommended_steps(args.model) or DEFAULT_NUM_INFERENCE_STEPS
    base = base_model(pipe)
    paper = with_scheduler(base, "ddim")
    # (2b) the fast setting, DDIM-2: a distilled sampler's teacher's, else the model's own
    more, more_steps, more_name = base if base is not pipe else with_scheduler(pipe, "ddim"), 2, "DDIM-2 (the fast setting)"
    rows = load_lidc64("validate", prompt_style=pipeline_prompt_style(pipe))[: args.num_images]
    indices = list(range(args.num_images))
    n = args.num_samples
    print(f"model {args.model}; default sampler {type(pipe.scheduler).__name__}-{default_steps}; "
          f"{torch.get_num_threads()} threads; N = {n}")

    timing = {k: rows[k][: args.timing_images] for k in rows}
    t_idx = indices[: args.timing_images]
    bf16 = native_bf16(torch.device("cpu"))
    sample(pipe, timing, t_idx, 2, 2)  # warm-up: allocator and thread pools
    sample(pipe, timing, t_idx, 2, 2, autocast="no")
    results = {}
    s1, _ = timed(lambda: sample(paper, timing, t_idx, n, 100, separate=True, autocast="no"))
    results["1. paper: 16 calls x 1 sample, DDIM-100, float32"] = s1
    s2, _ = timed(lambda: sample(pipe, timing, t_idx, n, default_steps), repeats=3)
    results[f"2. default call: 1 x 16 samples, {default_steps} steps, {'bf16' if bf16 else 'float32'} (auto)"] = s2
    s2a, _ = timed(lambda: sample(pipe, timing, t_idx, n, default_steps, autocast="no"), repeats=3)
    results["2a. default, bf16 off (float32)"] = s2a
    s2b, _ = timed(lambda: sample(more, timing, t_idx, n, more_steps), repeats=3)
    results[f"2b. {more_name}, otherwise as (2)"] = s2b
    s2c, _ = timed(lambda: sample(pipe, timing, t_idx, n, default_steps, images_per_call=len(t_idx)), repeats=3)
    results[f"2c. default, {len(t_idx)} images per call"] = s2c
    channels_last = variant(pipe, unet=copy.deepcopy(pipe.unet).to(memory_format=torch.channels_last))
    sample(channels_last, timing, t_idx, n, default_steps)
    results["2d. default, channels_last UNet"] = timed(lambda: sample(channels_last, timing, t_idx, n, default_steps), repeats=3)[0]
    compiled = variant(pipe, unet=torch.compile(copy.deepcopy(pipe.unet)))
    compile_seconds, _ = timed(lambda: sample(compiled, timing, t_idx, n, default_steps))  # compiles once for these shapes
    results["2e. default, torch.compile UNet (after compiling)"] = timed(lambda: sample(compiled, timing, t_idx, n, default_steps), repeats=3)[0]
    embeds: dict = {}
    sample_with_embeds(pipe, timing, t_idx, n, embeds)
    results["2f. default, prompt_embeds passed (encoded once)"] = timed(lambda: sample_with_embeds(pipe, timing, t_idx, n, embeds), repeats=3)[0]
    if getattr(pipe.unet, "peft_config", None):  # a distilled sampler: its LoRA merged into the UNet's weights
        fused = variant(pipe, unet=copy.deepcopy(pipe.unet))
        fused.fuse_lora()
        fused.unload_lora_weights()  # the merged weights stay, the LoRA layers go
        sample(fused, timing, t_idx, n, default_steps)  # warm-up
        results["2g. default, LoRA fused (`fuse_lora()`, `unload_lora_weights()`)"] = timed(lambda: sample(fused, timing, t_idx, n, default_steps), repeats=3)[0]
    distilled = None
    if args.distilled:  # another folder's distilled sampler, timed in this run beside the default (LoRA fused)
        distilled = AmbiSegPipeline.from_pretrained(args.distilled, dtype=torch.float32)
        distilled.set_progress_bar_config(disable=True)
        distilled.fuse_lora()
        distilled.unload_lora_weights()
        distilled_steps = recommended_steps(args.distilled) or DEFAULT_NUM_INFERENCE_STEPS  # its own, as its card says
        sample(distilled, timing, t_idx, n, distilled_steps)  # warm-up
        results[f"4. {args.distilled}: its default call, LoRA fused"] = timed(
            lambda: sample(distilled, timing, t_idx, n, distilled_steps), repeats=3)[0]
    floor = unet_floor(pipe, n, default_steps, bf16=bf16) * len(t_idx)
    results["3. floor: the bare UNet forwards of (2)"] = floor
    encode_part, prior_part = overhead_parts(pipe, timing, t_idx, n, bf16)

    total = n * len(t_idx)
    print("\n| configuration | s per image | samples/s | vs paper |\n|---|---|---|---|")
    for name, seconds in results.items():
        print(f"| {name} | {seconds / len(t_idx):.3f} | {total / seconds:.1f} | {s1 / seconds:.1f}x |")
    print(f"\nspeed-up of the default call over the paper's protocol: {s1 / s2:.1f}x "
          f"(float32 {s1 / s2a:.1f}x, {more_name} {s1 / s2b:.1f}x)")
    print(f"default call over the bare-UNet floor: {s2 / floor:.3f} ({(s2 - floor) / len(t_idx):.3f} s per image), of "
          f"which prompt encoding {encode_part:.3f} s and the prior {prior_part:.3f} s per image (timed alone)")
    print(f"torch.compile took {compile_seconds:.1f} s for the first call")

    quality = {
        "1. DDIM-100": sample(paper, rows, indices, n, 100, images_per_call=4),
        f"2. default ({default_steps} steps, auto precision)": sample(pipe, rows, indices, n, default_steps, images_per_call=4),
        "2a. default, float32": sample(pipe, rows, indices, n, default_steps, images_per_call=4, autocast="no"),
        f"2b. {more_name}": sample(more, rows, indices, n, more_steps, images_per_call=4),
    }
    if distilled is not None:
        quality["4. distilled sampler"] = sample(distilled, rows, indices, n, distilled_steps, images_per_call=4)
    if not args.skip_ddpm:
        quality["DDPM-1000"] = sample(with_scheduler(base, "ddpm"), rows, indices, n, 1000, images_per_call=4)
    print(f"\nGED against the raters, first {args.num_images} validation images, N = {n}:")
    reference = ged(quality["DDPM-1000"], rows) if "DDPM-1000" in quality else None
    for name, masks in quality.items():
        value = ged(masks, rows)
        relative = f" ({(value / reference - 1) * 100:+.1f}% vs DDPM-1000)" if reference else ""
        print(f"  {name}: GED {value:.4f}{relative}, sample foreground {masks.mean():.4f}")
    print(f"  raters' foreground {np.asarray(rows['masks']).mean():.4f}")


if __name__ == "__main__":
    main()
