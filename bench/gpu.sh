#!/usr/bin/env bash
# Device figures in one command: set up (when there is no .venv) and time scan, repair and compare of
# random-weight ViT-B-32 and RN50 at 224 px on the GPU; writes bench/results/gpu/gpu.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
# PYTHON=python3 uses a Python that already has the packages (a device image with its own torch).
if [ -z "${PYTHON:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    .venv/bin/pip install -q -r requirements.txt
  fi
  PYTHON=.venv/bin/python
fi
export HF_HUB_OFFLINE=1
"$PYTHON" bench/gpu.py --device "${DEVICE:-cuda}" --out "${OUT:-bench/results/gpu}" "$@"
