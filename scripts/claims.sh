#!/usr/bin/env bash
# Does SharpBalance do what the paper claims? Tested on digits / digits-C with K seed sets per method,
# in two stages fixed before any run (results/claims/preregistration.md; write-up: docs/claims.md):
#
#   bash scripts/claims.sh --control   # 1. positive control: is SAM flatter than SGD here? Deep Ensemble and
#                                      #    DE + SAM in each (epochs, width) cell of the grid, SAM rho 0.2 and
#                                      #    0.05, in order; stops at the first cell where a setting passes
#   bash scripts/claims.sh --control-last  # exploratory, after 1: the control's runs at SAM rho $RHO measured
#                                      #    again on their last checkpoints instead of model_best
#   bash scripts/claims.sh             # 2. the claims, in the setting the control chose: adds SharpBalance
#                                      #    (released --select flattest, and the paper's --select sharpest),
#                                      #    measures the last checkpoints too, writes the tables and figures
#
# Each stage is scripts/figure7.sh (training, measurements; rerunning skips what is finished and resumes the
# rest) per setting, in $OUT/e<epochs>_w<width>_rho<rho>/, followed by
#   python -m reporting.evidence       every ensemble's numbers and settings, read from the runs' own records
#                                      (args.json, the result files' meta): $OUT/evidence/
#   python -m reporting.claims_report  the tables and figures from those files: $OUT/report/
# Stage 2 reuses stage 1's Deep Ensemble and DE + SAM runs of the chosen setting (same folder).
#
# Environment:
#   K=12 seed sets: the paper's 13 17 27; 113 117 127; 43 59 223, then 213 217 227; 313 317 327; ...
#   SEED_SETS=""  an explicit list instead of K ("13 17 27;113 117 127"; at least two)
#   EPOCHS=20 WIDTH=8 RHO=0.2   stage 2's setting (the one the control chose; see docs/claims.md)
#   INITIAL_EPOCHS=epochs/2-1   SharpBalance's SAM warm-up: its own phase is the second half of training
#   METHODS="deep_ensemble sam sharpbalance sharpbalance_sharpest"   (stage 2)
#   OUT=runs/claims   DATA_PATH=$OUT/data (digits-C is generated there)   DEVICE=cpu   JOBS=2
#   SHARPNESS_BATCHES=20   batches of 5 training images for the worst-case sharpness (adaptive l2, radii
#                          0.05 and 0.5, 20 APGD iterations) and the Fisher trace on the same images
#   SHARPNESS_FLAGS=""     more measure_sharpness.py flags (e.g. --n_iters 5 for a quick try; the evidence
#                          refuses to mix ensembles measured with different ones)
#   MIN_SEED_SETS=10       fewer usable seed sets: a test is reported as not testable
# Output: $OUT/report/claims_tables.md, claims_primary.png, claims_control.png; $OUT/evidence/ (the files
# committed in results/claims/); per setting the usual figure7.sh folders (runs, results, report, logs).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/train/_common.sh"

mode=claims
case "${1:-}" in
    --control) mode=control ;;
    --control-last) mode=control_last ;;
    "") ;;
    *) die "unknown argument '$1': use --control for the positive control, --control-last for its last checkpoints, or no argument for the claims run" ;;
