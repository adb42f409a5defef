#!/usr/bin/env bash
# Does SharpBalance do what the paper claims? K seed sets of Deep Ensemble, DE + SAM, SharpBalance and
# SharpBalance with the paper's --select sharpest, each a 3-member ensemble, on digits / digits-C; every
# ensemble measured (accuracy, NLL, ECE, disagreement, logit variance, worst-case sharpness, Fisher trace);
# then the claims table: paired differences over seed sets with 95% t-intervals and a verdict per claim.
#
#   bash scripts/claims.sh
#
# It is scripts/figure7.sh (training, measurements, report) with small settings and
# scripts/report.py --claims; rerunning resumes (finished runs and measurements are skipped).
# Environment (defaults sized for about 45 minutes on 2 CPU cores, as measured in README "Testing the paper's claims"):
#   K=8   seed sets: the paper's 13 17 27; 113 117 127; 43 59 223, then 213 217 227; 313 317 327; ...
#   SEED_SETS=""  an explicit list instead of K ("13 17 27;113 117 127"; at least two)
#   METHODS="deep_ensemble sam sharpbalance sharpbalance_sharpest"   DATASETS=digits (others as in figure7.sh)
#   OUT=runs/claims   DATA_PATH=$OUT/data (digits-C is generated there)
#   EPOCHS=10 WIDTH=8 BATCH_SIZE=64 LR=0.1 RHO=0.2 FLAT_RATIO=0.5 INITIAL_EPOCHS=epochs/2
#   DEVICE=cpu  JOBS=2 (runs at a time, one thread each)
#   SHARPNESS_BATCHES=10  batches of 5 training images for the worst-case sharpness (APGD_worst, adaptive,
#                         rho 0.5, the script's defaults; l2 only) and the Fisher trace (the release: 100)
#   SHARPNESS_EXTRA="--batch-num $SHARPNESS_BATCHES --norm l2"   DIVERSITY_EXTRA=""   VARIANCE_EXTRA=""
#   MARGIN=0.10  "about as flat" = at most 10 % sharper than DE + SAM (relative; fixed before any run)
# Output: $OUT/report/claims.md (.csv, .json), figure7.png, sharpness_diversity.png, figure7_table.md, ...
#         $OUT/runs (checkpoints), $OUT/results (measurements), $OUT/logs (one log per step)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/train/_common.sh"

export OUT="${OUT:-runs/claims}"
export DATASETS="${DATASETS:-digits}"
export DATA_PATH="${DATA_PATH:-$OUT/data}"
export METHODS="${METHODS:-deep_ensemble sam sharpbalance sharpbalance_sharpest}"
export EPOCHS="${EPOCHS:-10}"
export WIDTH="${WIDTH:-8}"
export BATCH_SIZE="${BATCH_SIZE:-64}"
export LR="${LR:-0.1}"
export RHO="${RHO:-0.2}"
export FLAT_RATIO="${FLAT_RATIO:-0.5}"
export INITIAL_EPOCHS="${INITIAL_EPOCHS:-$(default_initial_epochs "$EPOCHS")}"
export DEVICE="${DEVICE:-cpu}"
export JOBS="${JOBS:-2}"
SHARPNESS_BATCHES="${SHARPNESS_BATCHES:-10}"
export SHARPNESS_EXTRA="${SHARPNESS_EXTRA:---batch-num $SHARPNESS_BATCHES --norm l2}"
export SHARPNESS_MODES=APGD_worst,fisher
MARGIN="${MARGIN:-0.10}"
K="${K:-8}"

if [[ -z "${SEED_SETS:-}" ]]; then
    [[ "$K" =~ ^[0-9]+$ ]] || die "K must be a whole number of seed sets, got '$K'"
    ((K >= 2)) || die "K=$K: a confidence interval needs at least two seed sets (K >= 2; 8 by default)"
    SEED_SETS="$("$PY" -c "import sys; sys.path.insert(0, sys.argv[1]); from reporting import claims; \
print(';'.join(' '.join(map(str, s)) for s in claims.default_seed_sets(int(sys.argv[2]))))" "$REPO" "$K")"
fi
IFS=';' read -r -a sets <<<"$SEED_SETS"
((${#sets[@]} >= 2)) || die "SEED_SETS has ${#sets[@]} seed set(s): a confidence interval needs at least two seed sets"
export SEED_SETS

# The settings travel with the claims table (claims.md / claims.json), with the machine they ran on.
mkdir -p "$OUT/report"
settings="$OUT/report/claims_settings.json"
SHARPNESS_EXTRA_SHOWN="$SHARPNESS_EXTRA" "$PY" - "$settings" <<'PYEOF'
import json, os, platform, sys
env = os.environ
cpu = platform.processor() or platform.machine()
if os.path.exists("/proc/cpuinfo"):
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), cpu)
settings = {"seed sets": env["SEED_SETS"], "K": len(env["SEED_SETS"].split(";")), "datasets": env["DATASETS"],
            "methods": env["METHODS"],
            "model": f"resnet18 width {env['WIDTH']}", "epochs": env["EPOCHS"], "batch size": env["BATCH_SIZE"],
            "lr": env["LR"], "rho": env["RHO"], "flat_ratio": env["FLAT_RATIO"],
            "initial_epochs": env["INITIAL_EPOCHS"],
            "sharpness": f"APGD_worst + fisher, measure_sharpness.py {env['SHARPNESS_EXTRA_SHOWN']}",
            "machine": f"{cpu}, {os.cpu_count()} cores, device {env['DEVICE']}, JOBS={env['JOBS']}"}
with open(sys.argv[1], "w") as f:
    json.dump(settings, f, indent=1)
PYEOF
export REPORT_EXTRA="--claims --error_bars ci95 --flatness_margin $MARGIN --settings $settings ${REPORT_EXTRA:-}"

start=$SECONDS
say "claims: ${#sets[@]} seed sets x [$METHODS] on [$DATASETS] (ResNet18 width $WIDTH, $EPOCHS epochs," \
    "batch $BATCH_SIZE, rho $RHO, $JOBS jobs on $DEVICE); sharpness: $SHARPNESS_EXTRA"
rc=0
"$REPO/scripts/figure7.sh" || rc=$?
say "claims finished in $((SECONDS - start))s (exit $rc)"
echo "    claims:  $OUT/report/claims.md (and .csv, .json)"
echo "    figures: $OUT/report/figure7.png, $OUT/report/sharpness_diversity.png"
exit "$rc"
