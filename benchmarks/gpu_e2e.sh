#!/usr/bin/env bash
# One device call for the issue-#6 end-to-end benchmark: unpack the SGLang kit, install sglang-kvc
# (editable, so SGLang finds its plugin entry point), check the entry point and bench_serving's import,
# then run benchmarks/e2e.py with the given arguments, writing everything under $OUT.
# Usage (repo root, on the GPU machine; .gpukit travels with carry [".gpukit"]):
#   bash benchmarks/gpu_e2e.sh                                          # call 1
#   bash benchmarks/gpu_e2e.sh --resume benchmarks/results/e2e-<device>-<date>.json   # call 2 (and 3)
# Set-up before e2e.py takes ~35 s (kit unpack ~20 s); e2e.py keeps to --time-budget-s (default 520 s).
set -uo pipefail
T0=$(date +%s)
source benchmarks/gpu_setup.sh
python3 -c "import matplotlib, tqdm" || exit 1
echo "set-up took $(( $(date +%s) - T0 )) s"
python3 benchmarks/e2e.py --out "$OUT" "$@" 2>&1 | tee "$OUT/e2e.log"
exit "${PIPESTATUS[0]}"
