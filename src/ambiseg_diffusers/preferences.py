"""TDG-DiffDPO preference pairs: rank the reference model's own samples by Dice against the raters.

Strategies (the seed paper's):
- `best_rater`: s_BR(y) = max over raters of Dice(y, g_m).
- `mean_dice`: s_MD(y) = mean over raters of Dice(y, g_m) (the paper's best).
- `stochastic_run` (SRP): two independent sampling runs (different seeds) pool 2K candidates, scored with s_BR.
The winner is the highest-scoring candidate and the loser the lowest; an image whose candidates all tie gives no
pair (it is counted in the build's report, never silently dropped).

`record_states=True` also keeps how each mask of a pair was sampled: the UNet's input at every sampling step
(`winner_states`, `loser_states` `(S, H, W)`, the initial noise first), those steps' timesteps (`state_timesteps`),
and, for a UNet that takes an ambiguity latent, the z it was sampled with (`winner_z`, `loser_z`). train_dpo.py then
denoises a pair exactly as it was sampled, at the timesteps where the sampler decides the shape.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from datasets import Array2D, Array3D, Dataset, Features, Sequence, Value, load_from_disk
from tqdm.auto import tqdm

from .data import model_image_processor
from .metrics import pairwise_dice_iou

STRATEGIES = ("best_rater", "mean_dice", "stochastic_run")


def score_candidates(candidates: np.ndarray, raters: np.ndarray, strategy: str) -> np.ndarray:
    """Scores `(K,)` in [0, 1] of candidate masks `(K, H, W)` against rater masks `(M, H, W)` (bool/{0,1})."""
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {strategy!r}.")
    dice, _ = pairwise_dice_iou(torch.as_tensor(np.asarray(candidates))[None], torch.as_tensor(np.asarray(raters))[None])
    dice = dice[0].numpy()
    return dice.mean(axis=1) if strategy == "mean_dice" else dice.max(axis=1)


def pick_pair(scores: np.ndarray) -> tuple[int, int] | None:
    """(winner, loser) indices: the highest and the lowest score; None when every candidate ties."""
    if np.isclose(scores.max(), scores.min()):
        return None
    return int(np.argmax(scores)), int(np.argmin(scores))


def preference_features(image_shape: tuple, num_states: int = 0, latent_dim: int = 0) -> Features:
    """Columns of a pairs dataset for images of `image_shape` `(H, W)` or `(C, H, W)`."""
    size = tuple(image_shape[-2:])
    features = {
        "image": Array2D(tuple(image_shape), "float32") if len(image_shape) == 2 else Array3D(tuple(image_shape), "float32"),
        "prompt": Value("string"), "winner": Array2D(size, "uint8"), "loser": Array2D(size, "uint8"),
        "winner_score": Value("float32"), "loser_score": Value("float32"), "strategy": Value("string"),
        "source_index": Value("int32"), "nodule_id": Value("string"), "slice": Value("int32"),
    }
    if num_states:
        features.update({"winner_states": Array3D((num_states, *size), "float32"),
                         "loser_states": Array3D((num_states, *size), "float32"),
                         "state_timesteps": Sequence(Value("int32"), length=num_states)})
    if latent_dim:
        features.update({"winner_z": Sequence(Value("float32"), length=latent_dim),
                         "loser_z": Sequence(Value("float32"), length=latent_dim)})
    return Features(features)


def select_rows(num_rows: int, fraction: float, seed: int) -> list[int]:
    """The seeded subset of training rows used for preferences (the paper uses 25%)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"`fraction` must be in (0, 1], got {fraction}.")
    count = max(1, round(num_rows * fraction))
    return sorted(np.random.default_rng(seed).permutation(num_rows)[:count].tolist())


