#!/usr/bin/env bash
# Run HERE after a GPU visit: bring a suite's results home from the newest archive the visit returned.
#   bash scripts/gpu/collect.sh NAME ARCHIVE [--readme README.md]
# ARCHIVE: the NAME.tgz of the visit's last `visit.sh suite NAME ...` call (each call's archive holds the whole
# /tmp/res/NAME). New run records are copied, and a record here is replaced only by a later run of its id (below),
# the GPU-time ledger and the stopped runs' lines are merged (invocations.jsonl, interrupted.jsonl), and the
# report is rebuilt (report ARGS, e.g. --readme README.md, are passed on; REPORT=0 skips it).
set -euo pipefail
name=${1:?usage: collect.sh NAME ARCHIVE [REPORT ARGS]}; archive=${2:?usage: collect.sh NAME ARCHIVE [REPORT ARGS]}; shift 2
PY=${PY:-.venv/bin/python}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
tar xzf "$archive" -C "$tmp"
dest=results/$name; mkdir -p "$dest/runs"
# A record whose run id is here already is the same run, unless the visit ran it again (--retry-failed after a
# failure, an interrupted run redone): then the one that finished later replaces it, with its side file. (A plain
# no-clobber copy kept the 25 out-of-memory failures of 2026-12-02 after their reruns had finished ok.)
$PY - "$tmp/$name/runs" "$dest/runs" <<'PY'
import json, os, shutil, sys
from pathlib import Path

src, dst = Path(sys.argv[1]), Path(sys.argv[2])

def finished(path: Path) -> str:
    try:
        return str((json.loads(path.read_text()).get("provenance") or {}).get("finished_at") or "")
    except (OSError, ValueError):
        return ""

new = replaced = 0
for rec in sorted(src.glob("*.json")) if src.is_dir() else []:
    here = dst / rec.name
    if here.exists() and finished(rec) <= finished(here):
        continue
    new, replaced = new + (not here.exists()), replaced + here.exists()
    side = rec.with_name(rec.stem + ".hist.json.gz")
    for f in (side, rec):  # the record last: it is what marks the run done; each file whole or not at all
        if f.exists():
            shutil.copy2(f, dst / (f.name + ".collect-tmp"))
            os.replace(dst / (f.name + ".collect-tmp"), dst / f.name)
        else:
            (dst / f.name).unlink(missing_ok=True)  # the replaced record's side file is not the new one's
total = sum(1 for _ in dst.glob("*.json"))
print(f"collect: {dst.parent.name}: {new} new run records, {replaced} replaced by a later run of the same id "
      f"({total} in all)")
PY
# the GPU-time ledger, and the runs the time budget stopped (budget.py): each line once, in order (the first
# collect into a folder has neither here yet)
for f in invocations.jsonl interrupted.jsonl; do
  [ -f "$tmp/$name/$f" ] || continue
  { cat "$dest/$f" 2>/dev/null || true; cat "$tmp/$name/$f"; } | awk '!seen[$0]++' > "$tmp/merged"
  mv "$tmp/merged" "$dest/$f"
done
[ "${REPORT:-1}" = 0 ] || $PY -m benchmarks.cli report --results "$dest" "$@"  # REPORT=0: copy only
