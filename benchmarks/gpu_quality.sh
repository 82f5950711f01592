#!/usr/bin/env bash
# One device call for issue #7: train the tiny Llama (time-budgeted), then evaluate every tier state
# through the tiered pool and the Triton kernels. Usage (repo root, on the GPU machine):
#   bash benchmarks/gpu_quality.sh [eval_quality args, e.g. --quick]
# Env: TRAIN_BUDGET (training seconds, default 200), EVAL_TIME_LIMIT (seconds the eval waits for its
# workers, default 210), TRAIN_ARGS / EVAL_WORKERS (extra train flags / worker count), MODEL_DIR
# (default /tmp/kvc-quality/model), SKIP_TRAIN=1 (reuse MODEL_DIR on a still-warm machine).
# Plan: setup ~30 s + train ~TRAIN_BUDGET+50 s + eval <= EVAL_TIME_LIMIT+25 s: about 8.5 minutes by default.
# Writes 7 files under ${OUT:-/tmp/kvc-out} (the device returns at most 8): quality-<gpu>-<date>.json
# and .png, train_log.json, train.log, eval.log, setup.log, nvidia-smi.txt. The model stays in MODEL_DIR.
set -uo pipefail
OUT="${OUT:-/tmp/kvc-out}"; mkdir -p "$OUT"
MODEL_DIR="${MODEL_DIR:-/tmp/kvc-quality/model}"
TRAIN_BUDGET="${TRAIN_BUDGET:-200}"
EVAL_TIME_LIMIT="${EVAL_TIME_LIMIT:-210}"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH="/tmp/site:$PWD:${PYTHONPATH:-}"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TOKENIZERS_PARALLELISM=true
start=$(date +%s)
# SGLang is needed: TieredKVPool subclasses SGLang's KVCache (same lines as gpu_kernels.sh)
if [ ! -d /tmp/site/sglang ]; then
  mkdir -p /tmp/site && for f in .gpukit/sglang-kit-*.txz; do tar xJf "$f" -C /tmp/site; done
fi
# the repo as an editable package (kernels/ is sglang_kvc.kernels), no dependencies fetched
python3 -c "import sglang_kvc.kernels" 2>/dev/null || \
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/setup.log" 2>&1 || \
  printf 'import sglang_kvc\nsglang_kvc.__path__.append(%s)\n' "'$PWD'" > /tmp/site/sitecustomize.py
python3 -c "import sglang_kvc.kernels, sglang_kvc.pool, transformers, tokenizers; print('transformers', transformers.__version__, 'tokenizers', tokenizers.__version__)" \
  >> "$OUT/setup.log" 2>&1 || { echo "cannot import sglang_kvc.kernels / pool"; tail -20 "$OUT/setup.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
echo "setup done in $(( $(date +%s) - start )) s"

if [ "${SKIP_TRAIN:-0}" = "1" ] && [ -f "$MODEL_DIR/config.json" ]; then
  echo "SKIP_TRAIN=1: reusing $MODEL_DIR"
else
  rm -rf "$MODEL_DIR"
  # shellcheck disable=SC2086
  timeout $((TRAIN_BUDGET + 150)) python3 -m benchmarks.quality.train_tiny_lm --out "$MODEL_DIR" \
    --time-budget "$TRAIN_BUDGET" --no-progress ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/train.log" | grep -v "Warning\|warn(" 
  [ -f "$MODEL_DIR/config.json" ] || { echo "training did not save a model"; exit 1; }
fi
cp "$MODEL_DIR/train_log.json" "$OUT/" 2>/dev/null
echo "training done at $(( $(date +%s) - start )) s"

timeout $((EVAL_TIME_LIMIT + 90)) python3 -m benchmarks.quality.eval_quality --model "$MODEL_DIR" --out-dir "$OUT" \
  --time-limit "$EVAL_TIME_LIMIT" --workers "${EVAL_WORKERS:-10}" "$@" 2>&1 | tee "$OUT/eval.log" | grep -v "Warning\|warn(\|cpp_extension"
echo "all done in $(( $(date +%s) - start )) s; files in $OUT:"; ls -la "$OUT"
