#!/usr/bin/env bash
# Download the wheels scripts/device-bench.sh installs on a GPU machine that lacks them (its Python:
# 3.12, x86-64): open_clip and what it needs beyond torch, torchvision, timm, regex, tqdm,
# huggingface_hub and safetensors, which that machine has.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .whl open_clip_torch==3.3.0 ftfy wcwidth
ls -la .whl
