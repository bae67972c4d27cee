#!/usr/bin/env bash
# The GPU checks in one prepared command (well under 8 minutes on one H100/H200), for the device tool:
#   bash bench/gpu.sh            # writes JSON under $OUT (or ./bench-out) and prints the ratio lines
#   SMOKE=1 bash bench/gpu.sh    # the same script on a CPU at toy shapes (what the tests run)
# 1. divergence: naive vs chunked at B·T=8192, H=896 and 3584, V=151,936, bf16 (head trained; head frozen)
# 2. a random-init Qwen2.5-0.5B-shaped training step: phase split, tokens/s, training MFU
# The GPU machine has torch/transformers/peft preinstalled but no network: carry missing pure-Python
# wheels (see /work/.library/device/README.md) and install the repo with --no-deps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"  # the GPU image's python3 holds its torch
# one log for all checks: the device tool brings back at most 8 files (this writes 5)
LOG="$OUT/checks.log"
if [[ "${SMOKE:-0}" == 1 ]]; then  # this script itself, on a CPU at toy shapes (tests/test_bench_smoke.py)
    STEP_ARGS=(--device cpu --preset tiny --batch-size 2 --max-new-tokens 4 --steps 1 --warmup 0)
    DIV_ARGS=(--tokens 64 --hidden 32 48 --vocab 512 --dtype bfloat16 --repeats 1 --warmup 0 --oracle-tokens 32)
    echo "smoke run on CPU" | tee "$LOG"
else
    STEP_ARGS=(--device cuda --preset qwen2.5-0.5b --batch-size 16 --max-new-tokens 256 --steps 3)
    DIV_ARGS=(--gpu-target --warmup 2)
    "$PY" -m pip install -q --no-deps --no-build-isolation -e packages/unisd-core -e packages/unisd-components 2>&1 | tail -2 || true
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | tee "$LOG"
fi
failed=()
check() {  # check NAME SECONDS COMMAND...: a failure or timeout is logged and does not stop the rest
    local name=$1 seconds=$2
    shift 2
    echo "== $name" | tee -a "$LOG"
    if ! timeout "$seconds" "$@" 2>&1 | tee -a "$LOG"; then
        echo "!! $name failed or timed out (limit ${seconds}s)" | tee -a "$LOG"
        failed+=("$name")
    fi
}
# the step first: it is the one no CPU run can stand in for
check step 210 "$PY" bench/step.py "${STEP_ARGS[@]}" --json "$OUT/step.json"
check divergence 110 "$PY" bench/divergence.py "${DIV_ARGS[@]}" --json "$OUT/divergence.json"
# the default (LoRA) run: frozen head, loss on the divergence only; with and without the compiled chunk math
check divergence-lora 80 "$PY" bench/divergence.py "${DIV_ARGS[@]}" --frozen-head --divergence-only \
    --json "$OUT/divergence-lora.json"
check divergence-lora-eager 60 "$PY" bench/divergence.py "${DIV_ARGS[@]}" --frozen-head --divergence-only \
    --compile off --json "$OUT/divergence-lora-eager.json"
if ((${#failed[@]})); then
    echo "failed: ${failed[*]}"
    exit 1
fi
