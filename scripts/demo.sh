#!/usr/bin/env bash
# The demo: the whole Figure 7 pipeline on the embedded digits data, on CPU, in minutes.
#
#   scripts/demo.sh
#
# Trains Deep Ensemble, DE + SAM and SharpBalance (3 members each, ResNet18 of width 8, 20 epochs),
# measures accuracy on the clean test set and on digits-C, disagreement, variance diversity and
# sharpness, and writes the table and the two figures under $OUT/report. Same script as
# scripts/figure7.sh, with small settings; every one can be overridden through the environment:
#   OUT=runs/demo  DATA_PATH=$OUT/data (digits-C is generated there)  SEED_SETS="13 17 27"
#   EPOCHS=20 WIDTH=8 BATCH_SIZE=64 LR=0.1 RHO=0.2 FLAT_RATIO=0.5 INITIAL_EPOCHS=epochs/2
#   DEVICE=cpu  JOBS=3 (three runs at a time, one thread each; 2 cores are enough)
#   SHARPNESS_EXTRA="--batch-num 10 --norm l2" (the release measures 100 batches, l2 and linf)
# Rerunning reuses what is finished (delete $OUT to start over). One Ctrl-C stops the whole demo
# (figure7.sh stops the running steps and starts no more); rerun the same command to resume.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/train/_common.sh"

export OUT="${OUT:-runs/demo}"
export DATASETS="${DATASETS:-digits}"
export DATA_PATH="${DATA_PATH:-$OUT/data}"
export SEED_SETS="${SEED_SETS:-13 17 27}"
export EPOCHS="${EPOCHS:-20}"
export WIDTH="${WIDTH:-8}"
export BATCH_SIZE="${BATCH_SIZE:-64}"
export RHO="${RHO:-0.2}"
export DEVICE="${DEVICE:-cpu}"
export JOBS="${JOBS:-3}"
export SHARPNESS_EXTRA="${SHARPNESS_EXTRA:---batch-num 10 --norm l2}"

start=$SECONDS
say "demo: Deep Ensemble vs DE + SAM vs SharpBalance on $DATASETS (ResNet18 width $WIDTH, $EPOCHS epochs," \
    "batch $BATCH_SIZE, rho $RHO, seeds [$SEED_SETS], $JOBS jobs on $DEVICE)"
say "sharpness measured with ${SHARPNESS_EXTRA:-the released settings}" \
    "(the release: 100 batches of 5 training images, l2 and linf; fewer here to save time)"
"$REPO/scripts/figure7.sh"

say "demo finished in $((SECONDS - start))s"
echo "    table:   $OUT/report/figure7_table.md (and .csv; sharpness/diversity: diversity_table.csv)"
echo "    figures: $OUT/report/figure7.png"
echo "             $OUT/report/sharpness_diversity.png"
echo "    runs:    $OUT/runs (checkpoints, per-epoch log.csv), measurements: $OUT/results, logs: $OUT/logs"
