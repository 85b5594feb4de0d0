#!/usr/bin/env bash
# Create .venv and install the project with its tested pins. Idempotent: a second run with the same
# pyproject.toml and constraints.txt does nothing. Never silent for long: each step prints a line with the
# time so far, and pip prints what it collects, downloads and installs (a download bar on a terminal).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.nalora-setup-stamp
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
start=$SECONDS
step() { echo "setup [$1/4, ${2}s so far]: $3" >&2; }
PIP=(.venv/bin/python -m pip install --disable-pip-version-check --progress-bar on)
step 1 $((SECONDS - start)) "creating .venv (first run downloads torch: several GB, minutes)"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
step 2 $((SECONDS - start)) "upgrading pip"
"${PIP[@]}" --upgrade pip
# torch/torchvision first, from the same constraints, so the regular build (which runs on CPU too) is
# taken: the CPU-only torch wheel has no matching torchvision.
step 3 $((SECONDS - start)) "installing torch and torchvision"
"${PIP[@]}" -c constraints.txt torch torchvision
step 4 $((SECONDS - start)) "installing nalora-bench and its extras (dev, onnx, cluster, interop)"
"${PIP[@]}" -c constraints.txt -e '.[dev,onnx,cluster,interop]'
echo "setup: done in $((SECONDS - start))s" >&2
echo "$want" > "$stamp"
