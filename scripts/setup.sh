#!/usr/bin/env bash
# Install rlhf_ray and its test tools into the current Python environment.
# Without CUDA, torch 2.13.0 (CPU build) goes in first, so resolving the package never pulls the
# multi-GB CUDA build. Elsewhere set TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu)
# to choose where that CPU build comes from.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-test}"

if ! command -v nvidia-smi >/dev/null 2>&1; then
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
    "$PY" -m pip install --quiet ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
  fi
fi
"$PY" -m pip install --quiet -e ".[$EXTRAS]"
