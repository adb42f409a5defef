#!/usr/bin/env bash
# Figure 7 end to end: train Deep Ensemble, DE + SAM and SharpBalance on every dataset with every
# published seed triple, measure each ensemble (accuracy + disagreement, variance diversity,
# sharpness), then write the report (table + figures).
#
#   scripts/figure7.sh                                  # everything, published settings
#   DATASETS=cifar10 NGPUS=4 scripts/figure7.sh         # only CIFAR-10, members spread over 4 GPUs
#
# Environment (published values as defaults):
#   DATASETS="cifar10 cifar100 tiny_imgnet" (also: digits)   METHODS="deep_ensemble sam sharpbalance"
#     (also: sharpbalance_sharpest, the paper's --select sharpest reading)
#   SEED_SETS="13 17 27;113 117 127;43 59 223"   (ensembles separated by ';')
#   DATA_PATH=./datasets (CIFAR torchvision layout, tiny-imagenet-200/, CIFAR-10-C/, ...)   CORRUPT_PATH=
#   OUT=runs/figure7   -> OUT/runs/<dataset>/<method>/seeds_a_b_c   (checkpoints, logs)
#                         OUT/results/<dataset>/<method>/seeds_a_b_c (measurement JSON/CSV)
#                         OUT/report/                                (table, figures)
#                         OUT/logs/                                  (one log per step)
#   EPOCHS=200 BATCH_SIZE=128 LR=0.1 WEIGHT_DECAY=5e-4 MODEL=resnet18 WIDTH=64
#   RHO=0.2 FLAT_RATIO=0.5 INITIAL_EPOCHS=epochs/2   EXTRA="" (more main.py flags)
#   DEVICE=auto   NGPUS=1 (>1: each run on NGPUS GPUs with torchrun; measurements spread over them)
#   JOBS=1 (runs/measurements at the same time; CPU threads per job = cores/JOBS)
#   DIVERSITY_EXTRA="" VARIANCE_EXTRA="" SHARPNESS_EXTRA="" (flags for the measure scripts)
#   SHARPNESS_MODES=APGD_worst (e.g. APGD_worst,fisher: also the Fisher trace, on the same batches)
#   REPORT_EXTRA="" (flags for scripts/report.py)   PYTHON=python
#
# Rerunning resumes: every step runs its Python script, which checks what is in OUT against the
# command. main.py trains nothing for a finished run, continues an unfinished one and refuses (one
# line naming the setting) a run trained with other arguments; a measure script skips a mode whose
# JSON was measured with the same arguments from the same files and measures the others again. A
# failed step is reported, its dependants are skipped, the rest goes on, and the exit status is 1.
# The report is written from what exists, unless a run whose training failed has measurements
# from before in OUT/results (they would be reported under this command's settings).
# One Ctrl-C (or SIGTERM) stops everything: the running steps are stopped, nothing else starts, no
# report is written, and a line says how to resume (rerun the same command).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/train/_common.sh"

DATASETS="${DATASETS:-cifar10 cifar100 tiny_imgnet}"
METHODS="${METHODS:-deep_ensemble sam sharpbalance}"
SEED_SETS="${SEED_SETS:-13 17 27;113 117 127;43 59 223}"
OUT="${OUT:-runs/figure7}"
DATA_PATH="${DATA_PATH:-./datasets}"
CORRUPT_PATH="${CORRUPT_PATH:-}"
DEVICE="${DEVICE:-auto}"
NGPUS="${NGPUS:-1}"
JOBS="${JOBS:-1}"
DIVERSITY_EXTRA="${DIVERSITY_EXTRA:-}"
VARIANCE_EXTRA="${VARIANCE_EXTRA:-}"
SHARPNESS_EXTRA="${SHARPNESS_EXTRA:-}"
SHARPNESS_MODES="${SHARPNESS_MODES:-APGD_worst}"
REPORT_EXTRA="${REPORT_EXTRA:-}"
EPOCHS="${EPOCHS:-200}"
# The other training settings (BATCH_SIZE, LR, WIDTH, RHO, ...) reach scripts/train/*.sh through the
# environment as given; unset, those scripts use the published values.
export DATA_PATH CORRUPT_PATH DEVICE NGPUS EPOCHS

