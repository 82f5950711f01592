#!/usr/bin/env bash
# One device call for the issue-#14 soak: unpack the SGLang kit, install sglang-kvc (editable, so SGLang
# finds its plugin entry point), then run benchmarks/soak.py with the given arguments, writing under $OUT:
# soak-<device>-<date>.json, the server log soak-<device>-<date>.log (gzipped if over 15 MB: the device
# returns files up to 16 MiB) and soak-console.log (this script's output).
# Usage (repo root, on the GPU machine; the device tool: run(kind="nvidia-h200", carry=[".gpukit"],
# timeout_s=600, command="bash benchmarks/gpu_soak.sh [soak.py flags]")):
#   bash benchmarks/gpu_soak.sh                      # random 1b Llama, k8v8,k4v4,k2v2 at 65536 bf16 tokens,
#                                                    # 6 minutes of traffic (cut to fit the call)
#   bash benchmarks/gpu_soak.sh --minutes 4 --concurrency 128
# Timing (one 600 s call): set-up ~30 s, model build ~20 s, server start ~60-75 s, probes, the traffic,
# then up to --post-reserve-s (110 s: drain <= 45 s, flush, probes, SIGKILL 45 s after SIGTERM at worst).
# soak.py gets --time-budget-s = 585 s minus the set-up and ends the traffic early when the rest would not
# fit (the JSON's summary.minutes is what ran).
# Afterwards: cp <files_at>/soak-*-*.json <files_at>/soak-*-*.log* benchmarks/results/
set -uo pipefail
T0=$(date +%s)
source benchmarks/gpu_setup.sh
python3 -c "import aiohttp" || { echo "aiohttp missing: add its wheel to .gpukit/wheels"; exit 1; }
SETUP_S=$(( $(date +%s) - T0 ))
echo "set-up took ${SETUP_S} s"
python3 benchmarks/soak.py --out "$OUT" --time-budget-s $(( 585 - SETUP_S )) "$@" 2>&1 \
  | tee "$OUT/soak-console.log"
rc="${PIPESTATUS[0]}"
for f in "$OUT"/soak-*-*.log; do
  [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt 15000000 ] && gzip "$f"
done
exit "$rc"
