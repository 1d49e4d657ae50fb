#!/usr/bin/env bash
# The ambiguity comparison in one GPU call, then its winner continued: every row of compare_baselines.sh trained side
# by side for BUDGET_MIN minutes, chosen on the selection split and scored once on validate; the AmbiSeg row with the
# lowest selection GED is continued from its chosen weights for CONTINUE_MIN minutes, its snapshot chosen on the
# selection split again and scored once on validate. Each result is copied to $OUT as soon as it exists.
#
#   OUT=/tmp/out RUNS=/tmp/ambiguity BUDGET_MIN=2.5 CONTINUE_MIN=2.5 bash examples/research_projects/gpu_ambiguity.sh
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root
OUT=${OUT:?set OUT to the folder the results go to}
RUNS=${RUNS:-/tmp/ambiguity-gpu}
BUDGET_MIN=${BUDGET_MIN:-2.5}
CONTINUE_MIN=${CONTINUE_MIN:-2.5}
CONTINUE_SNAPSHOT_MIN=${CONTINUE_SNAPSHOT_MIN:-$(python -c "print($CONTINUE_MIN / 4)")}
IMAGES_PER_CALL=${IMAGES_PER_CALL:-38}
DATA=${DATA_DIR:+--data_dir $DATA_DIR}
VALIDATE_CAP=${VALIDATE_IMAGES:+--max_images $VALIDATE_IMAGES}
SELECT_CAP=${SELECT_IMAGES:+--max_images $SELECT_IMAGES}
mkdir -p "$OUT" "$RUNS"

# Results travel back as one archive, $OUT/results.tgz, rebuilt every 30 s and at each stage's end (so a run cut
# short still reports): the records of every row (summaries, selections, logs), not the weights.
collect() {
  (cd "$RUNS" && find . -maxdepth 3 \( -name training_summary.json -o -name selection.json -o -name 'summary.*' \
      -o -name per_image.jsonl -o -name command.txt -o -name '*.log' -o -name table.md -o -name winner.txt \) -print0 \
      | tar -czf "$OUT/results.tgz.part" --null -T - && mv "$OUT/results.tgz.part" "$OUT/results.tgz") || true
}
( while sleep 30; do collect; done ) &
collector=$!
trap 'kill $collector 2>/dev/null; collect' EXIT

date +%T >"$RUNS/started.log"
RUNS=$RUNS BUDGET_MIN=$BUDGET_MIN PARALLEL=${PARALLEL:-1} THREADS=${THREADS:-3} IMAGES_PER_CALL=$IMAGES_PER_CALL \
    bash examples/research_projects/compare_baselines.sh 2>&1 | tee "$RUNS/compare.log"
collect

# The winner among the AmbiSeg rows, on the selection split only.
read -r winner best < <(python - "$RUNS" <<'PY'
import json, sys, pathlib
rows = {}
for folder in pathlib.Path(sys.argv[1]).iterdir():
    record, command = folder / "selection.json", folder / "command.txt"
    if record.is_file() and command.is_file() and "train_ambiseg.py" in command.read_text():
        selection = json.loads(record.read_text())
        rows[folder.name] = (min(c["ged"] for c in selection["candidates"]), selection["best"])
name = min(rows, key=lambda n: rows[n][0])
print(name, rows[name][1])
PY
)
echo "winner on selection: $winner ($best)" | tee "$RUNS/winner.txt"
continued=$RUNS/$winner-continued
# shellcheck disable=SC2046
$(cat "$RUNS/$winner/command.txt") --output_dir "$continued" --init_from "$best" --max_train_steps 100000000 \
    --max_train_minutes "$CONTINUE_MIN" \
    --snapshot_minutes "$CONTINUE_SNAPSHOT_MIN" >"$continued.train.log" 2>&1 || { tail -20 "$continued.train.log"; exit 1; }
collect
python scripts/select_checkpoint.py --run_dir "$continued" --extra "$best" --prompts annotator --num_samples 16 --bf16 \
    --images_per_call "$IMAGES_PER_CALL" --batch_size $((IMAGES_PER_CALL * 16)) $SELECT_CAP $DATA | tee "$RUNS/continued-select.log"
collect
final=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['best'])" "$continued/selection.json")
python scripts/evaluate.py --model "$final" --split validate --num_samples 16 --bf16 --prompts annotator \
    --images_per_call "$IMAGES_PER_CALL" --batch_size $((IMAGES_PER_CALL * 16)) --output_dir "$continued/validate" \
    --label "$winner, continued" --overwrite $VALIDATE_CAP $DATA >"$continued/validate.log" 2>&1
# The chosen weights, without the text encoder and tokenizer (the offline ones the run was given).
mkdir -p "$RUNS/final"
for part in unet prior posterior scheduler model_index.json; do [[ -e $final/$part ]] && cp -r "$final/$part" "$RUNS/final/"; done
cp "$continued/training_config.json" "$RUNS/final/"
echo "$final" >"$RUNS/final/chosen.txt"
tar -czf "$OUT/final-unet.tgz" -C "$RUNS" final/unet  # two archives: each file that comes back is capped at 16 MiB
tar -czf "$OUT/final-rest.tgz" -C "$RUNS" --exclude final/unet final
date +%T >"$RUNS/finished.log"
