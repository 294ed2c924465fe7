#!/usr/bin/env bash
# The prepared device benchmark: `bench.py speed` on a bare GPU machine, in one call.
#
#   bash scripts/device-bench.sh          # ViT-B/16 at 224 px, bf16, on the GPU (about 7 minutes on an H200)
#   bash scripts/device-bench.sh cpu      # the same rows at micro size on this CPU (the CI test runs it)
#
# The GPU machine has torch, timm, pandas, typer and numpy, but not open_clip: the teacher's package
# and what it needs beyond those travel as wheels, downloaded here with `bash scripts/device-wheels.sh`
# into .whl/ (git-ignored) and installed from there before the run. Nothing else is needed: the speed
# path imports neither MLflow, submitit nor pydantic. Output: one table on stdout, and
# $OUT/device-bench.json (OUT defaults to runs/device-bench).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-runs/device-bench}
mkdir -p "$OUT"
mode=${1:-gpu}

if ! "$PYTHON" -c "import open_clip" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "open_clip is missing and .whl/ holds no wheels: run scripts/device-wheels.sh" >&2; exit 2; }
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/device-bench-site .whl/*.whl
  export PYTHONPATH=/tmp/device-bench-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1

if [ "$mode" = cpu ]; then
  exec "$PYTHON" bench.py speed --device cpu --size vit_micro_patch4 --img-size 32 --batch 8 \
    --compile off,all --compile-cells milan --max-batch 32 --loader-workers 0,1 --end-to-end cpu:1,gpu:0 \
    --steps 1 --warmup 1 --json-out "$OUT/device-bench.json"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
# eager rows for the three cells and the group job of 8, the loader on the node's cores, the largest
# batch of full MILAN, then compiled as runtime.compile compiles (students and teacher: a minute or so
# per distinct graph) MAE, full MILAN and the group, and full MILAN fed by the loop's own data stream
exec "$PYTHON" bench.py speed --device cuda --size vit_base_patch16 --img-size 224 --batch 256 \
  --compile off,all --compile-cells mae,milan --max-batch 8192 --loader-workers 1,4,8,15 \
  --end-to-end cpu:15,gpu:4 --steps 8 --warmup 3 --budget-s "${BUDGET_S:-390}" --json-out "$OUT/device-bench.json"