LOGS="$OUT/logs"
mkdir -p "$LOGS"
if ((JOBS > 1)) && [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    cores="$(nproc 2>/dev/null || echo 2)"
    OMP_NUM_THREADS=$((cores / JOBS > 0 ? cores / JOBS : 1))
    export OMP_NUM_THREADS  # several torch processes with all threads each would fight over the cores
fi

IFS=';' read -r -a seed_sets <<<"$SEED_SETS"
for i in "${!seed_sets[@]}"; do seed_sets[i]="$(normalise_seeds "${seed_sets[i]}")"; done
read -r -a datasets <<<"$DATASETS"
read -r -a methods <<<"$METHODS"
start_time=$SECONDS
failed=()

# ---------------------------------------------------------------------------------- job running
# step NAME CMD...: run CMD with its output in $LOGS/NAME.log and its exit status in $LOGS/NAME.rc.
# JOBS=1: one at a time, output also on the terminal. JOBS>1: in the background, at most JOBS.
# Either way the step is a background job that the script waits for (so a signal to the script is
# handled at once, not after the step), started with job control on (set -m) so that it gets its own
# process group, holding everything it starts (torchrun and its workers, tee), and keeps SIGINT
# (without job control, background commands ignore it). Job control is off otherwise, so the
# script's own commands stay in the terminal's process group and Ctrl-C always reaches the script.
step() {
    local name="$1"
    shift
    rm -f "$LOGS/$name.rc"
    if ((JOBS > 1)); then
        while (($(jobs -pr | wc -l) >= JOBS)); do wait -n 2>/dev/null || true; done
        echo "    started $name (log: $LOGS/$name.log)"
    fi
    set -m
    (
        rc=0
        if ((JOBS <= 1)); then
            # tee ignores SIGINT so that the step's own "interrupted" line still reaches the log.
            "$@" </dev/null 2>&1 | (trap '' INT; exec tee "$LOGS/$name.log") || rc=$?
        else
            "$@" </dev/null >"$LOGS/$name.log" 2>&1 || rc=$?
        fi
        echo "$rc" >"$LOGS/$name.rc"
        if ((JOBS > 1 && rc == 0)); then echo "    done    $name ($(tail -n 1 "$LOGS/$name.log" | cut -c1-100))"; fi
    ) &
    set +m
    if ((JOBS <= 1)); then wait "$!" || true; fi
}

# On Ctrl-C / SIGTERM: pass SIGINT to every running step's process group (Python stops cleanly;
# checkpoints and results are written atomically), force what still runs after 30 s, start
# nothing more, then end by the same signal so a calling script (demo.sh) stops too.
interrupted() {
    local sig="$1" pid
    trap '' INT TERM  # one Ctrl-C is enough; more while stopping change nothing
    echo "" >&2
    echo "!!! interrupted: stopping the running step(s)" >&2
    for pid in $(jobs -p); do kill -INT -- "-$pid" 2>/dev/null || true; done
    for _ in $(seq 300); do [[ -z "$(jobs -pr)" ]] && break; sleep 0.1; done
    for pid in $(jobs -pr); do kill -KILL -- "-$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    echo "Figure 7 pipeline interrupted after $((SECONDS - start_time))s; no further step was started (the report" \
        "is written only by a run that gets through). To resume, rerun the same command: finished training and" \
        "measurements are skipped, unfinished training continues from its last completed epoch (logs in $LOGS)" >&2
    trap - "$sig"
    kill -s "$sig" "$$"
}
trap 'interrupted INT' INT
trap 'interrupted TERM' TERM

# collect NAME...: wait for the background steps, then note the failed ones (their log's tail shown).
collect() {
    wait || true
    local name rc
    for name in "$@"; do
        rc="$(cat "$LOGS/$name.rc" 2>/dev/null || echo 1)"
        if [[ "$rc" != 0 ]]; then
            failed+=("$name")
            echo "!!! step $name failed (exit $rc); last lines of $LOGS/$name.log:" >&2
            tail -n 15 "$LOGS/$name.log" >&2 || true
        fi
    done
}

step_ok() { [[ "$(cat "$LOGS/$1.rc" 2>/dev/null || echo 1)" == 0 ]]; }

say "Figure 7: datasets [$DATASETS], methods [$METHODS], ensembles [${SEED_SETS}], $EPOCHS epochs, output $OUT"

# ------------------------------------------------------------------------------------- training
say "step 1/3: training"
train_steps=()
train_jobs=$JOBS
((NGPUS > 1)) && JOBS=1  # each run already uses every GPU through torchrun
for dataset in "${datasets[@]}"; do
    if [[ "$dataset" == digits ]]; then  # digits-C is generated once, here, instead of by every measurement
        name="prepare_digits-C"
        step "$name" env PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m data.digits "${CORRUPT_PATH:-$DATA_PATH}"
        train_steps+=("$name")
    fi
    for method in "${methods[@]}"; do
        for seeds in "${seed_sets[@]}"; do
            tag="$(seeds_tag "$seeds")"
            name="train_${dataset}_${method}_${tag}"
            step "$name" env DATASET="$dataset" SEEDS="$seeds" SAVE_PATH="$OUT/runs/$dataset/$method/$tag" \
                "$REPO/scripts/train/$method.sh"
            train_steps+=("$name")
        done
    done
done
collect "${train_steps[@]}"
JOBS=$train_jobs

# ---------------------------------------------------------------------------------- measurement
say "step 2/3: measurements (accuracy and disagreement, variance diversity, sharpness)"
measure_steps=()
measure_jobs=$JOBS
((NGPUS > JOBS)) && JOBS=$NGPUS
k=0
for dataset in "${datasets[@]}"; do
    for method in "${methods[@]}"; do
        for seeds in "${seed_sets[@]}"; do
            tag="$(seeds_tag "$seeds")"
            if ! step_ok "train_${dataset}_${method}_${tag}"; then
                echo "    skip measuring $dataset $method $tag: its training failed" >&2
                continue
            fi
            for script in measure_diversity measure_diversity_variance measure_sharpness; do
                modes=""  # empty = the measure script's default modes
                case "$script" in
                    measure_diversity) extra="$DIVERSITY_EXTRA" ;;
                    measure_diversity_variance) extra="$VARIANCE_EXTRA" ;;
                    measure_sharpness) extra="$SHARPNESS_EXTRA" modes="$SHARPNESS_MODES" ;;
                esac
                device="$DEVICE"
                if ((NGPUS > 1)) && [[ "$DEVICE" == auto || "$DEVICE" == cuda ]]; then
                    device="cuda:$((k % NGPUS))"
                fi
                k=$((k + 1))
                name="${script#measure_}_${dataset}_${method}_${tag}"
                step "$name" env DATASET="$dataset" METHOD="$method" SEEDS="$seeds" DEVICE="$device" \
                    RUN="$OUT/runs/$dataset/$method/$tag" SAVE="$OUT/results/$dataset/$method/$tag" EXTRA="$extra" \
                    MODES="$modes" "$REPO/scripts/measure/$script.sh"
                measure_steps+=("$name")
            done
        done
    done
