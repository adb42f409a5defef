#!/usr/bin/env bash
# Shared by scripts/train/*.sh, scripts/measure/*.sh and scripts/figure7.sh (sourced, not run).
#
# Defines REPO (the repository root), PY (the python to call: ${PYTHON:-python}) and helpers.
# Paths given by the user (DATA_PATH, SAVE_PATH, ...) stay relative to the caller's directory:
# the scripts never cd, they call python on absolute paths inside REPO.

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

# run_finished RUN_DIR EPOCHS SEED... : true when every member's checkpoint.pth.tar has epoch == EPOCHS
# and its model_best.pth.tar holds the best epoch the checkpoint records.
run_finished() {
    local run="$1" epochs="$2"
    shift 2
    local seed
    for seed in "$@"; do
        [[ -f "$run/seed_$seed/checkpoint.pth.tar" ]] || return 1
    done
    "$PY" - "$run" "$epochs" "$@" <<'PYEOF'
import os, sys
import torch
run, epochs, seeds = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
for seed in seeds:
    path = os.path.join(run, f"seed_{seed}", "checkpoint.pth.tar")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # unreadable = not finished; main.py will say why
        sys.exit(1)
    if int(state.get("epoch", -1)) != epochs:
        sys.exit(1)
    # A kill between main.py's two writes leaves model_best behind the best epoch the checkpoint
    # records: not finished, so main.py runs once more and repairs it (without training).
    best = os.path.join(run, f"seed_{seed}", "model_best.pth.tar")
    if state.get("best_epoch") and (not os.path.isfile(best) or torch.load(
            best, map_location="cpu", weights_only=True, mmap=True).get("epoch") != state["best_epoch"]):
        sys.exit(1)
sys.exit(0)
PYEOF
}

# measurement_finished SAVE_DIR RUN_DIR NAME... : true when every <SAVE_DIR>/<NAME>.json exists and
# is newer than every checkpoint of the run (a retrained run is measured again).
measurement_finished() {
    local save="$1" run="$2"
    shift 2
    local name ckpt
    for name in "$@"; do
        [[ -f "$save/$name.json" ]] || return 1
        for ckpt in "$run"/seed_*/model_best.pth.tar "$run"/seed_*/checkpoint.pth.tar; do
            [[ -e "$ckpt" ]] || continue
            [[ "$save/$name.json" -nt "$ckpt" ]] || return 1
        done
    done
    return 0
}

# "predict,disagreement" -> "predict disagreement"
modes_list() { echo "$*" | tr ',' ' ' | xargs; }
