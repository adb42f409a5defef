#!/usr/bin/env bash
# The GPU check, in one go: at most 8 minutes on one H200 (every part has its own time limit, so a
# slow compile cuts its own rows, not the parts after it). It prints, in this order:
#   1. smoke       main.py on digits (3 methods, SharpBalance split) on the GPU and on the CPU, the three
#                  measure scripts, agreement (same split masks, final losses within 10%), torchrun
#                  with 3 ranks on one GPU, the fast-path flags, bad device input
#   2. throughput  img/s and peak GPU memory: ResNet18 width 64, 45,000 CIFAR-shaped images on the GPU,
#                  batch 128: SGD, SAM, mixed (f = 0.8), scoring (func, hooks), evaluation; fp32,
#                  bf16 + channels_last, + torch.compile; Tiny-ImageNet-shaped SGD for the cost ratio
#   3. shared      three members training at once on the GPU (aggregate img/s, memory per process)
#   4. projection  200-epoch 3-member runs per method on CIFAR-10/100 and Tiny-ImageNet, the whole
#                  Figure 7, next to the issue's goals
# Results: <out>/{smoke,throughput,shared,projection}.json and <out>/smoke/ (runs, logs).
#
#   bash benchmarks/gpu_check.sh                                  # the GPU day: --device cuda
#   bash benchmarks/gpu_check.sh --out "$OUT/gpu_check"           # results somewhere else
#   bash benchmarks/gpu_check.sh --quick --device cpu             # the same code on toy sizes, on a CPU
#   bash benchmarks/gpu_check.sh --parts "throughput projection"  # some parts only
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

PY="${PYTHON:-python3}"
DEVICE=cuda
OUT_DIR=results/gpu_check
PARTS="smoke throughput shared projection"
QUICK=()
while (($#)); do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --out) OUT_DIR="$2"; shift 2 ;;
        --parts) PARTS="$2"; shift 2 ;;
        --quick) QUICK=(--quick); shift ;;
        *) echo "error: unknown argument '$1' (--device D, --out DIR, --parts \"...\", --quick)" >&2; exit 2 ;;
    esac
done
export PYTHONUNBUFFERED=1
# Seconds per part: 170 + 180 + 70 + 20 = 440 s, under 8 minutes with the shell's own seconds.
declare -A LIMIT=([smoke]=170 [throughput]=180 [shared]=70 [projection]=20)

for part in $PARTS; do
    if [[ -z "${LIMIT[$part]:-}" ]]; then
        echo "error: unknown part '$part' (smoke, throughput, shared, projection)" >&2
        exit 2
    fi
done
echo "gpu_check: device $DEVICE, results in $OUT_DIR, parts: $PARTS $(date -u '+%Y-%m-%d %H:%M UTC')"
if [[ "$PARTS" != projection ]]; then
    "$PY" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|',
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU visible')" || exit 1
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

status=0
start=$SECONDS
for part in $PARTS; do
    limit="${LIMIT[$part]}"
    echo
    echo "=== $part (limit ${limit}s) ==="
    # The part keeps 10 s of its limit to print and save what it has; `timeout` is the backstop.
    timeout --kill-after=5 "$limit" "$PY" benchmarks/gpu_check.py "$part" --device "$DEVICE" --out "$OUT_DIR" \
        --budget $((limit - 10)) "${QUICK[@]}"
    rc=$?
    if ((rc == 124 || rc == 137)); then
        echo "=== $part: stopped at its ${limit}s limit; its finished rows are in $OUT_DIR/$part.json ==="
        status=1
    elif ((rc != 0)); then
        echo "=== $part: failed (exit status $rc) ==="
        status=1
    fi
done
echo
echo "gpu_check: done in $((SECONDS - start))s (exit status $status)"
exit $status
