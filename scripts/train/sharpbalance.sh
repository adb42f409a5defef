#!/usr/bin/env bash
# SharpBalance: SAM warm-up on all data, then each member's SAM set from the others' per-sample
# sharpness (--sam True --rho $RHO --flat_ratio $FLAT_RATIO --initial_epochs $INITIAL_EPOCHS).
#
#   scripts/train/sharpbalance.sh [extra main.py flags...]
#
# Environment (published Figure 7 values as defaults):
#   DATASET=cifar10 (cifar100, tiny_imgnet, digits)   DATA_PATH=./datasets   SEEDS="13 17 27"
#   EPOCHS=200  BATCH_SIZE=128  LR=0.1 (multistep x0.1 at epochs/2, 3*epochs/4)  WEIGHT_DECAY=5e-4
#   MODEL=resnet18  WIDTH=64  RHO=0.2  FLAT_RATIO=0.5  INITIAL_EPOCHS=epochs/2 (100 of 200)
#   DEVICE=auto  NGPUS=1 (>1: torchrun, members spread over the GPUs)  EXTRA="" (more main.py flags)
#   SAVE_PATH=runs/<DATASET>/sharpbalance/seeds_<SEEDS joined by _>   PYTHON=python
# Rerunning resumes: main.py trains nothing for a finished run, continues an unfinished one, and refuses
# (one line naming the setting) a run in SAVE_PATH trained with other arguments.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/_train.sh" sharpbalance "$@"
