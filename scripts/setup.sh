#!/usr/bin/env bash
# Create .venv and install the project with its tested pins. Idempotent: a second run with the same
# pyproject.toml and constraints.txt does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.nalora-setup-stamp
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setup: creating .venv and installing nalora-bench (first run downloads torch, several GB)" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch/torchvision first, from the same constraints, so the regular build (which runs on CPU too) is
# taken: the CPU-only torch wheel has no matching torchvision.
.venv/bin/python -m pip install -q -c constraints.txt torch torchvision
.venv/bin/python -m pip install -q -c constraints.txt -e '.[dev,onnx,cluster,interop]'
echo "$want" > "$stamp"
