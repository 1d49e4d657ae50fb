"""Ambiguity metrics of the seed paper (appendix A.3), vectorised over all pairs and over a batch of images.

Conventions (they differ across public code):
- Dice(empty, empty) = IoU(empty, empty) = 1 (two raters who both say "no nodule" agree perfectly).
- GED is the squared form of the paper's Eq. 14, `2 E d(S, G) - E d(S, S') - E d(G, G')`, each expectation over
  all ordered pairs, the diagonal included (as Kohl et al. and PHiSeg compute it); `ged` uses d = 1 - Dice,
  `ged_iou` uses d = 1 - IoU.
- S_c (sample coverage) = |union(S) & union(G)| / |union(G)|, and 1 when union(G) is empty.
- D_max = mean over annotations g of max over samples s of Dice(s, g).
- DA (diversity agreement) = 1 - (|dV_min| + |dV_max|) / 2, with V_min / V_max the min / max of 1 - Dice over
  distinct pairs within each set (a set of one mask has V_min = V_max = 0), dV the samples' minus the raters'.
- CI (combined sensitivity) = harmonic mean of S_c, D_max and DA (0 when any of them is 0).
- avg_dice / avg_iou: mean over all (sample, annotation) pairs.
"""

from __future__ import annotations

import numpy as np
import torch

METRIC_NAMES = ("ged", "ged_iou", "sc", "dmax", "da", "ci", "avg_dice", "avg_iou")
# The paper's table layout.
TABLE_COLUMNS = ("avg_dice", "avg_iou", "ged", "ged_iou", "ci", "dmax", "sc", "da")


def pairwise_dice_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice and IoU between every mask of `a` `(B, N, H, W)` and of `b` `(B, M, H, W)` -> two `(B, N, M)` in [0, 1]."""
    a = a.flatten(2).double()
    b = b.flatten(2).double()
    inter = a @ b.transpose(1, 2)
    total = a.sum(-1)[:, :, None] + b.sum(-1)[:, None, :]
    union = total - inter
    empty = total == 0
    dice = torch.where(empty, torch.ones_like(inter), 2 * inter / total.clamp_min(1))
    iou = torch.where(empty, torch.ones_like(inter), inter / union.clamp_min(1))
    return dice, iou


def _ged(cross: torch.Tensor, within_s: torch.Tensor, within_g: torch.Tensor) -> torch.Tensor:
    return 2 * (1 - cross).mean((1, 2)) - (1 - within_s).mean((1, 2)) - (1 - within_g).mean((1, 2))


def _distinct_range(distance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max over off-diagonal entries of `(B, K, K)`; 0 and 0 when K == 1."""
    k = distance.shape[-1]
    if k == 1:
        zero = distance.new_zeros(distance.shape[0])
        return zero, zero
    off = ~torch.eye(k, dtype=torch.bool, device=distance.device)
    values = distance[:, off]
    return values.min(-1).values, values.max(-1).values


def _binary(masks: torch.Tensor, name: str) -> torch.Tensor:
    """bool masks from bool or {0, 1} input; anything else (probabilities, {-1, 1} masks, NaN) is refused rather
    than silently thresholded at "non-zero"."""
    if masks.dtype == torch.bool:
        return masks
    if masks.is_floating_point() and not torch.isfinite(masks).all():
        raise ValueError(f"`{name}` contains NaN or inf; expected binary masks (bool or 0/1).")
    if not ((masks == 0) | (masks == 1)).all():
        values = [round(v, 4) for v in torch.unique(masks)[:6].tolist()]
        raise ValueError(f"`{name}` must be binary masks (bool or 0/1), got values such as {values}; threshold "
                         "probabilities first (e.g. `out.masks`, or `probabilities > 0.5`).")
    return masks.bool()


def compute_metrics_batch(samples, annotations) -> dict[str, np.ndarray]:
    """Metrics for a batch of images: `samples` `(B, N, H, W)` and `annotations` `(B, M, H, W)`, binary (bool or
    0/1; anything else raises ValueError), numpy or torch. Returns a dict of float64 arrays of shape `(B,)` keyed by
    `METRIC_NAMES`."""
    samples = torch.as_tensor(np.asarray(samples) if not torch.is_tensor(samples) else samples)
    annotations = torch.as_tensor(np.asarray(annotations) if not torch.is_tensor(annotations) else annotations)
    if samples.ndim != 4 or annotations.ndim != 4:
        raise ValueError(
            f"`samples` and `annotations` must be (B, N, H, W) and (B, M, H, W); got {tuple(samples.shape)} "
            f"and {tuple(annotations.shape)}."
        )
    if samples.shape[0] != annotations.shape[0] or samples.shape[2:] != annotations.shape[2:]:
        raise ValueError(f"shape mismatch: `samples` {tuple(samples.shape)} vs `annotations` {tuple(annotations.shape)}.")
    if samples.shape[1] < 1 or annotations.shape[1] < 1:
        raise ValueError("need at least one sample and one annotation per image.")
    s = _binary(samples, "samples")
    g = _binary(annotations, "annotations")

    dice_sg, iou_sg = pairwise_dice_iou(s, g)
    dice_ss, iou_ss = pairwise_dice_iou(s, s)
    dice_gg, iou_gg = pairwise_dice_iou(g, g)

    union_s = s.any(1).flatten(1)
    union_g = g.any(1).flatten(1)
    covered = (union_s & union_g).sum(-1).double()
    g_area = union_g.sum(-1).double()
    sc = torch.where(g_area == 0, torch.ones_like(g_area), covered / g_area.clamp_min(1))

    dmax = dice_sg.max(dim=1).values.mean(-1)

    s_min, s_max = _distinct_range(1 - dice_ss)
    g_min, g_max = _distinct_range(1 - dice_gg)
    da = 1 - ((s_min - g_min).abs() + (s_max - g_max).abs()) / 2

    parts = torch.stack([sc, dmax, da])
    ci = torch.where(
        (parts > 0).all(0), 3 * sc * dmax * da / (sc * dmax + dmax * da + sc * da).clamp_min(1e-12), torch.zeros_like(sc)
    )
    result = {
        "ged": _ged(dice_sg, dice_ss, dice_gg),
        "ged_iou": _ged(iou_sg, iou_ss, iou_gg),
        "sc": sc,
        "dmax": dmax,
        "da": da,
        "ci": ci,
        "avg_dice": dice_sg.mean((1, 2)),
        "avg_iou": iou_sg.mean((1, 2)),
    }
    return {k: v.cpu().numpy() for k, v in result.items()}


