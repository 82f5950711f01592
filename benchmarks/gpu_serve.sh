#!/usr/bin/env bash
# One device call for the serving checks: unpack the SGLang kit, install sglang-kvc (editable, so
# SGLang finds its plugin entry point), then run benchmarks/serve_e2e.py with the given arguments.
# Usage (repo root, on the GPU machine): bash benchmarks/gpu_serve.sh [serve_e2e args]
set -uo pipefail
OUT="${OUT:-/tmp/kvc-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
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
import prometheus_client, sglang_kvc.kernels  # noqa: F401
print("plugin entry point:", eps)
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
python3 benchmarks/serve_e2e.py --out "$OUT" "$@" 2>&1 | tee "$OUT/serve_e2e.log"
