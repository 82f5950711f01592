#!/usr/bin/env bash
# One device call for issue #12's teacher-forced parity: unpack the SGLang kit, install sglang-kvc
# (editable, so SGLang finds its plugin entry point), then run benchmarks/parity.py, which starts each
# system's server in turn on the random 1B Llama and writes parity-<device>-<date>.json; the server
# logs leave as one parity-logs.tgz (the device returns at most 8 files).
# Usage (repo root, on the GPU machine; .gpukit travels with carry [".gpukit"]):
#   bash benchmarks/gpu_parity.sh                      # stock-triton, stock-flashinfer, kvc-bf16, then
#                                                      # kvc=LADDER@TIER for k8v8, k4v2 (bf16,k8v8,k4v2) and
#                                                      # k4v4, k2v2 (k8v8,k4v4,k2v2): 7 servers
#   bash benchmarks/gpu_parity.sh --systems stock-triton,stock-flashinfer,kvc-bf16   # the checks only
#   bash benchmarks/gpu_parity.sh --systems stock-triton,stock-flashinfer,kvc=k8v8,k4v4,k2v2@k4v4   # one tier
# Then: cp <files_at>/parity-*.json benchmarks/results/
# Set-up takes ~30 s; parity.py skips the systems it cannot start before --time-budget (default here 480 s).
set -uo pipefail
T0=$(date +%s)
source benchmarks/gpu_setup.sh
echo "set-up took $(( $(date +%s) - T0 )) s"
mkdir -p "$OUT/parity-logs"
python3 benchmarks/parity.py --out "$OUT" --logs "$OUT/parity-logs" --time-budget 480 "$@" 2>&1 | tee "$OUT/parity.log"
rc="${PIPESTATUS[0]}"
(cd "$OUT" && tar czf parity-logs.tgz --remove-files parity-logs)
exit "$rc"
