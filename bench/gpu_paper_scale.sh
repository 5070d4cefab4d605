#!/usr/bin/env bash
# The paper's Gemma 2 2B layer-12 grid (all 40 Gemma Scope residual SAEs, 16k-1m latents) on a random stand-in
# with the real dimensions, at 300 x 1024 tokens, on one GPU; prints every figure and PASS/FAIL against:
#   engine over all SAEs <= 30 min, peak GPU memory <= 70 GB, peak host RSS <= 32 GB,
#   encoder GEMM FLOP rate >= 50% of the matmul peak measured in the same process.
#
#   bash bench/gpu_paper_scale.sh                          # the real thing (about 45 GB of disk under OUT)
#   TOKENS=2048 WIDTHS=16k,32k WIDTH_SCALE=1/64 DEVICE=cpu bash bench/gpu_paper_scale.sh   # CPU smoke test
#
# Settings (environment): MODEL (gemma-2-2b; tiny-gemma-2 for a seconds-long check), TOKENS (307200),
# CTX_LEN (1024), WIDTHS (all seven), WIDTH_SCALE (1: widths as published; e.g. 1/64 scales every width and
# keeps the grid), DEVICE (cuda), OUT (paper-scale-out), BUDGET_GB (unset: the library detects it), PYTHON.
# The L0 variants of one width share one hard-linked weights file (Llama Scope layout, scalar JumpReLU
# threshold per variant): 38 GB of SAE files at d = 2304 instead of 228 GB.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-gemma-2-2b}
TOKENS=${TOKENS:-307200}
CTX_LEN=${CTX_LEN:-1024}
WIDTHS=${WIDTHS:-16k,32k,65k,131k,262k,524k,1m}
WIDTH_SCALE=${WIDTH_SCALE:-1}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-paper-scale-out}
PYTHON=${PYTHON:-python}

echo "== paper-scale grid: model ${MODEL}, ${TOKENS} tokens (contexts of ${CTX_LEN}), widths ${WIDTHS}, device ${DEVICE}"
if [ "${WIDTH_SCALE}" != "1" ]; then
    echo "== WIDTHS SCALED by ${WIDTH_SCALE}: not the published widths; the targets below do not apply"
fi
if [ "${DEVICE}" != "cuda" ] || [ "${TOKENS}" != "307200" ]; then
    echo "== smoke run (device ${DEVICE}, ${TOKENS} tokens): PASS/FAIL below are printed, not meaningful"
fi
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
df -h "$(dirname "${OUT}")" | tail -1

args=(--model "${MODEL}" --full-grid --tokens "${TOKENS}" --ctx-len "${CTX_LEN}" --widths "${WIDTHS}"
      --width-scale "${WIDTH_SCALE}" --device "${DEVICE}" --out "${OUT}" --gates)
if [ -n "${BUDGET_GB:-}" ]; then
    args+=(--budget-gb "${BUDGET_GB}")
fi
status=0
"${PYTHON}" bench/bench_paper_scale.py "${args[@]}" || status=$?
echo "== done (exit ${status}; 1 means a target failed); figures in ${OUT}/result.json"
exit "${status}"