def candidate_generator(seed: int, run: int, row: int, stream: int = 0) -> torch.Generator:
    """The generator of one row's candidates in one sampling run: independent of chunking and of the other rows
    (`stream` 1: the initial noise drawn outside the pipeline when the sampling states are recorded)."""
    key = [seed, run, row] if stream == 0 else [seed, run, row, stream]
    return torch.Generator().manual_seed(int(np.random.default_rng(key).integers(2**63 - 1)))


def sample_with_states(pipeline, images: np.ndarray, prompts: list[str], rows: list[int], num_samples: int,
                       num_inference_steps: int | None, seed: int, run: int) -> tuple[np.ndarray, dict]:
    """`pipeline` samples for `images` with every row's own generators, recording each sample's sampling states.

    Returns masks `(B, K, H, W)` and {"states": `(B, K, S, H, W)` float32 (the UNet input at each of the S steps,
    the initial noise first), "timesteps": `(S,)`, "z": `(B, K, latent_dim)` or None}."""
    scheduler = pipeline.scheduler
    if float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0 or pipeline.unet.mask_channels != 1:
        raise ValueError(f"recording sampling states needs a scheduler whose UNet input is the latent itself "
                         f"(DDIM, DDPM, DPM-Solver, UniPC, DEIS; not {type(scheduler).__name__}) and one mask channel.")
    size = images.shape[-1]
    noise = torch.cat([torch.randn((num_samples, pipeline.unet.mask_channels, size, size),
                                   generator=candidate_generator(seed, run, i, stream=1)) for i in rows])
    states, latents = [noise.clone()], {}

    def record(pipe, step, timestep, tensors):
        states.append(tensors["latents"].detach().float().cpu().clone())
        if tensors.get("ambiguity_latents") is not None:
            latents["z"] = tensors["ambiguity_latents"].detach().float().cpu().clone()
        return {}

    inputs = ["latents", "ambiguity_latents"] if pipeline.unet.latent_dim else ["latents"]
    masks = pipeline(images, prompts, num_samples=num_samples, num_inference_steps=num_inference_steps,
                     generator=[candidate_generator(seed, run, i) for i in rows], latents=noise,
                     callback_on_step_end=record, callback_on_step_end_tensor_inputs=inputs).masks
    steps = torch.stack(states[:-1], 1)  # the input of each step; the last state is the output
    batch = len(rows)
    timesteps = pipeline.scheduler.timesteps.cpu()
    if timesteps.is_floating_point() and not torch.equal(timesteps, timesteps.round()):
        raise ValueError(f"{type(scheduler).__name__} samples at fractional timesteps; recording needs integer ones.")
    recorded = {"states": steps.reshape(batch, num_samples, *steps.shape[1:])[:, :, :, 0].numpy(),
                "timesteps": timesteps.numpy().astype(np.int32),
                "z": latents["z"].reshape(batch, num_samples, -1).numpy() if "z" in latents else None}
    return masks, recorded


def check_model_size(pipeline, dataset) -> None:
    """Pairs are built, and DPO trains, at the size the model was trained at: `dataset`'s images must be at its image
    processor's size (the scripts load them so, `load_from_args(..., image_processor=...)`)."""
    processor = model_image_processor(pipeline)
    height, width = np.asarray(dataset[0]["image"]).shape[-2:]
    if processor is not None and processor.config.do_resize and (height, width) != (processor.config.size,) * 2:
        size = processor.config.size
        raise ValueError(f"`dataset` images are {height}x{width}; preference pairs are built at the model's size "
                         f"{size}x{size} (its image processor's, as training resized): load the rows with "
                         "`load_multirater(..., image_processor=pipeline.image_processor)`.")


