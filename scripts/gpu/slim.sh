#!/usr/bin/env bash
# Run HERE before carry.sh: set aside what a campaign visit does not read, so that the working tree, which travels
# with every `run` call beside the asset chunks (64 MiB in all), stays small however far the campaign has come.
#   bash scripts/gpu/slim.sh SUITE TASK...   # keep results/SUITE's run records of TASK... and interrupted.jsonl (what
#                                            # the lr rule and the time and memory budgets of those cells read);
#                                            # move every other file under results/ to .slim/ (git-ignored: it
#                                            # does not travel)
#   bash scripts/gpu/slim.sh --restore       # put them back (then `git status` shows nothing moved); before
#                                            # collect.sh, whose report reads every record of the suite
# The first visit of 2026-12-02 did this by hand: the tree went from 46 MB to 10 MB, the assets from about 25 chunks
# to 7 (docs/gpu_visits.md).
set -euo pipefail
PY=${PY:-.venv/bin/python}
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.slim/' "$exclude" 2>/dev/null || echo '/.slim/' >> "$exclude"
if [ "${1:-}" = "--restore" ]; then
  [ -d .slim/results ] || { echo "slim: nothing set aside (.slim/results is missing)"; exit 0; }
  # a file that is there again (brought home since) is kept: the copy set aside is never newer
  (cd .slim && find results -type f -print0) | while IFS= read -r -d '' f; do
    mkdir -p "$(dirname "$f")"; [ -e "$f" ] || mv ".slim/$f" "$f"
  done
  rm -rf .slim; echo "slim: restored"; git status --short results | head -5
  exit 0
fi
suite=${1:?usage: slim.sh SUITE TASK... | --restore}; shift
[ $# -ge 1 ] || { echo "usage: slim.sh SUITE TASK... (the tasks this visit runs)" >&2; exit 2; }
[ -d "results/$suite/runs" ] || { echo "slim: results/$suite/runs does not exist" >&2; exit 2; }
[ ! -d .slim/results ] || { echo "slim: .slim/results exists: restore first (slim.sh --restore)" >&2; exit 2; }
$PY - "$suite" "$@" <<'PY'
import json, shutil, sys
from pathlib import Path

suite, tasks = sys.argv[1], set(sys.argv[2:])
runs = Path("results") / suite / "runs"
keep: set[Path] = set()
for rec_path in runs.glob("*.json"):
    try:
        task = json.loads(rec_path.read_text())["config"]["task"]
    except (OSError, ValueError, KeyError, TypeError):
        continue  # not a record: set aside with the rest
    if task in tasks:
        keep |= {rec_path, rec_path.with_name(rec_path.stem + ".hist.json.gz")}
keep.add(runs.parent / "interrupted.jsonl")  # the time budget reads how long stopped runs had run (budget.py)
moved = 0
for f in sorted(p for p in Path("results").rglob("*") if p.is_file()):
    if f in keep:
        continue
    dest = Path(".slim") / f
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(f), dest)
    moved += 1
print(f"slim: kept {sum(p.exists() for p in keep)} files of results/{suite}/runs ({', '.join(sorted(tasks))}); "
      f"set aside {moved} files in .slim/ (restore: bash scripts/gpu/slim.sh --restore)")
PY
