#!/usr/bin/env bash
# One device call: unpack the SGLang/FlashInfer kit, run the kernel tests at full size on the GPU,
# then the kernel benchmark. Usage (repo root, on the GPU machine): bash benchmarks/gpu_kernels.sh [bench args]
# Writes logs and results under ${OUT:-/tmp/kvc-out}.
set -uo pipefail
source benchmarks/gpu_setup.sh
export PYTHONPATH="$PWD:$PYTHONPATH"
if [ "${SKIP_BENCH:-0}" != "1" ]; then
  python3 benchmarks/kernels.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^\[.*tune\|sweep B"
fi
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_kernels_quant.py tests/test_kernels_decode.py \
    tests/test_kernels_extend.py --durations=10 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
fi
