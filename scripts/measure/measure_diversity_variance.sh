#!/usr/bin/env bash
# Variance diversity: the unbiased variance of the members' logits, summed over classes, averaged
# over every corrupted test image (variance_mse_c), or the clean test set (variance_mse).
#
#   scripts/measure/measure_diversity_variance.sh [extra measure_diversity_variance.py flags...]
#
# Environment:
#   DATASET=cifar10   DATA_PATH=./datasets   CORRUPT_PATH= (default: DATA_PATH)
#   METHOD=sharpbalance   SEEDS="13 17 27"   (they only name the default RUN and SAVE)
#   RUN=runs/<DATASET>/<METHOD>/seeds_<SEEDS joined by _>      the run directory of main.py
#   SAVE=results/<DATASET>/<METHOD>/seeds_<SEEDS joined by _>  where <mode>.json and .csv go
#   MODES=variance_mse_c   CHECKPOINT=best (or last)   DEVICE=auto   FORCE=0 (1 = measure again)
#   EXTRA=""  more flags
#   (measure_diversity_variance.py flags, e.g. --eval-batch-size N)
#   PYTHON=python
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/_measure.sh" measure_diversity_variance.py variance_mse_c "$@"
