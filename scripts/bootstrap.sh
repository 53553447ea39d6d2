#!/usr/bin/env bash
# Create .venv and install fl-sim with its test tools. torch goes in FIRST and pinned: on these
# machines `torch==2.13.0` is a local CPU build, while an unpinned torch pulls GBs of CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"torch was replaced: {torch.__version__}"
print(f"fl-sim environment ready: torch {torch.__version__}, .venv/")
PY
