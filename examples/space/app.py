#!/usr/bin/env python
"""AmbiSeg demo: sixteen plausible outlines of a lung nodule, where they disagree, and how a prompt or the
TDG-DiffDPO preference knob moves them.

    python examples/space/app.py                 # http://127.0.0.1:7860, committed checkpoints, local LIDC data
    python examples/space/app.py --model ambiseg-diffusers/tdg-diffdpo-lidc64 --port 7861

This folder is laid out as a Hugging Face Space (`app.py`, `requirements.txt`, `README.md` with the Space header).
Pick a validation nodule (its radiologists' masks are shown and the metrics computed) or upload an image (PNG/JPEG,
NumPy `.npy`, or a DICOM slice when pydicom is installed), set the nine LIDC characteristics (the prompt is built
from them and stays editable), and sample. Requests are queued one at a time (2 CPU cores); the bar follows the
denoising steps.
"""

from __future__ import annotations

import argparse
import inspect
import os
from pathlib import Path

import gradio as gr
import numpy as np
import PIL.Image
import torch

from ambiseg_diffusers import AmbiSegPipeline, compute_metrics
from ambiseg_diffusers.lidc import (
    PROMPT_STYLES, RATING_MEANINGS, RATING_NAMES, load_lidc64, pipeline_prompt_style, ratings_to_prompt,
)
from ambiseg_diffusers.metrics import TABLE_COLUMNS
from ambiseg_diffusers.visualization import heat_map, overlay, to_uint8

ROOT = Path(__file__).resolve().parents[2]
LOCAL_MODEL = ROOT / "checkpoints" / "tdg-diffdpo-lidc64"
HUB_MODEL = "ambiseg-diffusers/tdg-diffdpo-lidc64"
MAX_SIDE = 512
# One slice is at most a few MB (a 512x512 float64 .npy: 2 MB): anything far larger is refused before it is read, by
# the server (launch's max_file_size) and again by read_upload, so one visitor cannot fill the memory or the queue.
MAX_UPLOAD_MB = 16
UPLOAD_TYPES = [".png", ".jpg", ".jpeg", ".npy", ".dcm"]


# ----------------------------------------------------------------------------------------------- inputs
def rating_choices(name: str) -> list[str]:
    return [f"{value} - {meaning}" for value, meaning in enumerate(RATING_MEANINGS[name], start=1)]


def prompt_from_choices(style: str, diameter_mm: float, volume_mm3: float, *choices: str) -> str:
    """The nine dropdown values ("3 - Ovoid", ...) and the nodule's size -> the prompt of `ratings_to_prompt` (the size
    is stated by the "paper" style only)."""
    ratings = {name: int(choice.split(" - ")[0]) for name, choice in zip(RATING_NAMES, choices)}
    return ratings_to_prompt(ratings, style, diameter_mm, volume_mm3)


def read_upload(path: str | None) -> np.ndarray:
    """An uploaded file -> one grey image `(H, W)` float32, or a gr.Error saying what is wrong with it."""
    if not path:
        raise gr.Error("Upload an image first (PNG/JPEG, .npy or a DICOM slice).")
    suffix = Path(path).suffix.lower()
    size = os.path.getsize(path)
    if size > MAX_UPLOAD_MB * 2**20:
        raise gr.Error(f"{Path(path).name} is {size / 2**20:.1f} MB; uploads are limited to {MAX_UPLOAD_MB} MB (one "
                       f"grey slice of at most {MAX_SIDE}x{MAX_SIDE} pixels).")
    try:
        if suffix == ".npy":
            check_npy_header(path)
            image = np.load(path, allow_pickle=False)
        elif suffix == ".dcm":
            try:
                import pydicom
            except ImportError as error:
                raise gr.Error("DICOM upload needs pydicom (`pip install pydicom`); upload a PNG or .npy instead.") from error
            data = pydicom.dcmread(path)
            image = data.pixel_array * float(getattr(data, "RescaleSlope", 1)) + float(getattr(data, "RescaleIntercept", 0))
        else:
            image = np.asarray(PIL.Image.open(path).convert("L"))
    except gr.Error:
        raise
    except Exception as error:
        raise gr.Error(f"Could not read {Path(path).name} as an image: {type(error).__name__}: {error}") from error
    image = np.squeeze(np.asarray(image, dtype=np.float32))
    if image.ndim != 2:
        raise gr.Error(f"Expected one 2-D grey image, got an array of shape {image.shape}.")
    if min(image.shape) < 16 or max(image.shape) > MAX_SIDE:
        # any size in between: the pipeline's image processor resizes it as training did and returns the masks at it
        raise gr.Error(f"Image size {image.shape[1]}x{image.shape[0]}: height and width must be between 16 and "
                       f"{MAX_SIDE} pixels (a crop centred on the nodule, as the model was trained on).")
    if not np.isfinite(image).all():
        raise gr.Error("The image contains NaN or infinite values.")
    return image


