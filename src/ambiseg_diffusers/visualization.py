"""Pictures people would rather look at than read: sample grids (the paper's Figure 7 panel) and uncertainty maps."""

from __future__ import annotations

import numpy as np
import PIL.Image
import PIL.ImageDraw


def to_uint8(array: np.ndarray) -> np.ndarray:
    """An image of any range -> uint8 grey, stretched between its 1st and 99th percentiles."""
    array = np.asarray(array, dtype=np.float32)
    low, high = np.percentile(array, 1), np.percentile(array, 99)
    return (np.clip((array - low) / max(high - low, 1e-6), 0, 1) * 255).astype(np.uint8)


def overlay(image_u8: np.ndarray, mask: np.ndarray, color=(255, 60, 60)) -> np.ndarray:
    """A mask `(H, W)` drawn in `color` over a uint8 grey image `(H, W)` -> RGB `(H, W, 3)` uint8."""
    rgb = np.repeat(image_u8[..., None], 3, axis=-1).astype(np.float32)
    mask = np.asarray(mask, dtype=bool)
    rgb[mask] = 0.45 * rgb[mask] + 0.55 * np.array(color, dtype=np.float32)
    return rgb.astype(np.uint8)


def heat_map(values: np.ndarray, vmax: float) -> np.ndarray:
    """Values in [0, vmax] `(H, W)` -> RGB `(H, W, 3)` uint8 heat map."""
    v = np.clip(np.asarray(values, dtype=np.float32) / max(vmax, 1e-6), 0, 1)
    # black -> red -> yellow -> white, readable without a colour bar
    return (np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], -1) * 255).astype(np.uint8)


def sample_grid(
    images: np.ndarray, annotations: np.ndarray, samples: np.ndarray, scale: int = 2, max_samples: int = 16
) -> PIL.Image.Image:
    """One row per image: input | the raters' masks | samples | pixel-wise mean | majority vote | variance.

    `images` `(B, H, W)` any range (or `(B, C, H, W)`: the first channel is drawn), `annotations` `(B, M, H, W)` or a
    list of B `(M_i, H, W)` (rater counts may differ; shorter rows are padded with blank tiles), `samples`
    `(B, N, H, W)` bool/{0,1}. Masks are drawn in red over the image; mean and variance are heat maps (variance scaled to its max 0.25).
    """
    rows = []
    most = max(len(r) for r in annotations)
    for image, raters, masks in zip(images, annotations, samples):
        base = to_uint8(image if np.ndim(image) == 2 else np.asarray(image)[0])
        masks = np.asarray(masks, dtype=np.float32)[:max_samples]
        mean = masks.mean(0)
        tiles = [np.repeat(base[..., None], 3, -1)]
        tiles += [overlay(base, r) for r in raters]
        tiles += [np.full((*base.shape, 3), 255, np.uint8)] * (most - len(raters))
        tiles += [overlay(base, m) for m in masks]
        tiles += [heat_map(mean, 1.0), overlay(base, mean > 0.5), heat_map(mean * (1 - mean), 0.25)]
        gap = np.full((base.shape[0], 2, 3), 255, np.uint8)
        rows.append(np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    picture = PIL.Image.fromarray(np.concatenate(rows, axis=0))
    picture = picture.resize((picture.width * scale, picture.height * scale), PIL.Image.NEAREST)
    return _with_header(picture, images.shape[-1] * scale, 2 * scale, most, min(samples.shape[1], max_samples))


def _with_header(picture: PIL.Image.Image, tile: int, gap: int, raters: int, samples: int) -> PIL.Image.Image:
    """Column labels above the grid, so the picture reads without a caption."""
    labels = [(0, "image"), (1, f"{raters} raters"), (1 + raters, f"{samples} samples"),
              (1 + raters + samples, "mean"), (2 + raters + samples, "majority"), (3 + raters + samples, "variance")]
    out = PIL.Image.new("RGB", (picture.width, picture.height + 14), "white")
    out.paste(picture, (0, 14))
    draw = PIL.ImageDraw.Draw(out)
    for column, text in labels:
        draw.text((column * (tile + gap) + 2, 1), text, fill=(0, 0, 0))
    return out
