#!/usr/bin/env bash
# One device call for the issue-#6 end-to-end benchmark: unpack the SGLang kit, install sglang-kvc
# (editable, so SGLang finds its plugin entry point), check the entry point and bench_serving's import,
# then run benchmarks/e2e.py with the given arguments, writing everything under $OUT.
# Usage (repo root, on the GPU machine; .gpukit travels with carry [".gpukit"]):
#   bash benchmarks/gpu_e2e.sh                                          # call 1
#   bash benchmarks/gpu_e2e.sh --resume benchmarks/results/e2e-<device>-<date>.json   # call 2 (and 3)
# Set-up before e2e.py takes ~35 s (kit unpack ~20 s); e2e.py keeps to --time-budget-s (default 520 s).
set -uo pipefail
OUT="${OUT:-/tmp/kvc-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
T0=$(date +%s)
if [ ! -d /tmp/site/sglang ]; then
  mkdir -p /tmp/site && for f in .gpukit/sglang-kit-*.txz; do tar xJf "$f" -C /tmp/site; done
fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > "$OUT/pip-wheels.log" 2>&1
fi
python3 -c "import sglang_kvc.patches.plugin" 2>/dev/null || \
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/pip.log" 2>&1
python3 - <<'PY' || exit 1
from importlib.metadata import entry_points
eps = [ep.value for ep in entry_points(group="sglang.srt.plugins")]
assert "sglang_kvc.patches.plugin:register" in eps, eps
import prometheus_client, sglang_kvc.kernels, matplotlib, tqdm  # noqa: F401
print("plugin entry point:", eps)
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
echo "set-up took $(( $(date +%s) - T0 )) s"
python3 benchmarks/e2e.py --out "$OUT" "$@" 2>&1 | tee "$OUT/e2e.log"
exit "${PIPESTATUS[0]}"
