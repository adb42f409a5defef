#!/usr/bin/env bash
# Run one measure_*.py script on one trained ensemble: scripts/measure/_measure.sh SCRIPT DEFAULT_MODES [flags...]
# Called by scripts/measure/measure_*.sh, which document the environment variables. Each mode writes
# <SAVE>/<mode>.json and .csv; with --skip_finished the script skips a mode whose JSON was measured with
# the same arguments from unchanged checkpoint and data files (FORCE=1 measures again). An interrupted
# measurement left <SAVE>/<mode>.partial.json:
# running the step again continues from its finished splits. An incomplete ensemble (a missing seed_<s>/
# or a member short of its planned epochs) is refused; EXTRA=--allow_incomplete measures it anyway.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../train/_common.sh"

SCRIPT="${1:?usage: _measure.sh SCRIPT DEFAULT_MODES [flags...]}"
DEFAULT_MODES="${2:?usage: _measure.sh SCRIPT DEFAULT_MODES [flags...]}"
shift 2

DATASET="${DATASET:-cifar10}"
DATA_PATH="${DATA_PATH:-./datasets}"
CORRUPT_PATH="${CORRUPT_PATH:-}"
METHOD="${METHOD:-sharpbalance}"
SEEDS="$(normalise_seeds "${SEEDS:-13 17 27}")"
RUN="${RUN:-runs/$DATASET/$METHOD/$(seeds_tag "$SEEDS")}"
SAVE="${SAVE:-results/$DATASET/$METHOD/$(seeds_tag "$SEEDS")}"
MODES="${MODES:-$DEFAULT_MODES}"
CHECKPOINT="${CHECKPOINT:-best}"
DEVICE="${DEVICE:-auto}"
EXTRA="${EXTRA:-}"
FORCE="${FORCE:-0}"

[[ -d "$RUN" ]] || die "run directory '$RUN' does not exist (train it first: scripts/train/$METHOD.sh)"

read -r -a extra_array <<<"$EXTRA"
cmd=("$PY" "$REPO/$SCRIPT" --dataset "$DATASET" --data_path "$DATA_PATH" --resume "$RUN"
     --checkpoint "$CHECKPOINT" --mode "$(modes_list "$MODES" | tr ' ' ',')" --save "$SAVE" --device "$DEVICE")
[[ -n "$CORRUPT_PATH" ]] && cmd+=(--corrupt_path "$CORRUPT_PATH")
[[ "$FORCE" == 1 ]] || cmd+=(--skip_finished)
cmd+=("${extra_array[@]}" "$@")

say "measure $SCRIPT ($MODES) on $RUN -> $SAVE"
echo "    ${cmd[*]}"
"${cmd[@]}"
