#!/usr/bin/env bash
# Run HERE after a GPU visit: bring a suite's results home from the newest archive the visit returned.
#   bash scripts/gpu/collect.sh NAME ARCHIVE [--readme README.md]
# ARCHIVE: the NAME.tgz of the visit's last `visit.sh suite NAME ...` call (each call's archive holds the whole
# /tmp/res/NAME). New run records are copied without touching existing ones (a record of the same run id is the
# same run), the GPU-time ledger is merged line by line (invocations.jsonl: each line once, in order), and the
# report is rebuilt (report ARGS, e.g. --readme README.md, are passed on).
set -euo pipefail
name=${1:?usage: collect.sh NAME ARCHIVE [REPORT ARGS]}; archive=${2:?usage: collect.sh NAME ARCHIVE [REPORT ARGS]}; shift 2
PY=${PY:-.venv/bin/python}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
tar xzf "$archive" -C "$tmp"
dest=results/$name; mkdir -p "$dest/runs"
before=$(ls "$dest/runs" | grep -c "json$" || true)
cp -n "$tmp/$name/runs/"* "$dest/runs/" 2>/dev/null || true
after=$(ls "$dest/runs" | grep -c "json$" || true)
if [ -f "$tmp/$name/invocations.jsonl" ]; then
  # the first collect into a folder has no ledger here yet
  { cat "$dest/invocations.jsonl" 2>/dev/null || true; cat "$tmp/$name/invocations.jsonl"; } | awk '!seen[$0]++' > "$tmp/ledger"
  mv "$tmp/ledger" "$dest/invocations.jsonl"
fi
echo "collect: $name: $((after - before)) new run records ($after in all)"
$PY -m benchmarks.cli report --results "$dest" "$@"
