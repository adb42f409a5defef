#!/usr/bin/env bash
# The GPU check, in one go: at most 6 minutes on one H200 (every part has its own time limit, so a
# slow part cuts its own rows, not the parts after it). It prints, in this order:
#   1. smoke       main.py on digits (3 methods, SharpBalance split) on the GPU and on the CPU, the three
#                  measure scripts, agreement (same split masks, final losses within 10%), the fast-path
#                  flags, SharpBalance with --cuda_graphs, --lockstep and both (+ bf16 + channels_last)
#                  against the CPU run, with --score_backend hooks on the fast path, the graph-captured
#                  steps against the eager ones, repeatability (killed + resumed against straight, bit
#                  for bit, --cudnn deterministic and the default), bad device input, torchrun with 3
#                  ranks on one GPU
#   2. throughput  the project's rows: ResNet18 width 64, 45,000 CIFAR-shaped images on the GPU, batch
#                  128: SGD, SAM and mixed (f = 0.8) steps over an epoch (epoch 1 with cuDNN's per-size
#                  work, later epochs), scoring (func, hooks), evaluation; fp32 (the defaults), bf16 +
#                  channels_last, fp32 --cudnn deterministic; Tiny-ImageNet-shaped SGD for the cost ratio
#   3. cudnn       the same epochs under --cudnn torch and --cudnn released (a process of their own)
#   4. reference   the bare step in a CUDA graph: one member, three on three streams, the ceiling
#   5. shared      three members training at once on the GPU (aggregate img/s, memory per process)
#   6. graphs      bf16 + channels_last + --cuda_graphs: one member, and three members with --lockstep
#                  (one process, a CUDA stream each), with the graphs' counts (a process of their own)
#   7. projection  200-epoch 3-member runs per method and setting on CIFAR-10/100 and Tiny-ImageNet, the
#                  whole Figure 7, the --cudnn settings side by side, project / reference, three members
#                  on one GPU (streams, processes, lockstep), the goals
# Not in the default run: compile (the torch.compile row; --parts compile, up to 150 s more).
# Results: <out>/summary.json and <out>/gpu_check.log (everything printed); <out>/work/ holds the run
# folders, data and logs (delete it freely).
#
#   bash benchmarks/gpu_check.sh                                  # the GPU day: --device cuda
#   bash benchmarks/gpu_check.sh --out "$OUT/gpu_check"           # results somewhere else
#   bash benchmarks/gpu_check.sh --quick --device cpu             # the same code on toy sizes, on a CPU
#   bash benchmarks/gpu_check.sh --parts "throughput projection"  # some parts only (the summary keeps the others)
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

PY="${PYTHON:-python3}"
DEVICE=cuda
OUT_DIR=results/gpu_check
DEFAULT_PARTS="smoke throughput cudnn reference shared graphs projection"
PARTS="$DEFAULT_PARTS"
QUICK=()
SCALE=1
while (($#)); do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --out) OUT_DIR="$2"; shift 2 ;;
        --parts) PARTS="$2"; shift 2 ;;
        --quick) QUICK=(--quick); SCALE=2; shift ;;
        *) echo "error: unknown argument '$1' (--device D, --out DIR, --parts \"...\", --quick)" >&2; exit 2 ;;
    esac
done
export PYTHONUNBUFFERED=1
# Seconds per part: 86 + 85 + 40 + 30 + 35 + 42 + 12 = 330 s for the default parts, under 6 minutes with
# the shell's own seconds (each part starts a Python process, which imports torch and starts CUDA; the
# version line below starts one more). benchmarks/README.md says what each part is estimated to need.
# --quick doubles them: toy sizes on a CPU check the code, and a CPU (a shared one above all) takes
# longer than an H200 to start the smoke's fresh processes.
declare -A LIMIT=([smoke]=86 [throughput]=85 [cudnn]=40 [reference]=30 [shared]=35 [graphs]=42 [projection]=12 [compile]=150)

for part in $PARTS; do
    if [[ -z "${LIMIT[$part]:-}" ]]; then
        echo "error: unknown part '$part' (${!LIMIT[*]})" >&2
        exit 2
    fi
done
mkdir -p "$OUT_DIR" || exit 1
LOG="$OUT_DIR/gpu_check.log"
if [[ "$PARTS" == "$DEFAULT_PARTS" ]]; then
    # A whole run starts a fresh summary and log; a run of some parts replaces their sections only.
    rm -f "$OUT_DIR/summary.json" "$LOG"
fi

check() {
    echo "gpu_check: device $DEVICE, results in $OUT_DIR, parts: $PARTS $(date -u '+%Y-%m-%d %H:%M UTC')"
    if [[ "$PARTS" != projection ]]; then
        "$PY" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|',
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU visible')" || return 1
        command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    fi
    local status=0 start=$SECONDS part limit rc
    for part in $PARTS; do
        limit=$((${LIMIT[$part]} * SCALE))
        echo
        echo "=== $part (limit ${limit}s) ==="
        # The part keeps 8 s of its limit to print and save what it has; `timeout` is the backstop.
        timeout --kill-after=5 "$limit" "$PY" benchmarks/gpu_check.py "$part" --device "$DEVICE" --out "$OUT_DIR" \
            --budget $((limit - 8)) "${QUICK[@]}"
        rc=$?
        if ((rc == 124 || rc == 137)); then
            echo "=== $part: stopped at its ${limit}s limit; its finished rows are in $OUT_DIR/summary.json ==="
            status=1
        elif ((rc != 0)); then
            echo "=== $part: failed (exit status $rc) ==="
            status=1
        fi
    done
    echo
    echo "gpu_check: done in $((SECONDS - start))s (exit status $status); summary $OUT_DIR/summary.json, log $LOG"
    return $status
}

check 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
