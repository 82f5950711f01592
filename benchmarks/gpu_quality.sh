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
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TOKENIZERS_PARALLELISM=true
start=$(date +%s)
source benchmarks/gpu_setup.sh  # SGLang is needed: TieredKVPool subclasses SGLang's KVCache
export PYTHONPATH="$PWD:$PYTHONPATH"
python3 -c "import transformers, tokenizers; print('transformers', transformers.__version__, 'tokenizers', tokenizers.__version__)" \
  >> "$OUT/setup.log" 2>&1 || { echo "cannot import transformers / tokenizers"; exit 1; }
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
