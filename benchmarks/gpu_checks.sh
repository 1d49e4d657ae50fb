#!/usr/bin/env bash
# The checks only a GPU can run, in one call of a few minutes: each part writes its figures to $OUT/<part>.* as soon as
# it finishes (and $OUT/summary.txt grows line by line), so a run cut short still reports what it reached.
#
#   OUT=/tmp/gpu-checks bash benchmarks/gpu_checks.sh          # on a machine with a CUDA GPU (bf16: Ampere or newer)
#   OUT=/tmp/gpu-checks DEVICE=cpu STEPS=2 MAX_IMAGES=4 bash benchmarks/gpu_checks.sh   # smoke test on a CPU
#
# Parts: (1) sampling throughput, validate at N = 16 (the paper's 3,072 x 16 projected); (2) training steps of the
# `cpu` recipe in fp16 and bf16 (s/step, peak memory; with DataLoader workers); (3) TDG-DiffDPO steps in fp16 and bf16;
# (4) sampling under device_map, compared with the plain load; (5) the budget stop of two ranks (each names its step).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder the figures go to}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-40}
MAX_IMAGES=${MAX_IMAGES:-}
WORKERS=${WORKERS:-4}
MODEL=${MODEL:-checkpoints/ambiseg-lidc64}
WORK=${WORK:-/tmp/gpu-checks-work}
mkdir -p "$OUT" "$WORK"
note() { echo "$*" | tee -a "$OUT/summary.txt"; }
throughput() { grep -h THROUGHPUT "$1" | tail -1 | sed 's/.*THROUGHPUT //'; }
[[ $DEVICE == cpu ]] && export ACCELERATE_USE_CPU=1
note "== $(date -u +%FT%TZ) $(python -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")')"

# (1) sampling throughput
python benchmarks/gpu_throughput.py --model "$MODEL" --device "$DEVICE" --images_per_call 114 \
    ${MAX_IMAGES:+--max_images $MAX_IMAGES} --output "$OUT/throughput.json" >"$OUT/throughput.log" 2>&1
note "throughput: $(tr -d '\n ' <"$OUT/throughput.json" 2>/dev/null || tail -3 "$OUT/throughput.log")"

# (2) training steps in fp16 and bf16 (the KL in float32 keeps fp16 finite: GradScaler skips no step silently)
for precision in fp16 bf16; do
  python training/train_ambiseg.py --output_dir "$WORK/train-$precision" --max_train_steps "$STEPS" \
      --mixed_precision "$precision" --dataloader_num_workers "$WORKERS" --num_validation_images 0 --report_to none \
      --checkpointing_steps 100000 >"$OUT/train-$precision.log" 2>&1
  note "train $precision: $(throughput "$OUT/train-$precision.log")"  # skipped_steps: fp16 steps GradScaler skipped
done

# (3) DPO steps in fp16 and bf16, on pairs from 8 training slices
python scripts/build_preferences.py --reference "$MODEL" --split train_fit --fraction 0.02 --num_candidates 4 \
    --output_dir "$WORK/prefs" --overwrite >"$OUT/prefs.log" 2>&1
for precision in fp16 bf16; do
  start=$(date +%s.%N)
  python training/train_dpo.py --reference "$MODEL" --preferences "$WORK/prefs" --config cpu --max_train_steps "$STEPS" \
      --mixed_precision "$precision" --num_validation_images 0 --report_to none --output_dir "$WORK/dpo-$precision" \
      >"$OUT/dpo-$precision.log" 2>&1
  note "dpo $precision: rc $? in $(python -c "import time, sys; print(round(time.time() - float(sys.argv[1]), 1))" "$start") s"
done

# (4) device_map: the same masks as a plain load on one device
python - "$MODEL" "$DEVICE" >"$OUT/device_map.log" 2>&1 <<'PY'
import sys, numpy as np, torch
from ambiseg_diffusers import AmbiSegPipeline
model, device = sys.argv[1], sys.argv[2]
image = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
plain = AmbiSegPipeline.from_pretrained(model).to(device)
out = {}
for name, pipe in (("plain", plain), ("device_map", AmbiSegPipeline.from_pretrained(model, device_map=device if device == "cpu" else "cuda"))):
    pipe.set_progress_bar_config(disable=True)
    out[name] = pipe(image, "a solid nodule", num_samples=16, generator=torch.Generator().manual_seed(0)).probabilities
print("max |plain - device_map|:", float(np.abs(out["plain"] - out["device_map"]).max()))
PY
# (on one GPU device_map places every module on it without hooks: this checks the loading path, not a split model)
note "device_map: $(tail -1 "$OUT/device_map.log")"

# (5) two ranks, skewed clocks: one stop decision (on the CPU over gloo: two ranks cannot share one GPU over NCCL)
OMP_NUM_THREADS=2 ACCELERATE_USE_CPU=1 timeout 600 python -m torch.distributed.run --standalone --nproc_per_node 2 \
    training/train_ambiseg.py --output_dir "$WORK/budget" --max_train_steps 100000 --max_train_minutes 0.2 \
    --train_batch_size 4 --num_validation_images 0 --report_to none --checkpointing_steps 100000 \
    >"$OUT/budget.log" 2>&1
note "budget stop, 2 ranks: rc $? ($(grep -o 'stopping at step [0-9]*' "$OUT/budget.log" | sort | uniq -c | tr '\n' ' '))"
note "== done $(date -u +%FT%TZ)"
