#!/usr/bin/env bash
# Reproduce the results from scratch: set up, fetch assets, run a suite, rebuild the report.
#
#   ./run_all.sh                          # `default` on a GPU machine; on a CPU-only one the `demo` suite
#                                         # (a few minutes); into results/<suite>/ (runs/, leaderboard.csv,
#                                         # tables/, plots/, index.html)
#   ./run_all.sh --suite smoke            # another suite (name in benchmarks/suites/ or a YAML path)
#   ./run_all.sh --methods lora,nalora --tasks sarcasm --seeds 0 --out results-sub --workers 4
#   ./run_all.sh --tasks my-task --include-path my_tasks/   # any registered task, plugins included
#   ./run_all.sh --models tiny-llama      # every task on other models (`nalora-bench list models`)
#   ./run_all.sh --max-minutes 9          # stop cleanly before a time limit; run again to resume
#   ./run_all.sh --backend ray [--address HOST:PORT]   # the runs as Ray tasks (a local Ray, or a cluster's)
#   ./run_all.sh --workers 10 --mps auto  # a GPU's workers share it through CUDA MPS (off by default: measured, no gain)
#   ./run_all.sh --workers 2 --stack 8    # a worker trains up to 8 runs of a cell together (other seeds and lrs)
#   ./run_all.sh --dry-run                # list the runs and the assets a fetch would download; change nothing
#
# A suite that names the distilled gated ViT `vit-s-swiglu` (e.g. `default`) builds it once on a GPU when it is not
# cached; without a GPU a random `tiny-vit-swiglu` stands in, said at the start and recorded in each run.
#
# The flags above (and --retry-failed, --no-progress, --threads N) go to `nalora-bench run`; anything else
# is an error. Finished runs are never repeated (failures caused by the machine, e.g. a missing asset, are),
# so running this again after an interruption or a repair continues.
set -euo pipefail
cd "$(dirname "$0")"

usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }
# A flag that takes a value: one clear line when the value is missing (not bash's "$2: unbound variable").
need_value() {
  if [[ $# -lt 2 || -z "$2" || "$2" == --* ]]; then
    echo "run_all.sh: $1 needs a value (see --help)" >&2; exit 2
  fi
}

SUITE="" OUT="" DRY=0 RUN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --suite) need_value "$@"; SUITE="$2"; shift 2 ;;
    --out) need_value "$@"; OUT="$2"; shift 2 ;;
    --methods|--tasks|--models|--seeds|--include-path|--workers|--max-minutes|--threads|--backend|--address|--mps|--stack) need_value "$@"; RUN_ARGS+=("$1" "$2"); shift 2 ;;
    --retry-failed|--no-progress) RUN_ARGS+=("$1"); shift ;;
    --dry-run) DRY=1; RUN_ARGS+=("$1"); shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run_all.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

# 1. Environment: the project's own setup script when there is one, else a venv with the package.
if [[ -f scripts/setup.sh ]]; then
  bash scripts/setup.sh
elif [[ ! -x .venv/bin/python ]]; then
  echo "run_all.sh: creating .venv and installing the project"
  python3 -m venv .venv
  .venv/bin/pip install -e '.[dev]'
fi
if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
BENCH=("$PY" -m benchmarks.cli)

# 2. Which suite: default on a GPU, the short demo otherwise (say which).
CPU_DEMO=0
if [[ -z "$SUITE" ]]; then
  if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    SUITE=default; echo "run_all.sh: GPU found ($("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')): running suite 'default'"
  else
    SUITE=demo CPU_DEMO=1
    echo "run_all.sh: no GPU: running suite 'demo' (a few minutes on a CPU: every result kind, numbers not meaningful)"
  fi
fi

OUT=${OUT:-results/$(basename "$SUITE" .yaml)}  # results/default, results/smoke, ... unless --out
echo "run_all.sh: results go to $OUT/"

# 3. Assets the suite needs (models + datasets of its tasks) and not yet cached; a dry run only names them.
ASSETS=$("$PY" -m benchmarks.runner.assets_needed "$SUITE" --missing "${RUN_ARGS[@]}")
if [[ $DRY -eq 1 ]]; then
  echo "run_all.sh: dry run: would fetch: ${ASSETS:-nothing (every asset is cached)}"
elif [[ -n "$ASSETS" ]]; then
  # shellcheck disable=SC2086
  "${BENCH[@]}" fetch $ASSETS
fi

# 4. Run (resumable) and rebuild leaderboard, tables and plots from the run JSONs (so `run` need not
#    tell the user to rebuild them).
set +e
NALORA_BENCH_REPORT_FOLLOWS=1 "${BENCH[@]}" run --suite "$SUITE" --out "$OUT" "${RUN_ARGS[@]}"
rc=$?
set -e
if [[ $rc -ne 0 && $rc -ne 3 ]]; then exit $rc; fi
if [[ $DRY -eq 1 ]]; then
  echo "run_all.sh: dry run: nothing trained, fetched or rewritten"
  exit 0
fi
"${BENCH[@]}" report --results "$OUT"
echo "run_all.sh: leaderboard, tables, plots and index.html rebuilt in $OUT/"
if [[ $rc -eq 3 ]]; then echo "run_all.sh: time budget reached; run the same command again to continue"; fi
if [[ $CPU_DEMO -eq 1 ]]; then
  echo "run_all.sh: that was the CPU demo; for the real grid run \`./run_all.sh --suite default\` on a GPU machine"
fi
exit $rc
