#!/usr/bin/env bash
# One device call: unpack the SGLang/FlashInfer kit, run the kernel tests at full size on the GPU,
# then the kernel benchmark. Usage (repo root, on the GPU machine): bash benchmarks/gpu_kernels.sh [bench args]
# Writes logs and results under ${OUT:-/tmp/kvc-out}.
set -uo pipefail
OUT="${OUT:-/tmp/kvc-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH="/tmp/site:$PWD:${PYTHONPATH:-}"
if [ ! -d /tmp/site/sglang ]; then
  mkdir -p /tmp/site && for f in .gpukit/sglang-kit-*.txz; do tar xJf "$f" -C /tmp/site; done
fi
# the repo as an editable package (kernels/ is sglang_kvc.kernels), no dependencies fetched
python3 -c "import sglang_kvc.kernels" 2>/dev/null || \
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/pip.log" 2>&1 || \
  printf 'import sglang_kvc\nsglang_kvc.__path__.append(%s)\n' "'$PWD'" > /tmp/site/sitecustomize.py
python3 -c "import sglang_kvc.kernels" || { echo "cannot import sglang_kvc.kernels"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/nvidia-smi.txt"
if [ "${SKIP_BENCH:-0}" != "1" ]; then
  python3 benchmarks/kernels.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^\[.*tune\|sweep B"
fi
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/test_kernels_quant.py tests/test_kernels_decode.py \
    tests/test_kernels_extend.py --durations=10 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
fi
