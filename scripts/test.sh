#!/usr/bin/env bash
# The test command of README.md (and of CI): set up, then run the whole test suite.
# Real-model tests fetch the small real assets they need into the asset cache (NALORA_TEST_FETCH=1), so they
# run on a fresh machine too. Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The report's browser test (tests/test_report_html.py) drives Debian's chromium through playwright; install it
# once when missing (the test skips, saying why, only when this fails).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
    { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null; } \
        || echo "test.sh: could not install chromium; the HTML browser test will skip" >&2
fi
.venv/bin/ruff check --quiet .
.venv/bin/lint-imports --no-cache --no-logo | grep -E "KEPT|BROKEN|->|not allowed" # the layer contract in pyproject.toml (docs/ARCHITECTURE.md)
export NALORA_TEST_FETCH="${NALORA_TEST_FETCH:-1}"
exec .venv/bin/python -m pytest -q "$@"