def build_preferences(
    pipeline, dataset, output_dir: str | os.PathLike, strategy: str = "mean_dice", num_candidates: int = 4,
    fraction: float = 0.25, seed: int = 0, images_per_call: int = 4, num_inference_steps: int | None = None,
    source: dict | None = None, overwrite: bool = False, record_states: bool = False,
) -> tuple[Dataset, dict]:
    """Samples `num_candidates` masks per selected row with the reference `pipeline`, picks winner and loser, and
    writes a `datasets.Dataset` to `output_dir` (atomically, at the end).

    Resumable: each chunk of images is stored in `.<output_dir>.parts/` beside it as it finishes, and a rerun with
    the same arguments (these, the reference's weights, the rows' contents and `source`, e.g. the data flags and split)
    skips chunks already there; other arguments are refused (ValueError) unless `overwrite` starts over. The prompt
    of a row is
    one of its raters' prompts (seeded choice among the raters who read it). `record_states`: see the module docstring
    (the initial noise is then drawn outside the pipeline, so the candidates differ from a build without it).
    Returns the dataset and a report {"images", "pairs", "ties", "strategy"}.
    """
    from .run_records import check_resumable, dataset_fingerprint, pipeline_fingerprint

    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {STRATEGIES}, got {strategy!r}.")
    check_model_size(pipeline, dataset)
    output_dir = Path(output_dir)
    parts = output_dir.parent / f".{output_dir.name}.parts"
    # the rows' contents, not their name: a rerun on other data (another folder of the same name, other columns,
    # another size) must never resume with pairs scored on the first data
    arguments = {"reference_sha256": pipeline_fingerprint(pipeline), "rows": len(dataset), "strategy": strategy,
                 "data.sha256": dataset_fingerprint(dataset),
                 "num_candidates": num_candidates, "fraction": fraction, "seed": seed, "images_per_call": images_per_call,
                 "num_inference_steps": num_inference_steps, **(source or {})}
    if record_states:  # absent otherwise: builds made before the option stay resumable
        arguments["record_states"] = True
    check_resumable(parts, arguments, sorted(parts.glob("part-*.json")), overwrite)
    rows = select_rows(len(dataset), fraction, seed)
    runs = 2 if strategy == "stochastic_run" else 1
    chunks = [rows[i : i + images_per_call] for i in range(0, len(rows), images_per_call)]

    for number, chunk in enumerate(tqdm(chunks, desc=f"preferences ({strategy})")):
        part = parts / f"part-{number:05d}.json"
        if part.exists():
            continue
        examples = dataset[chunk]
        prompts = []
        for index, valid, per_rater in zip(chunk, examples["annotator_valid"], examples["prompts"]):
            readers = [p for p, v in zip(per_rater, valid) if v]
            prompts.append(readers[int(np.random.default_rng([seed, index]).integers(len(readers)))])
        images = np.stack([np.asarray(x, np.float32) for x in examples["image"]])
        if record_states:
            sampled = [sample_with_states(pipeline, images, prompts, chunk, num_candidates, num_inference_steps, seed, run)
                       for run in range(runs)]
            candidates = np.concatenate([masks for masks, _ in sampled], axis=1)
            states = np.concatenate([r["states"] for _, r in sampled], axis=1)
            zs = None if sampled[0][1]["z"] is None else np.concatenate([r["z"] for _, r in sampled], axis=1)
            timesteps = sampled[0][1]["timesteps"]
        else:
            candidates = np.concatenate([
                pipeline(images, prompts, num_samples=num_candidates, num_inference_steps=num_inference_steps,
                         generator=[candidate_generator(seed, run, i) for i in chunk]).masks
                for run in range(runs)
            ], axis=1)
        records, arrays = [], {}
        for j, index in enumerate(chunk):
            raters = np.asarray(examples["masks"][j]).astype(bool)
            scores = score_candidates(candidates[j], raters, strategy)
            pair = pick_pair(scores)
            record = {"source_index": index, "tie": pair is None}
            if pair is not None:
                w, l = pair
                record.update(prompt=prompts[j], winner=np.flatnonzero(candidates[j, w]).tolist(),
                              loser=np.flatnonzero(candidates[j, l]).tolist(),
                              winner_score=float(scores[w]), loser_score=float(scores[l]))
                if record_states:
                    arrays.update({f"{index}_winner_states": states[j, w], f"{index}_loser_states": states[j, l],
                                   f"{index}_state_timesteps": timesteps})
                    if zs is not None:
                        arrays.update({f"{index}_winner_z": zs[j, w], f"{index}_loser_z": zs[j, l]})
            records.append(record)
        if record_states:  # written before the part's json, which marks the chunk complete
            with open(part.with_suffix(".tmp.npz"), "wb") as f:
                np.savez(f, **arrays)
            os.replace(part.with_suffix(".tmp.npz"), part.with_suffix(".npz"))
        tmp = part.with_suffix(".tmp")
        tmp.write_text(json.dumps(records))
        os.replace(tmp, part)  # a chunk is either complete or absent

    return _assemble(dataset, parts, output_dir, strategy)