done
((${#measure_steps[@]})) && collect "${measure_steps[@]}"
JOBS=$measure_jobs

# --------------------------------------------------------------------------------------- report
say "step 3/3: report"
# A run whose training failed now (e.g. refused: its folder holds a run with other settings) may have
# measurements from an earlier command; the report would show them under this command's settings.
stale=()
for dataset in "${datasets[@]}"; do
    for method in "${methods[@]}"; do
        for seeds in "${seed_sets[@]}"; do
            tag="$(seeds_tag "$seeds")"
            if ! step_ok "train_${dataset}_${method}_${tag}" && [[ -d "$OUT/results/$dataset/$method/$tag" ]]; then
                stale+=("$OUT/results/$dataset/$method/$tag")
            fi
        done
    done
done
if ((${#stale[@]})); then
    echo "!!! no report: the training of ${#stale[@]} run(s) failed, and their earlier measurements would be" \
        "reported under this command's settings: ${stale[*]}. Fix those steps (see their logs), or use another" \
        "OUT" >&2
    failed+=("report")
else
    read -r -a report_extra <<<"$REPORT_EXTRA"
    report_rc=0
    "$PY" "$REPO/scripts/report.py" --results "$OUT/results" --out "$OUT/report" --datasets "${datasets[@]}" \
        --methods "${methods[@]}" --seed_sets "$SEED_SETS" "${report_extra[@]}" || report_rc=$?
    ((report_rc == 0)) || failed+=("report")
fi

elapsed=$((SECONDS - start_time))
if ((${#failed[@]})); then
    echo "Figure 7 pipeline finished in ${elapsed}s with ${#failed[@]} failed step(s): ${failed[*]} (logs in $LOGS)" >&2
    exit 1
fi
say "Figure 7 pipeline finished in ${elapsed}s; report in $OUT/report (logs in $LOGS)"
