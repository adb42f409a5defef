#!/usr/bin/env bash
# Shared by scripts/train/*.sh, scripts/measure/*.sh and scripts/figure7.sh (sourced, not run).
#
# Defines REPO (the repository root), PY (the python to call: ${PYTHON:-python}) and helpers.
# Paths given by the user (DATA_PATH, SAVE_PATH, ...) stay relative to the caller's directory:
# the scripts never cd, they call python on absolute paths inside REPO.
# The scripts never look inside a run folder or a results folder themselves: main.py and the measure
# scripts decide what is finished (utils/run_folder.py, measure/result_files.py), so a rerun with
# other settings is refused or measured again instead of skipped.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-python}"

say() { echo "==> $*"; }
warn() { echo "warning: $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

# "13 17 27" or "13,17,27" -> "13 17 27"
normalise_seeds() { echo "$*" | tr ',' ' ' | xargs; }

# "13 17 27" -> "seeds_13_17_27" (the folder of one ensemble)
seeds_tag() { echo "seeds_$(normalise_seeds "$*" | tr ' ' '_')"; }

# The SharpBalance split follows initial_epochs+1 epochs of SAM; the published 100 of 200 epochs is
# epochs/2. Scaled down, keep it at epochs/2 but always before the last epoch (main.py refuses a
# split that would never happen); 1 epoch -> -1 = split before the first epoch.
default_initial_epochs() {
    local epochs="$1" ie
    ie=$((epochs / 2))
    if ((ie + 1 >= epochs)); then ie=$((epochs - 2)); fi
    if ((ie < -1)); then ie=-1; fi
    echo "$ie"
}

# "predict,disagreement" -> "predict disagreement"
modes_list() { echo "$*" | tr ',' ' ' | xargs; }
