#!/usr/bin/env bash
# One device call for the serving checks: unpack the SGLang kit, install sglang-kvc (editable, so
# SGLang finds its plugin entry point), then run benchmarks/serve_e2e.py with the given arguments.
# Usage (repo root, on the GPU machine): bash benchmarks/gpu_serve.sh [serve_e2e args]
set -uo pipefail
source benchmarks/gpu_setup.sh
python3 benchmarks/serve_e2e.py --out "$OUT" "$@" 2>&1 | tee "$OUT/serve_e2e.log"
