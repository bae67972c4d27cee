#!/usr/bin/env bash
# The GPU checks in one prepared command (well under 8 minutes on one H100/H200), for the device tool:
#   bash bench/gpu.sh            # writes JSON under $OUT (or ./bench-out) and prints the ratio lines
# 1. divergence: naive vs chunked at B·T=8192, H=896 and 3584, V=151,936, bf16 (head trained; head frozen)
# 2. a random-init Qwen2.5-0.5B-shaped training step: phase split, tokens/s, training MFU
# The GPU machine has torch/transformers/peft preinstalled but no network: carry missing pure-Python
# wheels (see /work/.library/device/README.md) and install the repo with --no-deps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation -e packages/unisd-core -e packages/unisd-components 2>&1 | tail -2 || true
# one log for all checks: the device tool brings back at most 8 files (this writes 5)
LOG="$OUT/checks.log"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | tee "$LOG"
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
check step 210 python bench/step.py --device cuda --preset qwen2.5-0.5b --batch-size 16 --max-new-tokens 256 \
    --steps 3 --json "$OUT/step.json"
check divergence 110 python bench/divergence.py --gpu-target --warmup 2 --json "$OUT/divergence.json"
# the default (LoRA) run: frozen head, loss on the divergence only; with and without the compiled chunk math
check divergence-lora 80 python bench/divergence.py --gpu-target --warmup 2 --frozen-head --divergence-only \
    --json "$OUT/divergence-lora.json"
check divergence-lora-eager 60 python bench/divergence.py --gpu-target --frozen-head --divergence-only \
    --compile off --json "$OUT/divergence-lora-eager.json"
if ((${#failed[@]})); then
    echo "failed: ${failed[*]}"
    exit 1
fi
