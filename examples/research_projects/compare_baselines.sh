#!/usr/bin/env bash
# The comparison table of the README (paper Tables 2 and 5 on our data): every row trained from scratch on the same
# slices for the same wall-clock budget, its checkpoint chosen on the selection split, then scored once on validate
# (N = 16, the same seeds, 95% bootstrap intervals).
#
#   RUNS=~/ambiseg-runs/compare BUDGET_MIN=45 bash examples/research_projects/compare_baselines.sh          # rows one after another
#   RUNS=/tmp/compare BUDGET_MIN=5 PARALLEL=1 bash examples/research_projects/compare_baselines.sh          # rows side by side (a GPU)
#
# Rows (default: the ambiguity comparison): paper-kl (the paper's L_kl on the predicted mask, no z in the UNet);
# no-ambiguity (the same denoiser without L_kl: the paper's "w/o Ambiguity", identical to the latent-free model);
# paper-kl-frozen (the same with prior and posterior fixed at their random init, as CIMD's released code leaves them);
# latent-repaired (z in the UNet, trained with prior z on half the rows, attention-pooled prompt, KL weight 0.01);
# ambiseg (the earlier latent design, as committed before); prob-unet (Probabilistic U-Net). With ONLY: no-text (the
# latent design without text), cimd-style (epsilon, no text, DDPM-1000 sampling). STRONG=1 adds the warm-started AmbiSeg variants of the "stronger AmbiSeg" issue,
# chosen together with the committed checkpoint on the selection split. Knobs (environment):
#   BUDGET_MIN   training minutes per row (steps only)        SNAPSHOT_MIN  minutes between checkpoint candidates
#   BUDGET_STEPS training steps per diffusion row instead of BUDGET_MIN (the Probabilistic U-Net keeps minutes)
#   PROB_UNET_STEPS  the same for the Probabilistic U-Net (its step is cheaper: match its steps to the minutes)
#   SLOW_SNAPSHOT_MIN  the same for the CIMD-style row (DDPM-1000 makes each candidate expensive to score)
#   CIMD_STEPS   DDPM steps of the CIMD-style row (default 1000, CIMD's; 1000 costs ~14 h on validate on 2 CPU cores)
#   PARALLEL     1 = train/evaluate rows concurrently          TEXT_ENCODER  frozen encoder (default offline-minilm)
#   SELECT_IMAGES / VALIDATE_IMAGES  cap the images (smoke tests only; empty = whole split)
#   DATA_DIR     the lidc64 folder or its parent               IMAGES_PER_CALL  images per pipeline call
#   ONLY         a space-separated list of rows (default: the ambiguity comparison)
#   CHECKPOINT_STEPS  resumable checkpoint every N steps (default 5000; lower it for runs a session may cut short)
#   THREADS      CPU threads per training process (default: torch's; set it with PARALLEL=1)
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root

RUNS=${RUNS:?set RUNS to a folder outside the work tree}
BUDGET_MIN=${BUDGET_MIN:-45}
SNAPSHOT_MIN=${SNAPSHOT_MIN:-$(python -c "print($BUDGET_MIN / 6)")}
# CIMD-style candidates cost 1000 UNet passes each to score: fewer of them
SLOW_SNAPSHOT_MIN=${SLOW_SNAPSHOT_MIN:-$(python -c "print($BUDGET_MIN / 2.2)")}
CIMD_STEPS=${CIMD_STEPS:-1000}
PARALLEL=${PARALLEL:-0}
STRONG=${STRONG:-0}
TEXT_ENCODER=${TEXT_ENCODER:-offline-minilm}
IMAGES_PER_CALL=${IMAGES_PER_CALL:-16}
BATCH=$((IMAGES_PER_CALL * 16))  # every row of a call in one UNet pass
SELECT_CAP=${SELECT_IMAGES:+--max_images $SELECT_IMAGES}
VALIDATE_CAP=${VALIDATE_IMAGES:+--max_images $VALIDATE_IMAGES}
DATA=${DATA_DIR:+--data_dir $DATA_DIR}
mkdir -p "$RUNS"

# train_fit: the training patients outside the selection split, so the checkpoint choice is made on unseen patients
budget=(--train_split train_fit --max_train_steps 100000000 --max_train_minutes "$BUDGET_MIN" --snapshot_minutes "$SNAPSHOT_MIN"
        --num_validation_images 0 --mixed_precision bf16 --report_to none --checkpointing_steps "${CHECKPOINT_STEPS:-5000}" $DATA)
[[ -n ${THREADS:-} ]] && export OMP_NUM_THREADS=$THREADS
# BUDGET_STEPS: the diffusion rows train that many steps instead of BUDGET_MIN minutes (an equal budget that work
# beside the run on the same cores cannot skew); the Probabilistic U-Net keeps BUDGET_MIN minutes unless
# PROB_UNET_STEPS gives it steps too (rows then may train side by side, THREADS=1, without skewing the budget).
ambiseg=(python training/train_ambiseg.py --lr_scheduler constant --text_encoder "$TEXT_ENCODER" "${budget[@]}"
         ${BUDGET_STEPS:+--max_train_steps $BUDGET_STEPS --max_train_minutes 100000})

