# Sourced by the benchmarks/gpu_*.sh scripts on the GPU machine (repo root): unpack the SGLang kit
# into /tmp/site, add the extra wheels (.gpukit/wheels, .whl: e.g. prometheus_client for /metrics),
# install sglang-kvc editable (SGLang finds its plugin entry point only in an installed
# distribution) and check that the plugin and the kernels import. Sets OUT, PYTHONPATH.
# Build the extra wheels here with: bash scripts/make_gpu_wheels.sh
# The device machine's copy of the tree may carry stale git metadata: start a call with
# KVC_GIT_COMMIT=<the commit> so the results' versions name the code that ran.
OUT="${OUT:-/tmp/kvc-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
if [ ! -d /tmp/site/sglang ]; then
  mkdir -p /tmp/site && for f in .gpukit/sglang-kit-*.txz; do tar xJf "$f" -C /tmp/site; done
fi
for dir in .gpukit/wheels .whl; do
  if ls "$dir"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$dir"/*.whl \
      >> "$OUT/setup.log" 2>&1
  fi
done
python3 -c "import sglang_kvc.patches.plugin" 2>/dev/null || \
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >> "$OUT/setup.log" 2>&1
python3 - <<'PY' || { echo "sglang-kvc set-up failed"; tail -20 "$OUT/setup.log"; exit 1; }
from importlib.metadata import entry_points
eps = [ep.value for ep in entry_points(group="sglang.srt.plugins")]
assert "sglang_kvc.patches.plugin:register" in eps, f"plugin entry point missing: {eps}"
import sglang_kvc.kernels, sglang_kvc.pool  # noqa: F401
try:
    import prometheus_client  # noqa: F401
except ImportError:
    print("note: prometheus_client missing: --enable-metrics will fail (bash scripts/make_gpu_wheels.sh)")
print("sglang-kvc plugin entry point:", eps)
PY
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/nvidia-smi.txt"
