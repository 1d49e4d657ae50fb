#!/usr/bin/env python
"""The comparison tables of docs/results.md from the folders examples/research_projects/compare_baselines.sh leaves, laid out like the paper's
Table 2 (methods) and Table 5 (ablations: text, ambiguity latent): each row's validate means with 95% bootstrap
intervals, its paired difference from AmbiSeg over the same images and seeds, the checkpoint the selection split
chose, its steps and its selection GED.

    python examples/research_projects/results_table.py --runs ~/ambiseg-runs/compare --rows ambiseg no-text no-ambiguity cimd-style prob-unet

Rows named `no-text` / `no-ambiguity` (and the reference) form the ablation table; every other row is a method.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ambiseg_diffusers.metrics import paired_difference

COLUMNS = {"ged": "GED ↓", "ci": "CI ↑", "dmax": "D_max ↑", "sc": "S_c ↑", "avg_dice": "avg Dice ↑"}
PAIRED = ("ged", "ci")  # the target's two metrics, paired against the reference
# row folder -> (text, ambiguity latent), the components of the paper's Table 5
ABLATIONS = {"no-text": (False, True), "no-ambiguity": (True, False)}


def chosen_steps(best: Path) -> str:
    """Steps of the chosen pipeline: `snapshots/step-N` -> N; a run's final pipeline -> its training summary."""
    if best.name.startswith("step-"):
        return str(int(best.name.split("-")[1]))
    summary = best / "training_summary.json"
    return str(json.loads(summary.read_text())["steps"]) if summary.is_file() else "committed"


def load_row(folder: Path) -> dict:
    """A row's validate record (label, summary, images), its per-image metrics (when saved) and its selection."""
    record = json.loads((folder / "validate" / "summary.json").read_text())
    per_image = folder / "validate" / "per_image.jsonl"
    if per_image.is_file():
        lines = [json.loads(line) for line in per_image.read_text().splitlines() if line.strip()]
        record["per_image"] = {line["index"]: line for line in lines}
    record["selection"] = json.loads((folder / "selection.json").read_text())
    return record


def paired_cells(row: dict, reference: dict | None) -> list[str]:
    """`row - reference` per paired metric, mean [95% interval]; no cells without a reference, blank ones for the
    reference itself or without per-image metrics on both sides."""
    if reference is None:
        return []
    if row is reference or "per_image" not in row or "per_image" not in reference:
        return [""] * len(PAIRED)
    if set(row["per_image"]) != set(reference["per_image"]):
        raise ValueError(f"'{row['label']}' and '{reference['label']}' were evaluated on different images; rerun "
                         "both on the same split and --max_images.")
    order = sorted(reference["per_image"])
    cells = []
    for metric in PAIRED:
        diff = paired_difference([row["per_image"][i][metric] for i in order],
                                 [reference["per_image"][i][metric] for i in order])
        cells.append(f"{diff['mean']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]")
    return cells


def metric_cells(row: dict) -> list[str]:
    return [f"{row['summary'][m]['mean']:.3f} [{row['summary'][m]['low']:.3f}, {row['summary'][m]['high']:.3f}]"
            for m in COLUMNS]


def table(runs: Path, rows: list[str], budget_min: float | None = None, reference: str = "ambiseg") -> str:
    records = {name: load_row(runs / name) for name in rows}
    ref = records.get(reference)
    ref_label = ref["label"].split(" (")[0] if ref else reference  # "AmbiSeg (x0, ...)" -> "AmbiSeg"
    paired_head = [f"{COLUMNS[m].split()[0]} − {ref_label}, paired" for m in PAIRED] if ref else []
    budget = f", {budget_min:g} min of training per row" if budget_min else ""
    caption = (f"Validate, N = 16, the same seeds, mean [95% bootstrap interval]{budget}; paired: the row minus "
               f"the reference over the same images.\n\n")

    methods = [n for n in rows if n not in ABLATIONS and n != reference] + ([reference] if ref else [])
    head = ["Method", *COLUMNS.values(), *paired_head]
    text = caption + "Methods (the paper's Table 2):\n\n" + _markdown(
        head, [[records[n]["label"], *metric_cells(records[n]), *paired_cells(records[n], ref)]
               for n in methods])

    ablations = [n for n in rows if n in ABLATIONS]
    if ablations:
        head = ["Text", "Ambiguity latent", *COLUMNS.values(), *paired_head]
        parts = {n: ABLATIONS[n] for n in ablations} | ({reference: (True, True)} if ref else {})
        text += "\nAblations (the paper's Table 5):\n\n" + _markdown(
            head, [["✓" if text_on else "✗", "✓" if latent_on else "✗", *metric_cells(records[n]),
                    *paired_cells(records[n], ref)] for n, (text_on, latent_on) in parts.items()])

    details = []
    for name in rows:
        selection = records[name]["selection"]
        best = next(c for c in selection["candidates"] if c["path"] == selection["best"])
        details.append([records[name]["label"], chosen_steps(Path(selection["best"])), str(len(selection["candidates"])),
                        f"{best['ged']:.3f}", str(records[name]["images"])])
    text += "\n" + _markdown(["row", "steps of the chosen checkpoint", "candidates", "selection GED",
                              "validate images"], details)
    return text


def _markdown(head: list[str], lines: list[list[str]]) -> str:
    return ("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
            + "".join("| " + " | ".join(cells) + " |\n" for cells in lines))


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", required=True, help="the RUNS folder of compare_baselines.sh")
    parser.add_argument("--rows", nargs="+", required=True, help="row folders, in table order")
    parser.add_argument("--reference", default="ambiseg", help="the row the others are paired against")
    parser.add_argument("--budget_min", type=float, default=None, help="the training budget, for the caption")
    args = parser.parse_args(argv)
    text = table(Path(args.runs).expanduser(), args.rows, args.budget_min, args.reference)
    print(text)
    return text


if __name__ == "__main__":
    main()
