#!/usr/bin/env bash
# One device call's worth of GPU work: install the wheels the image lacks, then run the stages named on the
# command line, each logged to $LOGS/<stage>.log; the `pack` stage tars $LOGS into $OUT/logs.tgz (the
# device returns at most 8 files). Two lanes run side by side on a two-GPU machine, then both GPUs:
#   bash scripts/gpu_session.sh setup
#   CUDA_VISIBLE_DEVICES=0 bash scripts/gpu_session.sh kernels offline9b & \
#   CUDA_VISIBLE_DEVICES=1 bash scripts/gpu_session.sh engine profile35b; wait
#   bash scripts/gpu_session.sh tp-make tp-compare tp-offline35b pack
set -uo pipefail
OUT=${OUT:-/tmp/out}; LOGS=${LOGS:-/tmp/gs-logs}; mkdir -p "$OUT" "$LOGS"
# The device's copy of the tree has no usable git history: the caller leaves the commit in .wheels/COMMIT.
[ -f .wheels/COMMIT ] && export DELTASERVE_COMMIT="$(cat .wheels/COMMIT)"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ "${1:-}" = setup ]; then
  python3 -m pip install -q --no-index --find-links .wheels fla-core fastapi uvicorn pydantic prometheus_client \
    pytest-timeout > "$LOGS/pip.log" 2>&1 || { echo "pip install failed"; tail -5 "$LOGS/pip.log"; }
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOGS/card.txt"
  shift
