#!/usr/bin/env bash
# Run HERE (the machine with the asset cache and pip), in the repository root that the `run` tool sends.
# Fills .perf_gpu/ (ignored by git) with what the GPU commands of /work/notes/perf_gpu_plan.md carry:
#   whl/   wheels missing from the GPU image (datasets + its pure-Python needs; liger-kernel, optional)
#   cache/ a minimal asset cache: the throughput slice's datasets (socialiqa, sarcasm) + manifest
#   tok/   SmolLM2-135M's tokenizer files (the model itself is built there with random weights)
set -euo pipefail
d=.perf_gpu
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.perf_gpu/' "$exclude" 2>/dev/null || echo '/.perf_gpu/' >> "$exclude"
rm -rf "$d" && mkdir -p "$d/whl" "$d/cache/entries" "$d/tok"
PIP=${PIP:-python3 -m pip}
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$d/whl" datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0
if [ "${WITH_LIGER:-0}" = 1 ]; then
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$d/whl" liger-kernel==0.8.5
fi
C=${NALORA_BENCH_CACHE:-$HOME/.cache/nalora-bench}
for e in socialiqa sarcasm; do
  [ -d "$C/entries/$e" ] || { echo "missing $C/entries/$e: run nalora-bench fetch $e" >&2; exit 1; }
  cp -r "$C/entries/$e" "$d/cache/entries/"
done
cp "$C/manifest.json" "$C/checksums.json" "$d/cache/"
M="$C/entries/smollm2-135m/model"
for f in tokenizer.json tokenizer_config.json chat_template.jinja generation_config.json; do
  [ -f "$M/$f" ] && cp "$M/$f" "$d/tok/"
done
[ -f "$d/tok/tokenizer.json" ] || { echo "missing $M/tokenizer.json: run nalora-bench fetch smollm2-135m" >&2; exit 1; }
du -sh "$d"
