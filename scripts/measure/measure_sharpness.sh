#!/usr/bin/env bash
# Adaptive worst-case sharpness (APGD_worst) of every member on fixed training batches; released
# settings by default (rho 0.5, l2 and linf, 20 iterations, 100 batches of 5 images).
#
#   scripts/measure/measure_sharpness.sh [extra measure_sharpness.py flags...]
#
# Environment:
#   DATASET=cifar10   DATA_PATH=./datasets   CORRUPT_PATH= (default: DATA_PATH)
#   METHOD=sharpbalance   SEEDS="13 17 27"   (they only name the default RUN and SAVE)
#   RUN=runs/<DATASET>/<METHOD>/seeds_<SEEDS joined by _>      the run directory of main.py
#   SAVE=results/<DATASET>/<METHOD>/seeds_<SEEDS joined by _>  where <mode>.json and .csv go
#   MODES=APGD_worst   CHECKPOINT=best (or last)   DEVICE=auto   FORCE=0 (1 = measure again)
#   EXTRA=""  more flags
#   (measure_sharpness.py flags, e.g. --batch-num 10 --norm l2, --preset tml, --mode APGD_worst,fisher)
#   PYTHON=python
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/_measure.sh" measure_sharpness.py APGD_worst "$@"