def check_npy_header(path: str) -> None:
    """Reads only the `.npy` header (shape, dtype) and refuses what is not one numeric slice of at most MAX_SIDE
    pixels a side, before any of the data is read."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = reader(f)
    sides = [n for n in shape if n != 1]
    if dtype.hasobject or dtype.kind not in "biuf":
        raise gr.Error(f"{Path(path).name} holds {dtype} values; expected numbers (a grey image).")
    if len(sides) != 2 or max(sides) > MAX_SIDE:
        raise gr.Error(f"{Path(path).name} holds an array of shape {tuple(shape)}; expected one 2-D grey image of "
                       f"at most {MAX_SIDE}x{MAX_SIDE} pixels.")


def launch(demo: gr.Blocks, **kwargs):
    """`demo.launch` with the upload limit (the server answers an oversize upload with an error, unread)."""
    return demo.launch(max_file_size=f"{MAX_UPLOAD_MB}mb", **kwargs)


# ----------------------------------------------------------------------------------------------- pictures
def tile(tiles: list[np.ndarray], columns: int, scale: int = 3) -> PIL.Image.Image:
    """RGB tiles `(H, W, 3)` in a grid with a 2-pixel white gap, enlarged `scale` times (nearest)."""
    height, width = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    grid = np.full((rows * (height + 2) - 2, columns * (width + 2) - 2, 3), 255, np.uint8)
    for i, part in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[r * (height + 2): r * (height + 2) + height, c * (width + 2): c * (width + 2) + width] = part
    picture = PIL.Image.fromarray(grid)
    return picture.resize((picture.width * scale, picture.height * scale), PIL.Image.NEAREST)


def blend(base: np.ndarray, heat: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    grey = np.repeat(base[..., None], 3, axis=-1).astype(np.float32)
    return (alpha * heat + (1 - alpha) * grey).astype(np.uint8)


def input_picture(image: np.ndarray, raters: np.ndarray | None) -> PIL.Image.Image:
    base = to_uint8(image)
    tiles = [np.repeat(base[..., None], 3, axis=-1)]
    if raters is not None:
        tiles += [overlay(base, r, color=(60, 200, 90)) for r in raters]
    return tile(tiles, columns=len(tiles))


# ----------------------------------------------------------------------------------------------- sampling
def segment(pipe: AmbiSegPipeline, image: np.ndarray, prompt: str, num_samples: int = 16, steps: int = 5,
            seed: int = 0, preference_scale: float | None = None, guidance_scale: float = 1.0,
            raters: np.ndarray | None = None, on_step=None):
    """Samples masks and returns (sample grid, mean overlay, uncertainty overlay, metrics rows or None, raw output)."""
    callback = None
    if on_step is not None:
        def callback(pipeline, step, timestep, tensors):
            on_step(step + 1, pipeline.num_timesteps)
            return {}
    out = pipe(image, prompt, num_samples=int(num_samples), num_inference_steps=int(steps),
               generator=torch.Generator().manual_seed(int(seed)), guidance_scale=float(guidance_scale),
               preference_scale=preference_scale, callback_on_step_end=callback)
    base = to_uint8(image)
    masks, mean, variance = out.masks[0], out.pixel_mean[0], out.pixel_variance[0]
    samples = tile([overlay(base, m) for m in masks], columns=min(len(masks), 8))
    mean_picture = tile([blend(base, heat_map(mean, 1.0))], columns=1, scale=6)
    uncertainty = tile([blend(base, heat_map(variance, 0.25))], columns=1, scale=6)
    rows = None
    if raters is not None:
        metrics = compute_metrics(masks, raters.astype(bool))
        rows = [[name, round(metrics[name], 3)] for name in TABLE_COLUMNS]
    return samples, mean_picture, uncertainty, rows, out


def has_preference_adapter(pipe: AmbiSegPipeline) -> bool:
    return "preference" in (getattr(pipe.unet, "peft_config", None) or {})


# ----------------------------------------------------------------------------------------------- the app
def build_demo(pipe: AmbiSegPipeline, nodules=None) -> gr.Blocks:
    """The Blocks app around `pipe`; `nodules` (a lidc64 Dataset) fills the gallery, or None for uploads only."""
    pipe.set_progress_bar_config(disable=True)
    adapter = has_preference_adapter(pipe)
    default_steps = int(inspect.signature(pipe.__call__).parameters["num_inference_steps"].default)
    thumbnails = [] if nodules is None else [
        (PIL.Image.fromarray(to_uint8(np.asarray(row["image"]))).resize((96, 96)), f"{row['nodule_id']} / {row['slice']}")
        for row in nodules]

    def choose(evt: gr.SelectData):
        row = nodules[evt.index]
        image, raters = np.asarray(row["image"], np.float32), np.asarray(row["masks"])
        reader = next(m for m, valid in enumerate(row["annotator_valid"]) if valid)
        ratings = np.asarray(row["ratings"])[reader]
        choices = [rating_choices(name)[int(value) - 1] for name, value in zip(RATING_NAMES, ratings)]
        state = {"image": image, "raters": raters, "label": f"nodule {row['nodule_id']}, slice {row['slice']}"}
        return (state, input_picture(image, raters), f"**{state['label']}** with its {int(sum(row['annotator_valid']))} "
                "radiologists' masks (green)", round(float(row["diameter_mm"][reader]), 1),
                round(float(row["volume_mm3"][reader])), *choices)

    def upload(path):
        image = read_upload(path)
        state = {"image": image, "raters": None, "label": Path(path).name}
        return state, input_picture(image, None), f"**{state['label']}** (uploaded; no raters' masks, so no metrics)"

    def run(state, prompt, num_samples, steps, seed, preference, guidance, progress=gr.Progress()):
        if not state:
            raise gr.Error("Pick a nodule from the gallery or upload an image first.")
        progress(0, desc="sampling")
        samples, mean, uncertainty, rows, _ = segment(
            pipe, state["image"], prompt, num_samples, steps, seed, preference if adapter else None, guidance,
            state["raters"], on_step=lambda done, total: progress(done / total, desc=f"step {done} of {total}"))
        table = rows if rows is not None else [["(no raters' masks for an upload)", None]]
        return samples, mean, uncertainty, table

    def segment_nodule(index: int, prompt: str, num_samples: int = 16, steps: int = default_steps, seed: int = 0,
                       preference_scale: float = 1.0, guidance_scale: float = 1.0) -> dict:
        """API: the metrics of one gallery nodule (index into the validation split) under a prompt."""
        if nodules is None or not 0 <= int(index) < len(nodules):
            raise gr.Error(f"`index` must be between 0 and {0 if nodules is None else len(nodules) - 1}.")
        row = nodules[int(index)]
        *_, rows, out = segment(pipe, np.asarray(row["image"], np.float32), prompt, num_samples, steps, seed,
                                preference_scale if adapter else None, guidance_scale, np.asarray(row["masks"]))
        return {"metrics": dict(rows), "sample_foreground": float(out.masks.mean())}

    with gr.Blocks(title="AmbiSeg: ambiguous lung-nodule segmentation") as demo:
        gr.Markdown(
            "# AmbiSeg: sixteen plausible outlines of a lung nodule\n"
            "Radiologists disagree on where a nodule ends. This mask-diffusion model returns a *distribution* of "
            "segmentations, steered by a description of the nodule. **Research use only; not a medical device.** "
            "Data: LIDC-IDRI (TCIA, CC BY 3.0)."
        )
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                gallery = gr.Gallery(thumbnails, label="validation nodules (click one)", columns=6, height=260,
                                     allow_preview=False, elem_id="nodules", visible=bool(thumbnails))
                upload_box = gr.File(label="or upload an image", file_types=UPLOAD_TYPES, elem_id="upload")
                chosen = gr.Image(label="input", interactive=False, elem_id="input-image")
                caption = gr.Markdown("")
            with gr.Column(scale=1):
                with gr.Accordion("the nine LIDC characteristics", open=True):
                    dropdowns = []
                    for first in range(0, len(RATING_NAMES), 3):
                        with gr.Row():
                            dropdowns += [gr.Dropdown(rating_choices(name), value=rating_choices(name)[0], label=name,
                                                      elem_id=f"rating-{name}") for name in RATING_NAMES[first:first + 3]]
                with gr.Row():
                    diameter = gr.Number(10.0, label="diameter (mm)", elem_id="diameter")
                    volume = gr.Number(300, label="volume (mm3)", elem_id="volume")
                # The model's own style (pipe.config.prompt_style), the one it was trained on, is the default.
                style = gr.Radio(list(PROMPT_STYLES), value=pipeline_prompt_style(pipe),
                                 label=f"prompt style (this model was trained on '{pipeline_prompt_style(pipe)}')")
                prompt = gr.Textbox(prompt_from_choices(style.value, diameter.value, volume.value,
                                                        *[d.value for d in dropdowns]), lines=4,
                                    label="prompt (editable)", elem_id="prompt")
                with gr.Row():
                    num_samples = gr.Slider(1, 32, value=16, step=1, label="samples")
                    steps = gr.Slider(1, 50, value=default_steps, step=1, label="denoising steps")
                with gr.Row():
                    seed = gr.Number(0, precision=0, label="seed")
                    guidance = gr.Slider(1.0, 5.0, value=1.0, step=0.5, label="guidance scale (1 = off)")
                preference = gr.Slider(0.0, 1.5, value=1.0, step=0.25, visible=adapter,
                                       label="preference_scale (0 = reference AmbiSeg, 1 = TDG-DiffDPO)")
                button = gr.Button("Sample", variant="primary", elem_id="sample")
        with gr.Row():
            samples = gr.Image(label="samples (red)", interactive=False, elem_id="samples")
        with gr.Row():
            mean = gr.Image(label="pixel-wise mean", interactive=False, elem_id="mean")
            uncertainty = gr.Image(label="uncertainty (variance)", interactive=False, elem_id="uncertainty")
            metrics = gr.Dataframe(headers=["metric", "value"], label="metrics against the raters",
                                   interactive=False, elem_id="metrics")

        gallery.select(choose, None, [state, chosen, caption, diameter, volume, *dropdowns], api_visibility="private")
        upload_box.upload(upload, upload_box, [state, chosen, caption], api_visibility="private")
        for control in (*dropdowns, style, diameter, volume):
            control.change(prompt_from_choices, [style, diameter, volume, *dropdowns], prompt,
                           show_progress="hidden", api_visibility="private")
        button.click(run, [state, prompt, num_samples, steps, seed, preference, guidance],
                     [samples, mean, uncertainty, metrics], api_name="sample", concurrency_limit=1)
        gr.api(segment_nodule, api_name="segment_nodule")
    return demo.queue(max_size=16, default_concurrency_limit=1)


def load_nodules(data_dir: str | None, prompt_style: str = "paper"):
    try:
        return load_lidc64("validate", data_dir, prompt_style)
    except FileNotFoundError:
        return None  # uploads only


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(LOCAL_MODEL) if LOCAL_MODEL.is_dir() else HUB_MODEL,
                        help="pipeline folder or Hub id (default: the committed TDG-DiffDPO checkpoint)")
    parser.add_argument("--data_dir", default=None, help="the lidc64 folder or the folder above it")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    args = parser.parse_args(argv)
    pipe = AmbiSegPipeline.from_pretrained(args.model)
    nodules = load_nodules(args.data_dir, pipeline_prompt_style(pipe))
    launch(build_demo(pipe, nodules), server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
