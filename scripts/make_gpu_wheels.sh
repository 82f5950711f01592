#!/usr/bin/env bash
# Downloads the pure-Python wheels the GPU kit lacks into .gpukit/wheels (travels with carry [".gpukit"]).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpukit/wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform any -d .gpukit/wheels prometheus_client==0.26.0 \
  2> >(grep -v "^WARNING: Location" >&2)
ls -la .gpukit/wheels