declare -A TRAIN PROMPTS LABEL
TRAIN[paper-kl]="${ambiseg[*]} --ambiguity prediction_kl"
TRAIN[paper-kl-frozen]="${ambiseg[*]} --ambiguity prediction_kl --freeze_ambiguity_encoders true"
TRAIN[no-ambiguity]="${ambiseg[*]} --ambiguity none"
TRAIN[latent-repaired]="${ambiseg[*]} --ambiguity latent --kl_weight 0.01 --prior_z_fraction 0.5 --text_pooling attention"
TRAIN[ambiseg]="${ambiseg[*]}"
TRAIN[no-text]="${ambiseg[*]} --use_text false"
TRAIN[cimd-style]="${ambiseg[*]} --prediction_type epsilon --use_text false --sampling_scheduler ddpm --sampling_steps $CIMD_STEPS --snapshot_minutes $SLOW_SNAPSHOT_MIN"
TRAIN[prob-unet]="python training/train_prob_unet.py ${budget[*]} ${PROB_UNET_STEPS:+--max_train_steps $PROB_UNET_STEPS --max_train_minutes 100000}"
PROMPTS=([paper-kl]=annotator [paper-kl-frozen]=annotator [no-ambiguity]=annotator [latent-repaired]=annotator [ambiseg]=annotator [no-text]=none
         [cimd-style]=none [prob-unet]=none)
LABEL=([paper-kl]="AmbiSeg, paper's L_kl (prediction_kl)"
       [paper-kl-frozen]="AmbiSeg, paper's L_kl, encoders frozen (CIMD's code)" [no-ambiguity]="w/o ambiguity term"
       [latent-repaired]="AmbiSeg, repaired latent" [ambiseg]="AmbiSeg, earlier latent" [no-text]="w/o text"
       [cimd-style]="CIMD-style (epsilon, no text, DDPM-$CIMD_STEPS)" [prob-unet]="Probabilistic U-Net")
ONLY=${ONLY:-paper-kl paper-kl-frozen no-ambiguity latent-repaired ambiseg prob-unet}
read -r -a ROWS <<<"$ONLY"
for name in "${!TRAIN[@]}"; do [[ " $ONLY " == *" $name "* ]] || unset "TRAIN[$name]"; done
if [[ $STRONG == 1 ]]; then
  warm=("${ambiseg[@]}" --init_from checkpoints/ambiseg-lidc64 --learning_rate 1e-4)
  TRAIN[strong-b32]="${warm[*]}"
  TRAIN[strong-b128]="${warm[*]} --train_batch_size 128"
fi

run() {  # run LOG COMMAND...: in the background when PARALLEL=1, output to LOG
  local log=$1; shift
  mkdir -p "$(dirname "$log")"
  if [[ $PARALLEL == 1 ]]; then "$@" >"$log" 2>&1 & else "$@" >"$log" 2>&1 || { tail -20 "$log"; exit 1; }; fi
}

echo "== training: ${BUDGET_MIN} min per row"
TRAIN_ORDER=("${ROWS[@]}")
[[ $STRONG == 1 ]] && TRAIN_ORDER+=(strong-b32 strong-b128)
for name in "${TRAIN_ORDER[@]}"; do  # in the order given (rows one after another: the first finish first)
  if [[ -f $RUNS/$name/training_summary.json ]]; then echo "   $name: done before"; continue; fi
  mkdir -p "$RUNS/$name" && echo "${TRAIN[$name]}" >"$RUNS/$name/command.txt"  # for continuing the row (gpu_ambiguity.sh)
  # shellcheck disable=SC2086
  run "$RUNS/$name/train.log" ${TRAIN[$name]} --output_dir "$RUNS/$name" --resume_from_checkpoint latest
done
wait
for name in "${TRAIN_ORDER[@]}"; do [[ -f $RUNS/$name/training_summary.json ]] || { tail -20 "$RUNS/$name/train.log"; exit 1; }; echo "   $name: $(cat "$RUNS/$name/training_summary.json" | tr -d '\n ' | cut -c1-60)"; done

echo "== choosing checkpoints on the selection split"
select_cap=(--num_samples 16 --bf16 --images_per_call "$IMAGES_PER_CALL" --batch_size "$BATCH" $SELECT_CAP $DATA)
for name in "${ROWS[@]}"; do
  run "$RUNS/$name/select.log" python scripts/select_checkpoint.py --run_dir "$RUNS/$name" --prompts "${PROMPTS[$name]}" "${select_cap[@]}"
done
if [[ $STRONG == 1 ]]; then
  run "$RUNS/strong/select.log" python scripts/select_checkpoint.py --run_dir "$RUNS/strong-b32" "$RUNS/strong-b128" \
      --extra checkpoints/ambiseg-lidc64 --output "$RUNS/strong/selection.json" "${select_cap[@]}"
fi
wait

echo "== validate, once, on the chosen checkpoints"
validate_rows=("${ROWS[@]}")
[[ $STRONG == 1 ]] && validate_rows+=(strong) && LABEL[strong]="AmbiSeg, warm-started (chosen)" && PROMPTS[strong]=annotator
for name in "${validate_rows[@]}"; do
  best=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['best'])" "$RUNS/$name/selection.json")
  run "$RUNS/$name/validate.log" python scripts/evaluate.py --model "$best" --split validate --num_samples 16 --bf16 \
      --prompts "${PROMPTS[$name]}" --images_per_call "$IMAGES_PER_CALL" --batch_size "$BATCH" --output_dir "$RUNS/$name/validate" \
      --label "${LABEL[$name]}" --overwrite $VALIDATE_CAP $DATA
done
wait
REFERENCE=${REFERENCE:-paper-kl}
[[ " ${validate_rows[*]} " == *" $REFERENCE "* ]] || REFERENCE=${validate_rows[0]}
python examples/research_projects/results_table.py --runs "$RUNS" --rows "${validate_rows[@]}" --budget_min "$BUDGET_MIN" \
    --reference "$REFERENCE" | tee "$RUNS/table.md"
