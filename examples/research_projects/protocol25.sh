#!/usr/bin/env bash
# The paper's 25% protocol for TDG-DiffDPO: a reference trained from scratch on a seeded 25% of train_fit (the
# committed recipe's flags, 300 steps), TDG-DiffDPO rounds with pairs from the same rows (round 1; round 2 from
# another seeded 25%, from round 1's model), every round scored on selection, then validate once.
#   RUNS=runs/protocol25 bash examples/research_projects/protocol25.sh        # resumable: rerun the same line
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root
R=${RUNS:-runs/protocol25}
mkdir -p "$R"
python training/train_ambiseg.py --text_encoder offline-minilm --train_split train_fit --train_fraction 0.25 \
    --fraction_seed 0 --mixed_precision bf16 --lr_scheduler constant --ambiguity latent --kl_weight 0.01 \
    --prior_z_fraction 0.5 --text_pooling attention --num_validation_images 0 --checkpointing_steps 100 \
    --max_train_steps 300 --report_to none --output_dir "$R/reference" --resume_from_checkpoint latest
python scripts/iterate_dpo.py --reference "$R/reference" --rounds 2 --strategy stochastic_run --output_dir "$R/dpo" \
    -- --config cpu --beta 5000 --report_to none
for m in reference dpo/round-1/adapter dpo/round-2/adapter; do
  python scripts/evaluate.py --model "$R/$m" --split validate --num_samples 16 --prompts annotator --bf16 \
      --images_per_call 16 --batch_size 256 --output_dir "$R/eval-${m//\//-}"
done
python scripts/compare_evaluations.py --reference "$R/eval-reference" --runs "$R/eval-dpo-round-1-adapter" \
    "$R/eval-dpo-round-2-adapter" --labels "round 1" "round 2" --output "$R/validate.md"
