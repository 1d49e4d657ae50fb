#!/usr/bin/env bash
# TDG-DiffDPO recipe search on the selection split (validate is never read here). Builds the preference pairs from the
# training patients outside the selection split (train_fit, the paper's 25%, K = 4), held-out diagnostic pairs on the
# selection split, then trains one LoRA adapter per recipe and scores each on the selection split against the
# reference (same images, seeds and prompts; paired differences with 95% bootstrap intervals).
#
#   RUNS=~/ambiseg-runs/dpo-tuning REF=checkpoints/ambiseg-lidc64 bash examples/research_projects/tune_dpo.sh
#   RUNS=... RECIPES="eps-5000:--error_space epsilon --beta 5000" bash examples/research_projects/tune_dpo.sh   # your own grid
#
# RECIPES: ";"-separated "name:flags[:strategy]" (strategy default mean_dice); every run is skipped when its
# folder already holds a finished adapter and evaluation, so a rerun continues a killed search.
# Knobs: SCALES (preference_scale values scored for every recipe), FRACTION (of train_fit for the pairs),
# STRATEGIES (pair sets to build), SELECT_IMAGES (cap, smoke tests only), DATA_DIR.
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root

RUNS=${RUNS:?set RUNS to a folder outside the work tree}
REF=${REF:-checkpoints/ambiseg-lidc64}
FRACTION=${FRACTION:-0.25}
STRATEGIES=${STRATEGIES:-mean_dice}
SCALES=${SCALES:-1.0}
SELECT_CAP=${SELECT_IMAGES:+--max_images $SELECT_IMAGES}
DATA=${DATA_DIR:+--data_dir $DATA_DIR}
RECIPES=${RECIPES:-"eps-b5000:--error_space epsilon --beta 5000;eps-b10000:--error_space epsilon --beta 10000;\
minsnr-b5000:--error_space epsilon_min_snr --beta 5000;x0-b5000:--error_space x0 --beta 5000;\
x0-b50000:--error_space x0 --beta 50000;x0clamp-b50000:--error_space x0_clamped --beta 50000"}
mkdir -p "$RUNS"

for strategy in $STRATEGIES; do
  [[ -f $RUNS/prefs-$strategy/preference_report.json ]] || python scripts/build_preferences.py --reference "$REF" \
    --strategy "$strategy" --split train_fit --fraction "$FRACTION" --output_dir "$RUNS/prefs-$strategy" $DATA
done
[[ -f $RUNS/prefs-selection/preference_report.json ]] || python scripts/build_preferences.py --reference "$REF" \
  --strategy mean_dice --split selection --fraction 1.0 --output_dir "$RUNS/prefs-selection" $DATA

evaluate() {  # model folder, output folder, extra flags
  [[ -f $2/summary.json ]] || python scripts/evaluate.py --model "$1" --split selection --num_samples 16 --bf16 \
    --prompts annotator --images_per_call 16 --output_dir "$2" $SELECT_CAP $DATA "${@:3}" >/dev/null
}
evaluate "$REF" "$RUNS/reference-selection"

IFS=';' read -ra recipes <<< "$RECIPES"
runs=() labels=()
for recipe in "${recipes[@]}"; do
  IFS=':' read -r name flags strategy <<< "$recipe"
  strategy=${strategy:-mean_dice}
  [[ -d $RUNS/prefs-$strategy ]] || python scripts/build_preferences.py --reference "$REF" --strategy "$strategy" \
    --split train_fit --fraction "$FRACTION" --output_dir "$RUNS/prefs-$strategy" $DATA
  # shellcheck disable=SC2086
  [[ -f $RUNS/$name/preference.json ]] || python training/train_dpo.py --reference "$REF" \
    --preferences "$RUNS/prefs-$strategy" --config cpu $flags --diagnostic_preferences "$RUNS/prefs-selection" \
    --num_validation_images 0 --report_to none --output_dir "$RUNS/$name" \
    > "$RUNS/$name.log" 2>&1
  for scale in $SCALES; do
    evaluate "$RUNS/$name" "$RUNS/$name/selection-scale$scale" --preference_scale "$scale"
    runs+=("$RUNS/$name/selection-scale$scale") labels+=("$name, scale $scale")
  done
done
python scripts/compare_evaluations.py --reference "$RUNS/reference-selection" --runs "${runs[@]}" --labels "${labels[@]}" \
  --output "$RUNS/selection_table.md"
