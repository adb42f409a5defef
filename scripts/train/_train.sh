#!/usr/bin/env bash
# Train one ensemble with main.py: scripts/train/_train.sh METHOD [extra main.py flags...]
# METHOD = deep_ensemble | sam | sharpbalance | sharpbalance_sharpest. Called by scripts/train/<METHOD>.sh,
# which document the environment variables. Always runs main.py, which checks the run folder against
# the command: a finished run costs no training, an unfinished one resumes, one with other arguments
# is refused with one line naming what differs.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

METHOD="${1:?usage: _train.sh deep_ensemble|sam|sharpbalance|sharpbalance_sharpest [main.py flags...]}"
shift

DATASET="${DATASET:-cifar10}"
DATA_PATH="${DATA_PATH:-./datasets}"
SEEDS="$(normalise_seeds "${SEEDS:-13 17 27}")"
EPOCHS="${EPOCHS:-200}"
BATCH_SIZE="${BATCH_SIZE:-128}"
LR="${LR:-0.1}"
WEIGHT_DECAY="${WEIGHT_DECAY:-5e-4}"
MODEL="${MODEL:-resnet18}"
WIDTH="${WIDTH:-64}"
RHO="${RHO:-0.2}"
FLAT_RATIO="${FLAT_RATIO:-0.5}"
INITIAL_EPOCHS="${INITIAL_EPOCHS:-$(default_initial_epochs "$EPOCHS")}"
DEVICE="${DEVICE:-auto}"
NGPUS="${NGPUS:-1}"
EXTRA="${EXTRA:-}"
SAVE_PATH="${SAVE_PATH:-runs/$DATASET/$METHOD/$(seeds_tag "$SEEDS")}"

case "$METHOD" in
    deep_ensemble) method_flags=(--sam False) ;;
    sam) method_flags=(--sam True --rho "$RHO") ;;
    sharpbalance)
        method_flags=(--sam True --rho "$RHO" --flat_ratio "$FLAT_RATIO" --initial_epochs "$INITIAL_EPOCHS") ;;
    sharpbalance_sharpest)  # the paper's Figure 6 reading: SAM on the samples the others find sharpest
        method_flags=(--sam True --rho "$RHO" --flat_ratio "$FLAT_RATIO" --initial_epochs "$INITIAL_EPOCHS"
                      --select sharpest) ;;
    *) die "unknown method '$METHOD' (deep_ensemble, sam, sharpbalance or sharpbalance_sharpest)" ;;
esac

read -r -a seed_array <<<"$SEEDS"

if ((NGPUS > 1)); then
    # torchrun: members round-robin over the ranks; --device auto takes cuda:<local_rank>.
    launcher=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPUS" "$REPO/main.py")
else
    launcher=("$PY" "$REPO/main.py")
fi
read -r -a extra_array <<<"$EXTRA"
cmd=("${launcher[@]}" --data "$DATASET" --data_path "$DATA_PATH" --model "$MODEL" --width "$WIDTH"
     --device "$DEVICE" --epochs "$EPOCHS" --batch_size "$BATCH_SIZE" --lr "$LR" --weight_decay "$WEIGHT_DECAY"
     "${method_flags[@]}" --seed "${seed_array[@]}" --save_path "$SAVE_PATH")
[[ -t 1 ]] || cmd+=(--no_progress)
cmd+=("${extra_array[@]}" "$@")

say "train $METHOD on $DATASET (seeds $SEEDS) -> $SAVE_PATH (main.py resumes, or skips what is finished)"
echo "    ${cmd[*]}"
"${cmd[@]}"
say "finished training $METHOD on $DATASET (seeds $SEEDS): $SAVE_PATH"