fi
# The 35B-A3B shape is ~69 GB of bf16 weights: all 40 layers on an H200, fewer on an 80 GB card (said in the log).
mem_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
if [ "${mem_mib:-0}" -lt 100000 ] && [ -z "${LAYERS35:-}" ]; then LAYERS35=24; echo "80 GB card: 35B-A3B shape with 24 layers"; fi
# 122B-A10B is ~5 GB a layer: at tp=2, 40 of its 48 layers on two H200s, 24 on two H100s.
if [ -z "${LAYERS122:-}" ]; then if [ "${mem_mib:-0}" -lt 100000 ]; then LAYERS122=24; else LAYERS122=40; fi; fi
run() {  # run STAGE COMMAND...: log, time, never stop the session
  local stage=$1; shift
  echo "=== $stage (GPU ${CUDA_VISIBLE_DEVICES:-all}): $*" | tee -a "$LOGS/summary.txt"
  local t0=$SECONDS
  timeout "${STAGE_TIMEOUT:-300}" "$@" > "$LOGS/$stage.log" 2>&1; local rc=$?
  echo "=== $stage rc=$rc in $((SECONDS - t0)) s" | tee -a "$LOGS/summary.txt"
  tail -n ${TAIL:-25} "$LOGS/$stage.log" > "$LOGS/$stage.tail"
}
flag_ab() {  # flag_ab NAME FLAG: --no-FLAG and --FLAG interleaved twice, 9B then 35B-A3B (N=1, 4, 16)
  local name=$1 flag=$2 preset rep f
  for preset in qwen3.5-9b qwen3.5-35b-a3b; do
    for rep in 1 2; do
      for f in "--no-$flag" "--$flag"; do
        run "$name-$preset-$rep$f" python3 -m deltaserve.cli bench offline --preset "$preset" "$f" \
          $([ "$preset" = qwen3.5-35b-a3b ] && echo ${LAYERS35:+--layers $LAYERS35}) --batch 1,4,16 \
          --output-len 128 --max-num-seqs 16 --output "$LOGS/$name-$preset-$rep$f.json"
      done
    done
  done
}
for stage in "$@"; do
  case $stage in
    tests) run tests python3 -m pytest -q -m gpu -s -p no:cacheprovider --timeout=600 tests ;;
    kernels) run kernels python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=600 \
               tests/test_gdn_kernels_gpu.py tests/test_paged_attention_gpu.py tests/test_fused_moe_gpu.py \
               tests/test_norms.py ${EXTRA_KERNEL_TESTS:-} ;;
    kernels-new) run kernels-new python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=600 \
                   tests/test_fused_moe_gpu.py tests/test_paged_attention_gpu.py tests/test_qk_norm_rope_gpu.py \
                   tests/test_skinny_gemm.py ;;
    engine-hf) run engine-hf python3 -m pytest -q -m gpu -s -p no:cacheprovider --timeout=600 tests/test_engine_gpu.py \
                 -k transformers ;;
    gpu-next) # the GPU tests of what changed since the last device session: PDL and the skinny dense GEMMs in
              # the engine (tokens and logprobs against the plain path)
      run gpu-next python3 -m pytest -q -m gpu -s -p no:cacheprovider --timeout=600 tests/test_skinny_gemm.py \
        tests/test_fused_moe_gpu.py tests/test_engine_gpu.py \
        -k "test_skinny_gemm or fused_moe_gpu or pdl_option or pdl_late or skinny_dense_matches"
      # the kernel tests shared with the interpreter (no gpu marker) that cover --pdl-preload's variants
      run gpu-next-kernels python3 -m pytest -q -p no:cacheprovider --timeout=600 tests/test_gdn_kernels.py \
        tests/test_fused_moe.py -k "preload or decode_fused_matches" ;;
    moe-pdl) run moe-pdl python3 scripts/bench_moe.py --pdl-ab --T 1,4,16 ;;
    pdl-ab) # programmatic dependent launch off and on, interleaved twice, 35B-A3B then 9B (N=1, 4, 16)
      for rep in 1 2; do
        for flag in --no-pdl --pdl; do
          run "pdl-ab-35b-$rep$flag" python3 -m deltaserve.cli bench offline --preset qwen3.5-35b-a3b \
            ${LAYERS35:+--layers $LAYERS35} "$flag" --batch 1,4,16 --output-len 128 --max-num-seqs 16 \
            --output "$LOGS/pdl-ab-35b-$rep$flag.json"
        done
      done
      for rep in 1 2; do
        for flag in --no-pdl --pdl; do
          run "pdl-ab-9b-$rep$flag" python3 -m deltaserve.cli bench offline --preset qwen3.5-9b "$flag" --batch 1,4,16 \
            --output-len 128 --max-num-seqs 16 --output "$LOGS/pdl-ab-9b-$rep$flag.json"
        done
      done ;;
    router-ab) # the MoE router: cuBLAS GEMM + top-k launch against the one-launch split kernel, interleaved twice
      for rep in 1 2; do
        for r in gemm kernel; do
          run "router-ab-$rep-$r" python3 -m deltaserve.cli bench offline --preset qwen3.5-35b-a3b \
            ${LAYERS35:+--layers $LAYERS35} --moe-router "$r" --batch 1,4,16 --output-len 128 --max-num-seqs 16 \
            --output "$LOGS/router-ab-$rep-$r.json"
        done
      done ;;
    overlap-ab) # the engine as is against OVERLAP_FLAGS (e.g. "--skinny-late-trigger --skinny-prefetch 128"),
                # interleaved REPS times, 35B-A3B then 9B at N = 1 and 16
      for preset in ${PRESETS:-qwen3.5-35b-a3b qwen3.5-9b}; do
        for rep in $(seq "${REPS:-2}"); do
          for v in base overlap; do
            run "overlap-ab-$preset-$rep-$v" python3 -m deltaserve.cli bench offline --preset "$preset" \
              $([ "$preset" = qwen3.5-35b-a3b ] && echo ${LAYERS35:+--layers $LAYERS35}) \
              $([ "$v" = overlap ] && echo ${OVERLAP_FLAGS:?}) --batch 1,16 --output-len 128 --max-num-seqs 16 \
              --output "$LOGS/overlap-ab-$preset-$rep-$v.json"
          done
        done
      done ;;
    dense-ab) flag_ab dense-ab skinny-dense ;;  # the dense MLP and the MoE router GEMM on the skinny GEMM
    offline9b-x3) for rep in 1 2 3; do run "offline9b-$rep" python3 -m deltaserve.cli bench offline --preset qwen3.5-9b \
                    --batch 1,2,4,8,16 --output-len 128 --max-num-seqs 16 --output "$LOGS/offline9b-$rep.json"; done ;;
    gemv-new) run gemv-new python3 scripts/bench_gemv.py --shapes "MLP,qkv,router" --output "$LOGS/gemv-new.json" ;;
    profile35b-pdl) run profile35b-pdl python3 -m deltaserve.cli bench profile --preset qwen3.5-35b-a3b \
                  ${LAYERS35:+--layers $LAYERS35} --pdl --batch 1 --output "$LOGS/profile35b-pdl.json" ;;
    out-ab) # the skinny out_proj on and off, interleaved twice (35B-A3B, N=1 and 16)
      for rep in 1 2; do
        for flag in --no-skinny-out-proj --skinny-out-proj; do
          run "out-ab-$rep$flag" python3 -m deltaserve.cli bench offline --preset qwen3.5-35b-a3b ${LAYERS35:+--layers $LAYERS35} \
            "$flag" --batch 1,16 --output-len 128 --max-num-seqs 16 --output "$LOGS/out-ab-$rep$flag.json"
        done
      done ;;
    offline35b-40) # all 40 layers of the 35B-A3B shape, also on an 80 GB card (64.3 GiB of weights)
      run offline35b-40 python3 -m deltaserve.cli bench offline --preset qwen3.5-35b-a3b --layers 40 \
        --gpu-memory-utilization 0.96 --batch 1,16 --output-len 128 --max-num-seqs 16 --output "$LOGS/offline35b-40.json" ;;
    offline35b-cublas-out) run offline35b-cublas-out python3 -m deltaserve.cli bench offline --preset qwen3.5-35b-a3b \
                  ${LAYERS35:+--layers $LAYERS35} --no-skinny-out-proj --batch 1,16 --output-len 128 --max-num-seqs 16 \
                  --output "$LOGS/offline35b-cublas-out.json" ;;
    offline9b-cublas-out) run offline9b-cublas-out python3 -m deltaserve.cli bench offline --preset qwen3.5-9b \
                  --no-skinny-out-proj --batch 1,16 --output-len 128 --max-num-seqs 16 --output "$LOGS/offline9b-cublas-out.json" ;;
    kernels-spec) run kernels-spec python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=600 tests/test_skinny_gemm.py \
                    tests/test_paged_attention_gpu.py tests/test_gdn_kernels_gpu.py::test_conv_prefill_real_shapes \
                    tests/test_fused_moe_gpu.py -k "not bench and not router and not matches_reference" ;;
    kernels-rest) run kernels-rest python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=600 \
                    tests/test_qk_norm_rope_gpu.py tests/test_skinny_gemm.py ;;
    engine) run engine python3 -m pytest -q -m gpu -s -p no:cacheprovider --timeout=600 tests/test_engine_gpu.py ;;
    profile35b) run profile35b python3 -m deltaserve.cli bench profile --preset qwen3.5-35b-a3b ${LAYERS35:+--layers $LAYERS35} \
                  --batch 1 --output "$LOGS/profile35b.json" ;;
    profile35b-prefill) run profile35b-prefill python3 -m deltaserve.cli bench profile --preset qwen3.5-35b-a3b \
                  ${LAYERS35:+--layers $LAYERS35} --prefill-tokens 30 --steps 5 --output "$LOGS/profile35b-prefill.json" ;;
    profile35b-host) run profile35b-host python3 -m deltaserve.cli bench profile --preset qwen3.5-35b-a3b \
                  ${LAYERS35:+--layers $LAYERS35} --prefill-tokens 30 --steps 5 --cprofile 45 ;;
    compile9b40-*) # compile9b40-<opaque|string>: --compile on 40 layers of the 9B's widths (fits an 80 GB card)
      TORCH_LOGS=recompiles run "$stage" python3 -m deltaserve.cli bench offline --preset qwen3.5-9b --layers 40 \
        --compile --layer-arg "${stage#compile9b40-}" --batch 1 --output-len 16 --max-num-seqs 4 --cuda-graph-sizes 1 ;;
    profile9b) run profile9b python3 -m deltaserve.cli bench profile --preset qwen3.5-9b --batch 1 --output "$LOGS/profile9b.json" ;;
    compile35b-*) # compile35b-<opaque|string>-<layers>: start-up time and compiled graphs at that depth
      IFS=- read -r _ mode nl <<< "$stage"
      run "$stage" python3 -m deltaserve.cli bench offline --preset qwen3.5-35b-a3b --layers "$nl" --compile \
        --layer-arg "$mode" --batch 1 --output-len 16 --max-num-seqs 4 --cuda-graph-sizes 1 ;;
    tp-make) run tp-make python3 -m deltaserve.cli make-model --preset qwen3.5-35b-a3b --layers 4 --out /tmp/m35-l4 ;;
    tp-compare) run tp-compare python3 scripts/tp_compare.py /tmp/m35-l4 --tp 2 --prompts 8 --max-tokens 32 \
                  --output "$LOGS/tp-compare.json" ;;
    tp-offline35b) run tp-offline35b python3 -m deltaserve.cli bench offline --preset qwen3.5-35b-a3b \
                     ${LAYERS35:+--layers $LAYERS35} --tensor-parallel-size 2 --batch 1,16 --output-len 128 \
                     --max-num-seqs 16 --output "$LOGS/tp-offline35b.json" ;;
    tp-offline122b) run tp-offline122b python3 -m deltaserve.cli bench offline --preset qwen3.5-122b-a10b \
                      --layers "$LAYERS122" --tensor-parallel-size 2 --batch 1,16 --output-len 128 \
                      --max-num-seqs 16 --output "$LOGS/tp-offline122b.json" ;;
    cfg35) run cfg35 python3 -m deltaserve.cli make-model --preset qwen3.5-35b-a3b ${LAYERS35:+--layers $LAYERS35} \
             --no-weights --out /tmp/m35cfg ;;
    ab-serial|ab-dual)  # <strategy> vs fused through live servers, interleaved trials, CIs + equivalence
      run "$stage" python3 -m deltaserve.cli bench ab /tmp/m35cfg --a "--load-format dummy --max-num-seqs 16 --inproj ${stage#ab-}" \
        --b "--load-format dummy --max-num-seqs 16 --inproj fused" --trials ${TRIALS:-3} --concurrency 1,2,4,8,16 --max-tokens ${AB_TOKENS:-256} \
        --repeats ${AB_REPEATS:-2} --warmups 1 --ignore-eos --temperature 0 --equiv-prompts 5 \
        --time-budget ${AB_BUDGET:-$(( ${STAGE_TIMEOUT:-300} - 30 ))} --output "$LOGS/$stage" ;;
    ab-paired-serial|ab-paired-dual)  # <strategy> vs fused, --paired: both servers on this GPU at once (the 35B-A3B
      # shape with PAIRED_LAYERS layers, so that it fits twice in 0.45 of the card each: 24 layers on an H200,
      # 16 on an 80 GB card, where 24 layers' ~39 GiB of weights exceed 0.45 x 79 GiB), back-to-back sweep pairs
      paired=${PAIRED_LAYERS:-$([ "${mem_mib:-0}" -lt 100000 ] && echo 16 || echo 24)}
      run "$stage-cfg" python3 -m deltaserve.cli make-model --preset qwen3.5-35b-a3b --layers $paired \
        --no-weights --out /tmp/m35paired
      serve="--load-format dummy --max-num-seqs 16 --gpu-memory-utilization 0.45"
      run "$stage" python3 -m deltaserve.cli bench ab /tmp/m35paired --paired --a "$serve --inproj ${stage#ab-paired-}" \
        --b "$serve --inproj fused" --trials ${TRIALS:-8} --concurrency ${AB_CONC:-1,2,4,8,16} --max-tokens ${AB_TOKENS:-256} \
        --repeats ${AB_REPEATS:-2} --warmups 1 --ignore-eos --temperature 0 --equiv-prompts 3 --equiv-max-tokens 128 \
        --time-budget ${AB_BUDGET:-$(( ${STAGE_TIMEOUT:-300} - 30 ))} --output "$LOGS/$stage" ;;
    engine-new) run engine-new python3 -m pytest -q -m gpu -s -p no:cacheprovider --timeout=600 tests/test_engine_gpu.py \
                  -k "skinny_dense or pdl or prefill_graphs or batched" ;;
    startup35b) run startup35b python3 -m deltaserve.cli bench startup /tmp/m35cfg --load-format dummy --cold --runs 1 \
                  --log-dir "$LOGS/startup35b-servers" --output "$LOGS/startup35b.json" ;;
    ttft35b)  # one server, 30 sequential streamed requests of ~30-token prompts (chat template included);
              # SERVE_FLAGS="--no-prefill-cuda-graphs" for the eager short prefill
      python3 -m deltaserve.cli serve /tmp/m35cfg --load-format dummy --port 8123 ${SERVE_FLAGS:-} > "$LOGS/ttft-server.log" 2>&1 &
      spid=$!
      for _ in $(seq 300); do python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8123/health')" 2>/dev/null && break; sleep 0.5; done
      run ttft35b python3 -m deltaserve.cli bench ttft --url http://127.0.0.1:8123 --output "$LOGS/ttft35b.json"
      kill -TERM $spid; wait $spid ;;
    fla-configs)  # record fla's autotune picks on this card (deltaserve/configs/fla/<GPU>/), brought back in the logs
      run fla-configs python3 scripts/dump_fla_configs.py --preset qwen3.5-35b-a3b ${LAYERS35:+--layers $LAYERS35}
      [ -d deltaserve/configs/fla ] && mkdir -p "$LOGS/fla-configs" && cp -r deltaserve/configs/fla/. "$LOGS/fla-configs/" ;;
    cold-profile) run cold-profile python3 scripts/cold_start_profile.py --preset qwen3.5-35b-a3b ${LAYERS35:+--layers $LAYERS35} \
                    --output "$LOGS/cold-profile.json" ;;
    gdn-vs-fla) run gdn-vs-fla python3 scripts/bench_gdn_decode.py --output "$LOGS/gdn-vs-fla.json" ;;
    moe) run moe python3 scripts/bench_moe.py ${MOE_SWEEP:+--sweep} ;;
    gemv) run gemv python3 scripts/bench_gemv.py --output "$LOGS/gemv.json" ;;
    skinny) run skinny python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=600 tests/test_skinny_gemm.py ;;
    pack) tar czf "$OUT/logs.tgz" -C "$LOGS" . && cp "$LOGS/summary.txt" "$OUT/"
          for f in "$LOGS"/*.tail; do echo "--- ${f##*/}"; cat "$f"; done ;;
    gemv-inproj64) run gemv-inproj64 python3 scripts/bench_gemv.py --shapes "GDN in_proj" --m 32,64 --wide --pdl \
                     --output "$LOGS/gemv-inproj64.json" ;;
    gemv-chain) # PDL off / on / late trigger / L2 weight prefetch before the wait, in chains of 24 GEMMs
      run gemv-chain python3 scripts/bench_gemv.py --chain-ab --m "${CHAIN_M:-1,16}" ${CHAIN_SHAPES:+--shapes "$CHAIN_SHAPES"} \
        --output "$LOGS/gemv-chain.json" ;;
    gemv-occ) run gemv-occ python3 scripts/bench_gemv.py --occupancy --m 1,16,32,64 --output "$LOGS/gemv-occ.json" ;;
    gemv-late35) run gemv-late35 python3 scripts/bench_gemv.py --shapes "35B-A3B GDN in_proj" --m 16,32,64 --wide --pdl \
                   --late --output "$LOGS/gemv-late35.json" ;;
    gemv-chain-norm) # the same, with our RMSNorm kernel before every GEMM (the engine's order for the in_proj)
      run gemv-chain-norm python3 scripts/bench_gemv.py --chain-ab --with-norm --m 1 --shapes "GDN in_proj,GDN out_proj" \
        --output "$LOGS/gemv-chain-norm.json" ;;
    gemv-late) # the in_proj tile sweep with every tile under both PDL triggers
      run gemv-late python3 scripts/bench_gemv.py --shapes "35B-A3B GDN in_proj,122B" --m 1,16,32,64 --wide --pdl --late \
        --output "$LOGS/gemv-late.json" ;;
    gemv-swap) run gemv-swap python3 scripts/bench_gemv.py --shapes "35B-A3B GDN in_proj" --m 16,32,64 --pdl --late --swap \
                 --output "$LOGS/gemv-swap.json" ;;
    gemv-swap-all) run gemv-swap-all python3 scripts/bench_gemv.py --shapes "9B GDN in_proj,122B" --m 32 --pdl --late \
                     --swap --output "$LOGS/gemv-swap-all.json" ;;
    gemv-m64) # every tile family at 64 tokens on the in_proj shapes: plain and 128-row (--wide), then swapped
      run gemv-m64 python3 scripts/bench_gemv.py --shapes "${GEMV_SHAPES:-35B-A3B GDN in_proj}" --m 64 --wide --pdl \
        --late --output "$LOGS/gemv-m64.json"
      run gemv-m64-swap python3 scripts/bench_gemv.py --shapes "${GEMV_SHAPES:-35B-A3B GDN in_proj}" --m 64 --pdl \
        --late --swap --output "$LOGS/gemv-m64-swap.json" ;;
    gemv-group) # the grouped tiles (several row tiles per program, one load of the tokens) on the in_proj shapes
      run gemv-group python3 scripts/bench_gemv.py --shapes "${GEMV_SHAPES:-35B-A3B GDN in_proj,9B GDN in_proj,122B}" \
        --m "${GROUP_M:-16,32,64}" --pdl --group --output "$LOGS/gemv-group.json" ;;
    gemv-overlap) # the next GEMM's weight stream under this one's drain: 2-stage grouped tiles, trigger before the end
      run gemv-overlap python3 scripts/bench_gemv.py --shapes "${GEMV_SHAPES:-35B-A3B GDN in_proj}" --m "${OVERLAP_M:-64,32,16}" \
        --pdl --overlap --output "$LOGS/gemv-overlap.json" ;;
    gemv-persistent) # persistent tiles (one or two programs per SM looping over row tiles) against the picked tile
      run gemv-persistent python3 scripts/bench_gemv.py --shapes "${GEMV_SHAPES:-35B-A3B GDN in_proj}" \
        --m "${PERSISTENT_M:-64,32,16,1}" --pdl --persistent --output "$LOGS/gemv-persistent.json" ;;
    gemv-tma) # TMA tiles (bulk tensor copies instead of cp.async) against the picked tile, with and without TMA
      run gemv-tma python3 scripts/bench_gemv.py --shapes "${GEMV_SHAPES:-35B-A3B GDN in_proj,122B}" \
        --m "${TMA_M:-64,32,16,1}" --pdl --tma --output "$LOGS/gemv-tma.json" ;;
    layer35-tiles) # bench layer on the 35B-A3B shape with a sweep's best tiles (TILES, default gemv-persistent's)
                   # beside pick_config's (column gemv*)
      run layer35-tiles python3 -m deltaserve.cli bench layer --preset qwen3.5-35b-a3b --layers 36 \
        --m "${PERSISTENT_M:-64,32,16,1}" --pdl --gemv-tiles "$LOGS/${TILES:-gemv-persistent}.json" \
        --output "$LOGS/layer35-tiles.json" ;;
    persistent-tests) run persistent-tests python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=300 \
                        tests/test_skinny_gemm.py -k "persistent or dependent_chain" ;;
    tma-tests) run tma-tests python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=300 \
                 tests/test_skinny_gemm.py -k "tma or dependent_chain" ;;
    copy-fit) run copy-fit python3 scripts/bench_gemv.py --copy-fit --output "$LOGS/copy-fit.json" ;;
    gemv-fit) # the per-launch constant and the streaming rate of the picked tiles, per M (K = 512 ... 8192)
      run gemv-fit python3 scripts/bench_gemv.py --fit-k --pdl --m "${FIT_M:-1,16,32,64}" --output "$LOGS/gemv-fit.json" ;;
    engine-pdl) run engine-pdl python3 -m pytest -q -m gpu -s -p no:cacheprovider --timeout=600 tests/test_engine_gpu.py \
                  -k "${ENGINE_PDL_K:-pdl_option or pdl_late}" ;;
    step-ab-*) # step-ab-<preset>: STEP_A vs STEP_B (default serial vs fused; STEP_A_FLAGS / STEP_B_FLAGS: a side's
               # own kernel options) on the whole decode step, interleaved in one process
      preset=${stage#step-ab-}
      run "$stage" python3 -m deltaserve.cli bench step-ab --preset "$preset" \
        $([ "$preset" = qwen3.5-35b-a3b ] && echo ${LAYERS35:+--layers $LAYERS35}) --a "${STEP_A:-serial}" \
        --b "${STEP_B:-fused}" --a-flags="${STEP_A_FLAGS:-}" --b-flags="${STEP_B_FLAGS:-}" --batch "${STEP_BATCH:-1,2,4,8,16}" --trials "${STEP_TRIALS:-10}" \
        --replays "${STEP_REPLAYS:-10}" --output "$LOGS/$stage.json" ;;
    code-ab-*) # code-ab-<preset>: this tree against the package in .wheels/old (the commit before a change; the
               # caller exports it: git archive <commit> deltaserve | tar -x -C .wheels/old), in alternating
               # processes, CODE_AB_ROUNDS pairs. CODE_AB_CMD: the deltaserve.cli arguments to run (default:
               # bench offline for the preset); @OUT@ in it becomes this run's JSON path
      preset=${stage#code-ab-}
      layers=$([ "$preset" = qwen3.5-35b-a3b ] && echo ${LAYERS35:+--layers $LAYERS35})
      cmd=${CODE_AB_CMD:-bench offline --preset $preset $layers --batch ${AB_BATCH:-1,16} --output-len ${AB_LEN:-128} \
--repeats ${AB_REPEATS:-2} --max-num-seqs 16 --output @OUT@}
      for r in $(seq 1 "${CODE_AB_ROUNDS:-2}"); do
        for side in old new; do
          src=$PWD; [ $side = old ] && src=$PWD/.wheels/old
          # shellcheck disable=SC2086 # the command's words split on purpose
          run "$stage-$side-$r" env --chdir="$src" PYTHONPATH="$src" python3 -m deltaserve.cli \
            ${cmd//@OUT@/$LOGS/$stage-$side-$r.json}
        done
      done ;;
    async-tests) # the engine and the server (its loop thread, the default device) on the GPU
                 run async-tests python3 -m pytest -q -m gpu -s -p no:cacheprovider --timeout=600 \
                   tests/test_engine_gpu.py tests/test_server_gpu.py \
                   -k "${ASYNC_K:-async or batched_greedy or transformers or server}" ;;
    async-ab-*) # async-ab-<preset>: bench offline with async scheduling off and on, interleaved in one process
                # (OFFLINE_FLAGS: extra engine flags, e.g. --gpu-memory-utilization 0.96 for 40 layers on 80 GB)
      preset=${stage#async-ab-}
      run "$stage" python3 -m deltaserve.cli bench offline --preset "$preset" \
        $([ "$preset" = qwen3.5-35b-a3b ] && echo ${LAYERS35:+--layers $LAYERS35}) --batch "${AB_BATCH:-1,4,16}" \
        --output-len "${AB_LEN:-128}" --repeats "${AB_REPEATS:-4}" --max-num-seqs 16 --async-ab ${OFFLINE_FLAGS:-} \
        --output "$LOGS/$stage.json" ;;
    tests-late) run tests-late python3 -m pytest -q -m gpu -s -p no:cacheprovider --timeout=600 tests/test_engine_gpu.py \
                  -k pdl_late ;;
    gpu-skinny) run gpu-skinny python3 -m pytest -q -m gpu -p no:cacheprovider --timeout=600 tests/test_skinny_gemm.py ;;
    gemv-pdl) run gemv-pdl python3 scripts/bench_gemv.py --pdl-ab --m 1,16 --output "$LOGS/gemv-pdl.json" ;;
    gemv-inproj) run gemv-inproj python3 scripts/bench_gemv.py --shapes "35B-A3B GDN in_proj" --m 1,16,64 --split --pdl \
                   --output "$LOGS/gemv-inproj.json" ;;
    layer-pdl-*|layer-nopdl-*)  # layer-<pdl|nopdl>-<preset>: the in_proj micro-benchmark, our kernels with or without PDL
      mode=${stage#layer-}; mode=${mode%%-*}; flag=--pdl; [ "$mode" = nopdl ] && flag=--no-pdl
      run "$stage" python3 -m deltaserve.cli bench layer --preset "${stage#layer-$mode-}" --layers 36 $flag \
        --output "$LOGS/$stage.json" ;;
    layer35) run layer35 python3 -m deltaserve.cli bench layer --preset qwen3.5-35b-a3b --layers 36 --output "$LOGS/layer35.json" ;;
    layer) run layer35 python3 -m deltaserve.cli bench layer --preset qwen3.5-35b-a3b --layers 36 --output "$LOGS/layer35.json"
           run layer122 python3 -m deltaserve.cli bench layer --preset qwen3.5-122b-a10b --layers 36 --output "$LOGS/layer122.json" ;;
    offline9b) run offline9b python3 -m deltaserve.cli bench offline --preset qwen3.5-9b --batch 1,2,4,8,16 --output-len 128 \
                 --max-num-seqs 16 --output "$LOGS/offline9b.json" ;;
    offline35b) run offline35b python3 -m deltaserve.cli bench offline --preset qwen3.5-35b-a3b ${LAYERS35:+--layers $LAYERS35} \
                  --batch 1,2,4,8,16 --output-len 128 --max-num-seqs 16 --output "$LOGS/offline35b.json" ;;
    offline35b-gemm-router) run offline35b-gemm-router python3 -m deltaserve.cli bench offline --preset qwen3.5-35b-a3b \
                  ${LAYERS35:+--layers $LAYERS35} --moe-router gemm --batch 1,16 --output-len 128 --max-num-seqs 16 \
                  --output "$LOGS/offline35b-gemm-router.json" ;;
    offline35b-bf16state) run offline35b-bf16state python3 -m deltaserve.cli bench offline --preset qwen3.5-35b-a3b \
                  ${LAYERS35:+--layers $LAYERS35} --state-dtype bfloat16 --batch 1,16 --output-len 128 --max-num-seqs 16 \
                  --output "$LOGS/offline35b-bf16state.json" ;;
    profile35b-bf16state) run profile35b-bf16state python3 -m deltaserve.cli bench profile --preset qwen3.5-35b-a3b \
                  ${LAYERS35:+--layers $LAYERS35} --state-dtype bfloat16 --batch 1 --output "$LOGS/profile35b-bf16state.json" ;;
    offline35b-compile) run offline35b-compile python3 -m deltaserve.cli bench offline --preset qwen3.5-35b-a3b ${LAYERS35:+--layers $LAYERS35} \
                  --compile --batch ${BATCH:-1,4,16} --output-len 64 --max-num-seqs 16 --output "$LOGS/offline35b-compile.json" ;;
    offline9b-compile) run offline9b-compile python3 -m deltaserve.cli bench offline --preset qwen3.5-9b --compile \
                  --batch ${BATCH:-1,4,16} --output-len 64 --max-num-seqs 16 --output "$LOGS/offline9b-compile.json" ;;
    engine-fix) run engine-fix python3 -m pytest -q -m gpu -s -p no:cacheprovider --timeout=600 \
                  tests/test_engine_gpu.py -k "moe_and_next or transformers" ;;
    *) echo "unknown stage $stage" ;;
  esac
done