def compute_metrics_rows(samples, annotations) -> dict[str, np.ndarray]:
    """Metrics for images whose rater counts differ: `samples` `(B, N, H, W)` and `annotations` a list of B arrays
    `(M_i, H, W)` (each image's own raters, nothing padded), binary. Rows with the same rater count are scored
    together by `compute_metrics_batch`. Returns a dict of float64 arrays of shape `(B,)` keyed by `METRIC_NAMES`."""
    if len(annotations) != len(samples):
        raise ValueError(f"`annotations` holds {len(annotations)} images, `samples` {len(samples)}.")
    groups: dict[tuple, list[int]] = {}
    for i, raters in enumerate(annotations):
        groups.setdefault(tuple(np.shape(raters)), []).append(i)
    out = {name: np.zeros(len(annotations)) for name in METRIC_NAMES}
    for rows in groups.values():
        batch = compute_metrics_batch(np.asarray(samples)[rows], np.stack([np.asarray(annotations[i]) for i in rows]))
        for name, values in batch.items():
            out[name][rows] = values
    return out


def compute_metrics(samples, annotations) -> dict[str, float]:
    """Metrics for one image: `samples` `(N, H, W)` and `annotations` `(M, H, W)`, binary (bool or 0/1), numpy or torch.

    Returns floats keyed "ged", "ged_iou", "sc", "dmax", "da", "ci", "avg_dice", "avg_iou" (see module docstring).
    """
    samples = samples if torch.is_tensor(samples) else torch.as_tensor(np.asarray(samples))
    annotations = annotations if torch.is_tensor(annotations) else torch.as_tensor(np.asarray(annotations))
    if samples.ndim != 3 or annotations.ndim != 3:
        raise ValueError(
            f"`samples` must be (N, H, W) and `annotations` (M, H, W); got {tuple(samples.shape)}, {tuple(annotations.shape)}."
        )
    batch = compute_metrics_batch(samples[None], annotations[None])
    return {k: float(v[0]) for k, v in batch.items()}


def summarize(per_image: dict[str, np.ndarray], n_bootstrap: int = 1000, seed: int = 0) -> dict[str, dict[str, float]]:
    """Mean and 95% bootstrap interval over images for each metric: `{name: {"mean", "low", "high"}}`."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, values in per_image.items():
        values = np.asarray(values, dtype=np.float64)
        idx = rng.integers(0, len(values), size=(n_bootstrap, len(values)))
        means = values[idx].mean(1)
        out[name] = {"mean": float(values.mean()), "low": float(np.quantile(means, 0.025)), "high": float(np.quantile(means, 0.975))}
    return out


def paired_difference(values, reference, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean per-image difference `values - reference` `(I,)` and its 95% bootstrap interval: both measured on the same
    images with the same seeds, so the pairs share their noise and the interval is much tighter than two unpaired
    intervals. Returns `{"mean", "low", "high"}`."""
    diff = np.asarray(values, np.float64) - np.asarray(reference, np.float64)
    if diff.ndim != 1 or len(diff) == 0:
        raise ValueError(f"`values` and `reference` must be equal-length 1-D per-image arrays, got shape {diff.shape}.")
    idx = np.random.default_rng(seed).integers(0, len(diff), size=(n_bootstrap, len(diff)))
    means = diff[idx].mean(1)
    return {"mean": float(diff.mean()), "low": float(np.quantile(means, 0.025)), "high": float(np.quantile(means, 0.975))}


def format_table(rows: dict[str, dict[str, dict[str, float]]], with_interval: bool = False) -> str:
    """Markdown table in the paper's layout; `rows` maps a row label to `summarize()`'s output."""
    header = "| | " + " | ".join(TABLE_COLUMNS) + " |\n|---|" + "---|" * len(TABLE_COLUMNS) + "\n"
    lines = []
    for label, summary in rows.items():
        cells = []
        for c in TABLE_COLUMNS:
            m = summary[c]
            cells.append(f"{m['mean']:.3f} [{m['low']:.3f}, {m['high']:.3f}]" if with_interval else f"{m['mean']:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return header + "\n".join(lines) + "\n"
