#!/usr/bin/env bash
# The test command of README.md (and of CI): set up, then run the whole test suite.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` for the fast subset.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