def _assemble(dataset, parts: Path, output_dir: Path, strategy: str) -> tuple[Dataset, dict]:
    records, arrays = [], {}
    with_states = json.loads((parts / "run_arguments.json").read_text()).get("record_states", False)
    for part in sorted(parts.glob("part-*.json")):
        records += json.loads(part.read_text())
        if with_states:
            if not part.with_suffix(".npz").exists():
                raise FileNotFoundError(f"{part.with_suffix('.npz')} is missing (the sampling states of {part.name}); "
                                        "delete both files and run the build again to redo that chunk.")
            with np.load(part.with_suffix(".npz")) as stored:
                arrays.update({key: stored[key] for key in stored.files})
    pairs = [r for r in records if not r["tie"]]
    image_shape = np.asarray(dataset[0]["image"]).shape

    def unflatten(indices):
        mask = np.zeros(int(np.prod(image_shape[-2:])), np.uint8)
        mask[indices] = 1
        return mask.reshape(image_shape[-2:])

    sources = dataset[[r["source_index"] for r in pairs]] if pairs else {"image": [], "nodule_id": [], "slice": []}
    columns = {
        "image": [np.asarray(x, np.float32) for x in sources["image"]],
        "prompt": [r["prompt"] for r in pairs],
        "winner": [unflatten(r["winner"]) for r in pairs],
        "loser": [unflatten(r["loser"]) for r in pairs],
        "winner_score": [r["winner_score"] for r in pairs],
        "loser_score": [r["loser_score"] for r in pairs],
        "strategy": [strategy] * len(pairs),
        "source_index": [r["source_index"] for r in pairs],
        "nodule_id": list(sources.get("nodule_id", [""] * len(pairs))),
        "slice": [int(s) for s in sources.get("slice", [-1] * len(pairs))],
    }
    num_states = latent_dim = 0
    if pairs and arrays:
        first = pairs[0]["source_index"]
        num_states = len(arrays[f"{first}_state_timesteps"])
        for key in ("winner_states", "loser_states", "state_timesteps"):
            columns[key] = [arrays[f"{r['source_index']}_{key}"] for r in pairs]
        if f"{first}_winner_z" in arrays:
            latent_dim = len(arrays[f"{first}_winner_z"])
            for key in ("winner_z", "loser_z"):
                columns[key] = [arrays[f"{r['source_index']}_{key}"] for r in pairs]
    result = Dataset.from_dict(columns, features=preference_features(image_shape, num_states, latent_dim))
    tmp = output_dir.parent / f".{output_dir.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    result.save_to_disk(str(tmp), num_shards=1)  # 0 pairs (every image tied): still one, empty, loadable shard
    report = {"strategy": strategy, "images": len(records), "pairs": len(pairs), "ties": len(records) - len(pairs)}
    (tmp / "preference_report.json").write_text(json.dumps(report, indent=2))
    shutil.copy(parts / "run_arguments.json", tmp / "run_arguments.json")
    shutil.rmtree(output_dir, ignore_errors=True)
    os.replace(tmp, output_dir)
    shutil.rmtree(parts)
    return load_from_disk(str(output_dir)), report