esac
(($# <= 1)) || die "one argument at most (--control or --control-last), got $#"

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # for python -m reporting.* from any directory
export OUT="${OUT:-runs/claims}"
export DATASETS=digits
export DATA_PATH="${DATA_PATH:-$OUT/data}"
export BATCH_SIZE="${BATCH_SIZE:-64}"
export LR="${LR:-0.1}"
export DEVICE="${DEVICE:-cpu}"
export JOBS="${JOBS:-2}"
EPOCHS="${EPOCHS:-20}"
WIDTH="${WIDTH:-8}"
RHO="${RHO:-0.2}"
METHODS="${METHODS:-deep_ensemble sam sharpbalance sharpbalance_sharpest}"
SHARPNESS_BATCHES="${SHARPNESS_BATCHES:-20}"
MIN_SEED_SETS="${MIN_SEED_SETS:-10}"
K="${K:-12}"
[[ "$SHARPNESS_BATCHES" =~ ^[1-9][0-9]*$ ]] || die "SHARPNESS_BATCHES must be a positive whole number, got '$SHARPNESS_BATCHES'"
[[ "$MIN_SEED_SETS" =~ ^[1-9][0-9]*$ ]] || die "MIN_SEED_SETS must be a positive whole number, got '$MIN_SEED_SETS'"

if [[ -z "${SEED_SETS:-}" ]]; then
    [[ "$K" =~ ^[0-9]+$ ]] || die "K must be a whole number of seed sets, got '$K'"
    ((K >= 2)) || die "K=$K: a confidence interval needs at least two seed sets (K >= 2; 12 by default)"
    SEED_SETS="$("$PY" -m reporting.claims seed-sets "$K")"
fi
IFS=';' read -r -a sets <<<"$SEED_SETS"
((${#sets[@]} >= 2)) || die "SEED_SETS has ${#sets[@]} seed set(s): a confidence interval needs at least two seed sets"
export SEED_SETS

export SHARPNESS_MODES=APGD_worst,fisher
SHARPNESS_FLAGS="${SHARPNESS_FLAGS:-}"
export SHARPNESS_EXTRA="--batch-num $SHARPNESS_BATCHES --norm l2 --rho 0.05,0.5 $SHARPNESS_FLAGS"
start=$SECONDS

# setting_dir EPOCHS WIDTH RHO: the figure7.sh output folder of one setting
setting_dir() { echo "$OUT/e$1_w$2_rho$3"; }

# deep_ensemble_rho EPOCHS WIDTH: the SAM rho in the name of the cell's setting folder that holds the
# Deep Ensemble runs themselves (the other rho's folder links to them); nothing when none does.
deep_ensemble_rho() {
    local dir
    for dir in "$OUT/e$1_w$2_rho"*; do
        [[ -d "$dir/runs/digits/deep_ensemble" && ! -L "$dir/runs/digits/deep_ensemble" ]] || continue
        echo "${dir##*_rho}"
        return 0
    done
}

# link_deep_ensemble EPOCHS WIDTH RHO: Deep Ensemble does not depend on SAM's rho; when another rho of
# the same cell has it, link its runs and results here instead of training it again.
link_deep_ensemble() {
    local here home part
    here="$(setting_dir "$@")"
    home="$(deep_ensemble_rho "$1" "$2")"
    [[ -n "$home" && "$home" != "$3" ]] || return 0
    home="$(setting_dir "$1" "$2" "$home")"
    for part in runs results; do
        [[ -e "$home/$part/digits/deep_ensemble" && ! -e "$here/$part/digits/deep_ensemble" ]] || continue
        mkdir -p "$here/$part/digits"
        ln -s "$(cd "$home/$part/digits" && pwd)/deep_ensemble" "$here/$part/digits/deep_ensemble"
    done
}

# run_setting EPOCHS WIDTH RHO METHODS: train and measure one setting's ensembles (figure7.sh)
run_setting() {
    local epochs="$1" width="$2" rho="$3" methods="$4"
    link_deep_ensemble "$epochs" "$width" "$rho"
    say "claims: $epochs epochs, width $width, SAM rho $rho: [$methods] x ${#sets[@]} seed sets"
    OUT="$(setting_dir "$epochs" "$width" "$rho")" EPOCHS="$epochs" WIDTH="$width" RHO="$rho" METHODS="$methods" \
        INITIAL_EPOCHS="$("$PY" -m reporting.claims initial-epochs "$epochs")" "$REPO/scripts/figure7.sh"
}

# measure_last EPOCHS WIDTH RHO METHODS MODES: one setting's finished runs (linked, nothing trained)
# measured again on their last checkpoints (sharpness MODES at radius 0.05 only), in <setting>/last/.
measure_last() {
    local last
    last="$(setting_dir "$1" "$2" "$3")/last"
    mkdir -p "$last"
    [[ -e "$last/runs" ]] || ln -s ../runs "$last/runs"
    CHECKPOINT=last OUT="$last" EPOCHS="$1" WIDTH="$2" RHO="$3" METHODS="$4" \
        INITIAL_EPOCHS="$("$PY" -m reporting.claims initial-epochs "$1")" SHARPNESS_MODES="$5" \
        SHARPNESS_EXTRA="--batch-num $SHARPNESS_BATCHES --norm l2 --rho 0.05 $SHARPNESS_FLAGS" \
        "$REPO/scripts/figure7.sh"
}

report() {
    "$PY" -m reporting.evidence --runs "$OUT" --out "$OUT/evidence"
    "$PY" -m reporting.claims_report --evidence "$OUT/evidence" --out "$OUT/report" --min_seed_sets "$MIN_SEED_SETS" "$@"
}

if [[ "$mode" == control ]]; then
    read -r -a rhos <<<"$("$PY" -m reporting.claims rhos)"
    mapfile -t cells < <("$PY" -m reporting.claims cells)
    decided=1
    for cell in "${cells[@]}"; do
        read -r epochs width <<<"$cell"
        for rho in "${rhos[@]}"; do
            run_setting "$epochs" "$width" "$rho" "deep_ensemble sam" ||
                die "steps failed in $(setting_dir "$epochs" "$width" "$rho") (its logs/ say which); rerun to resume"
        done
        rc=0
        report --decide || rc=$?
        if ((rc == 0)); then decided=0; break; fi
        ((rc == 3)) || die "the control's report failed (exit $rc)"
    done
    say "control finished in $((SECONDS - start))s; tables: $OUT/report/claims_tables.md, figure: $OUT/report/claims_control.png"
    ((decided == 0)) || { echo "no control setting passed: claims (b)-(e) cannot be tested at this scale" >&2; exit 3; }
    exit 0
fi

if [[ "$mode" == control_last ]]; then
    # Exploratory, chosen after the control's results were seen: were the members measured too early?
    # model_best is often a mid-training epoch; the last checkpoint is where SAM has acted longest.
    mapfile -t cells < <("$PY" -m reporting.claims cells)
    found=0
    for cell in "${cells[@]}"; do
        read -r epochs width <<<"$cell"
        [[ -d "$(setting_dir "$epochs" "$width" "$RHO")/runs/digits/sam" ]] || continue
        found=1
        say "control, last checkpoints: $epochs epochs, width $width, SAM rho $RHO"
        # The Deep Ensemble's last checkpoints are measured once, in the folder that holds its runs:
        # measured again through the other rho's link, the evidence would hold each ensemble twice.
        home="$(deep_ensemble_rho "$epochs" "$width")"
        [[ -n "$home" ]] || die "no Deep Ensemble runs for $epochs epochs, width $width in $OUT: run bash scripts/claims.sh --control first"
        if [[ "$home" == "$RHO" ]]; then
            pairs=("$RHO:deep_ensemble sam")
        else
            pairs=("$home:deep_ensemble" "$RHO:sam")
        fi
        for pair in "${pairs[@]}"; do
            measure_last "$epochs" "$width" "${pair%%:*}" "${pair#*:}" APGD_worst,fisher ||
                die "steps failed in $(setting_dir "$epochs" "$width" "${pair%%:*}")/last (its logs/ say which); rerun to resume"
        done
    done
    ((found)) || die "no control setting with SAM rho $RHO is trained in $OUT: run bash scripts/claims.sh --control first"
    report
    say "control on the last checkpoints finished in $((SECONDS - start))s; tables: $OUT/report/claims_tables.md"
    exit 0
fi

[[ "$EPOCHS" =~ ^[0-9]+$ && "$WIDTH" =~ ^[0-9]+$ ]] || die "EPOCHS and WIDTH must be whole numbers, got '$EPOCHS', '$WIDTH'"
((EPOCHS >= 2)) || die "EPOCHS=$EPOCHS: SharpBalance needs at least 2 epochs for a phase of its own"
rc=0
run_setting "$EPOCHS" "$WIDTH" "$RHO" "$METHODS" || rc=$?
# The last checkpoints of the SAM-based ensembles, for the sensitivity rows: the same runs (linked),
# measured again with CHECKPOINT=last (diversity, worst-case sharpness at radius 0.05).
read -r -a method_array <<<"$METHODS"
last_methods=()
for method in "${method_array[@]}"; do [[ "$method" == deep_ensemble ]] || last_methods+=("$method"); done
if ((${#last_methods[@]})); then
    measure_last "$EPOCHS" "$WIDTH" "$RHO" "${last_methods[*]}" APGD_worst || rc=$?
fi
report || rc=$?
say "claims finished in $((SECONDS - start))s (exit $rc)"
echo "    tables:  $OUT/report/claims_tables.md"
echo "    figures: $OUT/report/claims_primary.png, $OUT/report/claims_control.png"
echo "    evidence (what results/claims/ holds): $OUT/evidence/"
exit "$rc"
