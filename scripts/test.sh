#!/usr/bin/env bash
# The test command of README.md (and of CI): set up, then run the whole test suite.
# Real-model tests fetch the small real assets they need into the asset cache (NALORA_TEST_FETCH=1), so they
# run on a fresh machine too. Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check --quiet .
export NALORA_TEST_FETCH="${NALORA_TEST_FETCH:-1}"
exec .venv/bin/python -m pytest -q "$@"
