#!/usr/bin/env bash
# The GPU checks in one go, for a machine with a GPU (under 10 minutes on one H200); prints one
# JSON object as its last line (also written to $OUT/gpu_check.json). See benchmarks/gpu_check.py.
#
# The device machine has PyTorch, transformers and most of what rmbert needs, but no network:
# carry what it lacks as wheels in .whl/ (made here with `benchmarks/gpu_wheels.sh`), e.g.
#   device run --carry .whl: bash benchmarks/gpu_check.sh
# This development machine has no GPU: the script has run here only as `gpu_check.sh --quick` on
# the CPU (a smoke run); its GPU paths are first exercised where a GPU is lent.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" benchmarks/gpu_check.py --out "${OUT:-/tmp/gpu-check}" "$@"
