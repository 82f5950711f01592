#!/usr/bin/env bash
# One device call for the issue-#6 end-to-end benchmark: unpack the SGLang kit, install sglang-kvc
# (editable, so SGLang finds its plugin entry point), check the entry point and bench_serving's import,
# then run benchmarks/e2e.py with the given arguments, writing everything under $OUT. The server and
# bench_serving logs (e2e-logs*/) leave as one e2e-logs.tgz: the device returns at most 8 files.
# Usage (repo root, on the GPU machine; .gpukit travels with carry [".gpukit"]; the plan is in e2e.py's docstring):
#   bash benchmarks/gpu_e2e.sh --no-progress                                    # call 1: 1b headline pair
#   bash benchmarks/gpu_e2e.sh --no-progress --resume benchmarks/results/e2e-<device>-<date>.json
#                                                     # call 2: stock-bf16 + the no-pressure pair (call 4: the rest)
#   bash benchmarks/gpu_e2e.sh --no-progress --model-size 8b --no-shared-prefix --graphs decode-only --systems kvc=k8v8,k4v4-kc stock-fp8
#                                                     # call 3: 8b headline pair -> e2e-<device>-<date>-8b.json
# Between calls: cp <files_at>/e2e-*.json benchmarks/results/ && tar xzf <files_at>/e2e-logs.tgz -C benchmarks/results
# Set-up before e2e.py takes ~30 s; e2e.py keeps to --time-budget-s (default 535 s).
set -uo pipefail
T0=$(date +%s)
source benchmarks/gpu_setup.sh
python3 -c "import matplotlib, tqdm" || exit 1
echo "set-up took $(( $(date +%s) - T0 )) s"
python3 benchmarks/e2e.py --out "$OUT" "$@" 2>&1 | tee "$OUT/e2e.log"
rc="${PIPESTATUS[0]}"
logs=$(cd "$OUT" && ls -d e2e-logs* 2>/dev/null)
[ -n "$logs" ] && (cd "$OUT" && tar czf e2e-logs.tgz --remove-files $logs)
exit "$rc"
