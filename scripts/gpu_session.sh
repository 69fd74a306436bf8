#!/usr/bin/env bash
# One device call's worth of GPU work: install the wheels the image lacks, then run the stages named on the
# command line, each logged to $OUT/<stage>.log (what comes back from the device). Usage:
#   bash scripts/gpu_session.sh tests layer offline9b offline35b compile ...
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -m pip install -q --no-index --find-links .wheels fla-core fastapi uvicorn pydantic prometheus_client \
  pytest-timeout > "$OUT/pip.log" 2>&1 || { echo "pip install failed"; tail -5 "$OUT/pip.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
# The 35B-A3B shape is ~69 GB of bf16 weights: all 40 layers on an H200, fewer on an 80 GB card (said in the log).
mem_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
if [ "${mem_mib:-0}" -lt 100000 ] && [ -z "${LAYERS35:-}" ]; then LAYERS35=24; echo "80 GB card: 35B-A3B shape with 24 layers"; fi
run() {  # run STAGE COMMAND...: log, time, never stop the session
  local stage=$1; shift
  echo "=== $stage: $*" | tee -a "$OUT/summary.txt"
  local t0=$SECONDS
  timeout "${STAGE_TIMEOUT:-300}" "$@" > "$OUT/$stage.log" 2>&1; local rc=$?
  echo "=== $stage rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  tail -n ${TAIL:-25} "$OUT/$stage.log"
}
for stage in "$@"; do
  case $stage in
    tests) run tests python3 -m pytest -q -m gpu -s -p no:cacheprovider --timeout=600 tests ;;
    kernels) run kernels python3 -m pytest -q -m gpu -s -p no:cacheprovider --timeout=600 \
               tests/test_gdn_kernels_gpu.py tests/test_paged_attention_gpu.py tests/test_fused_moe_gpu.py ;;
    engine) run engine python3 -m pytest -q -m gpu -s -p no:cacheprovider --timeout=600 tests/test_engine_gpu.py ;;
    layer) run layer35 python3 -m deltaserve.cli bench layer --preset qwen3.5-35b-a3b --layers 36 --output "$OUT/layer35.json"
           run layer122 python3 -m deltaserve.cli bench layer --preset qwen3.5-122b-a10b --layers 36 --output "$OUT/layer122.json" ;;
    offline9b) run offline9b python3 -m deltaserve.cli bench offline --preset qwen3.5-9b --batch 1,2,4,8,16 --output-len 128 \
                 --max-num-seqs 16 --output "$OUT/offline9b.json" ;;
    offline35b) run offline35b python3 -m deltaserve.cli bench offline --preset qwen3.5-35b-a3b ${LAYERS35:+--layers $LAYERS35} \
                  --batch 1,2,4,8,16 --output-len 128 --max-num-seqs 16 --output "$OUT/offline35b.json" ;;
    offline35b-compile) run offline35b-compile python3 -m deltaserve.cli bench offline --preset qwen3.5-35b-a3b ${LAYERS35:+--layers $LAYERS35} \
                  --compile --batch ${BATCH:-1,4,16} --output-len 64 --max-num-seqs 16 --output "$OUT/offline35b-compile.json" ;;
    offline9b-compile) run offline9b-compile python3 -m deltaserve.cli bench offline --preset qwen3.5-9b --compile \
                  --batch ${BATCH:-1,4,16} --output-len 64 --max-num-seqs 16 --output "$OUT/offline9b-compile.json" ;;
    engine-fix) run engine-fix python3 -m pytest -q -m gpu -s -p no:cacheprovider --timeout=600 \
                  tests/test_engine_gpu.py -k "moe_and_next or transformers" ;;
    *) echo "unknown stage $stage" ;;
  esac
done
