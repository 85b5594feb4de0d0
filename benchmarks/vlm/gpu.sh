#!/usr/bin/env bash
# On the GPU machine (repository root; see the GPU plan in docs/vlm.md): `bash benchmarks/vlm/gpu.sh STEP`.
#   setup SHA256   join the staged /tmp/stage/assets.tar.part* (benchmarks/vlm/gpu_carry.sh + stage.sh),
#                  check it, unpack the asset cache to /tmp/nb, install the carried wheels, convert SmolLM2
#   build [ARGS]   distil vit-s-swiglu into that cache (ARGS go to `python -m benchmarks.vlm.distill`);
#                  $OUT gets its manifest record (provenance + quality) and the entry as 15 MiB tar parts
#   slice [MIN]    run suite vision-tower for MIN minutes (default 8.5; resumable), report, $OUT gets a .tgz
set -euo pipefail
export PYTHONPATH=$PWD:/tmp/pylib NALORA_BENCH_CACHE=/tmp/nb/cache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
step=${1:?usage: gpu.sh setup SHA256 | build [ARGS] | slice [MINUTES]}
shift
case "$step" in
  setup)
    sum=${1:?setup needs the sha256 that stage.sh printed}
    if [ ! -f /tmp/pylib/.ok ]; then
      pip install -q --no-deps --target /tmp/pylib .vision_gpu/whl/*.whl && touch /tmp/pylib/.ok
    fi
    if [ ! -d /tmp/nb/cache ]; then
      cat /tmp/stage/assets.tar.part* > /tmp/assets.tar
      echo "$sum  /tmp/assets.tar" | sha256sum -c
      mkdir -p /tmp/nb && tar -xf /tmp/assets.tar -C /tmp/nb && rm /tmp/assets.tar
    fi
    python3 -m benchmarks.cli fetch smollm2-135m --source-dir /tmp/nb/src
    nvidia-smi -L
    ;;
  build)
    python3 -m benchmarks.vlm.distill --publish "$@" 2>&1 | tee "$OUT/build.log"
    python3 -c "import json,sys; m=json.load(open(sys.argv[1])); json.dump(m['vit-s-swiglu'], open(sys.argv[2], 'w'), indent=1)" \
      "$NALORA_BENCH_CACHE/manifest.json" "$OUT/vit-s-swiglu.record.json"
    tar -cf /tmp/vit-s-swiglu.tar -C "$NALORA_BENCH_CACHE" entries/vit-s-swiglu
    split -b 15M -d -a 1 /tmp/vit-s-swiglu.tar "$OUT/vit-s-swiglu.tar.part"
    python3 -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))['info']['quality']['per_source'], indent=1))" \
      "$OUT/vit-s-swiglu.record.json"
    ;;
  slice)
    python3 -m benchmarks.cli run --suite vision-tower --workers 9 --max-minutes "${1:-8.5}" --no-progress \
      --out results/vision-tower
    python3 -m benchmarks.cli report --results results/vision-tower || true
    tar -czf "$OUT/vision-tower.tgz" results/vision-tower
    ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
