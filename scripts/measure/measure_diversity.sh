#!/usr/bin/env bash
# Accuracy, NLL, ECE, Brier (predict) and pairwise disagreement, DER, EIR (disagreement) of one
# ensemble on validation, test and every (corruption, severity) cell of the -C set.
#
#   scripts/measure/measure_diversity.sh [extra measure_diversity.py flags...]
#
# Environment:
#   DATASET=cifar10   DATA_PATH=./datasets   CORRUPT_PATH= (default: DATA_PATH)
#   METHOD=sharpbalance   SEEDS="13 17 27"   (they only name the default RUN and SAVE)
#   RUN=runs/<DATASET>/<METHOD>/seeds_<SEEDS joined by _>      the run directory of main.py
#   SAVE=results/<DATASET>/<METHOD>/seeds_<SEEDS joined by _>  where <mode>.json and .csv go
#   MODES=predict,disagreement   CHECKPOINT=best (or last)   DEVICE=auto   FORCE=0 (1 = measure again)
#   EXTRA=""  more flags
#   (measure_diversity.py flags, e.g. --corruptions none, --logits_dir DIR, --eval-batch-size N)
#   PYTHON=python
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/_measure.sh" measure_diversity.py predict,disagreement "$@"
