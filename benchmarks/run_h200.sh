#!/usr/bin/env bash
# The H200 session behind benchmarks/results/model_h200*: the exact commands.
#
# The FA4 wheels (DESIGN.md §6) and the embedded model's GGUF (98 MB) are too big for one
# device call (64 MiB), so they travel as a tar in four parts (.x1 ... .x4, each carried by one
# call and copied to /root/x), while the machine stays warm. Then:
#   bash benchmarks/run_h200.sh model    # real SmolLM2-135M, every policy, 8K-128K
#   bash benchmarks/run_h200.sh eightb   # Llama-3.1-8B shape, fixed densities; GPU tests; HF check
#   bash benchmarks/run_h200.sh probe    # fused probe estimator: whole model eager + compile_regions
#   bash benchmarks/run_h200.sh checks   # FA4 HF check, every GPU test, probe estimator timing
#   bash benchmarks/run_h200.sh host     # host vs device time per attention call; CUDA graphs
#   bash benchmarks/run_h200.sh graphs   # GPU tests; probe estimator; compile_regions + CUDA graphs
#   bash benchmarks/run_h200.sh session5 # GPU tests, HF check, probe estimator, graphed model 8K-128K
#   bash benchmarks/run_h200.sh session6 # fused mean-pool: GPU tests, estimator, 8B shape, SmolLM2
#   bash benchmarks/run_h200.sh profile8b # SmolLM2 meanpool at 128K; kernel profile of the 8B shape
#   bash benchmarks/run_h200.sh eightb6  # 8B shape graphed at 128K, 5-40 % density (forced counted)
#   bash benchmarks/run_h200.sh session7 # shared probes: GPU tests, estimators, SmolLM2 8K/32K
#   bash benchmarks/run_h200.sh eightb7  # 8B shape graphed at 128K, 20 % (count-only top-k search)
#   bash benchmarks/run_h200.sh eightb9  # 8B shape graphed at 128K, 20 %, 3 timed pre-fills each
#   bash benchmarks/run_h200.sh session11 # pooled mixture, PyTorch rule (prepared in session 11, not run)
#   bash benchmarks/run_h200.sh session12 # fused pooled mixture: GPU tests, estimator cost
#   bash benchmarks/run_h200.sh all12    # GPU tests, estimator cost, SmolLM2 graphed (dense, Prism,
#                                        # the near-lossless and the pooled policy)
#   bash benchmarks/run_h200.sh gpu12 / model12  # all12 in two calls (model12 with GGUF=file:
#                                        # the model file alone, no FA4 wheels: flex -> Triton)
#                                        # model12 knobs: SMOL_POLICIES, SMOL_LENGTHS, SMOL_T, SMOL_TAG (out stem)
#   bash benchmarks/run_h200.sh bound15 / eightb15  # session 15: SmolLM2 32K/128K and the 8B shape
#                                        # at 128K with null_real_ms and the Amdahl bound per policy
#   bash benchmarks/run_h200.sh tiles15  # FA4 block-sparse per unit of work by query-block size
#   bash benchmarks/run_h200.sh rect15   # tiles15 (2 sizes) + SmolLM2 Prism with 128- vs 192-row blocks
#   bash benchmarks/run_h200.sh tiles16 / model16  # rect15 in two calls, plus the rectangular GPU tests
set -uo pipefail
phase=${1:-model}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# the bundle, once all four parts are there (the session12 phase runs without it: no FA4, no GGUF)
if [ ! -d /root/b ] && [ "$(ls /root/x/p0* 2>/dev/null | wc -l)" = 4 ]; then
  cat /root/x/p0* > /root/bundle.tar
  (cd /root/x && md5sum /root/bundle.tar | awk '{print $1}' | diff - <(awk '{print $1}' /root/x/bundle.md5)) \
    || { echo "bundle checksum mismatch"; exit 3; }
  mkdir -p /root/b && tar -xf /root/bundle.tar -C /root/b
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  $(ls /root/b/whl/*.whl 2>/dev/null) ${WS:-.wsmall}/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD PYTHONUNBUFFERED=1
python3 -c "import flash_attn.cute, torch; print('FA4 import ok; torch', torch.__version__)"
GGUF=${GGUF:-/root/b/SmolLM2-135M-Instruct.Q4_1.gguf}
if [ "$phase" = model ]; then
  timeout 500 python3 benchmarks/bench_model.py gguf=$GGUF \
    lengths=[8192,16384,32768,65536,131072] \
    'policies=[dense,prism,prism:backend=triton,meanpool,xattn,probe@32768,probe:threshold=0.98@32768,cfg:prism/configs/policies/smollm2_probe_r98.yaml@32768]' \
    reps=3 warmup=1 profile=[32768] out=$OUT/model_h200 2>&1 | grep -v Warning
elif [ "$phase" = probe ]; then
  P98=cfg:prism/configs/policies/smollm2_probe_r98.yaml
  P99=cfg:prism/configs/policies/smollm2_probe_r99.yaml
  timeout 300 python3 benchmarks/bench_model.py gguf=$GGUF \
    lengths=[8192,16384,32768,65536,131072] "policies=[dense,prism,$P98,$P99]" \
    reps=3 warmup=1 out=$OUT/model_probe_h200 2>&1 | grep -v Warning
  timeout 270 python3 benchmarks/bench_model.py gguf=$GGUF compile=true check=false parts=false \
    lengths=[8192,32768,131072] "policies=[dense,prism,$P98]" \
    reps=3 warmup=2 out=$OUT/model_compiled_h200 2>&1 | grep -v Warning
elif [ "$phase" = graphs ]; then
  P98=cfg:prism/configs/policies/smollm2_probe_r98.yaml
  P985=cfg:prism/configs/policies/smollm2_probe_r985.yaml
  P99=cfg:prism/configs/policies/smollm2_probe_r99.yaml
  timeout 120 python3 -m pytest -q -m gpu tests/test_graphs.py tests/test_probe_fused.py 2>&1 \
    | tee $OUT/gpu_tests_graphs.log | tail -4
  timeout 120 python3 benchmarks/bench_probe_estimator.py lengths=[8192,32768,131072] sweep=false \
    out=$OUT 2>&1 | grep -v Warning | tail -12
  timeout ${GRAPH_T:-330} python3 benchmarks/bench_model.py gguf=$GGUF compile=true graph=true \
    lengths=${GRAPH_LENGTHS:-[8192,16384,32768,65536,131072]} \
    "policies=${GRAPH_POLICIES:-[dense,prism,$P98,$P985,$P99]}" reps=3 warmup=1 parts=false \
    out=$OUT/model_graph_h200 2>&1 | grep -v Warning
elif [ "$phase" = final ]; then
  NL=cfg:prism/configs/policies/smollm2_probe_near_lossless.yaml
  timeout 100 python3 -m pytest -q -m gpu tests/test_graphs.py tests/test_flex_fa4_safe.py \
    tests/test_probe_fused.py 2>&1 | tee $OUT/gpu_tests_graphs.log | tail -4
  timeout 100 python3 benchmarks/bench_estimator_share.py gguf=$GGUF out=$OUT/estimator_share_h200 \
    2>&1 | grep -v Warning | grep "^{"
  timeout 150 python3 benchmarks/bench_model.py gguf=$GGUF compile=true graph=true check=false \
    lengths=[2048,4096,8192,32768] "policies=[dense,prism,$NL@32768]" reps=5 warmup=1 \
    parts=false out=$OUT/model_graph_short_h200 2>&1 | grep -v Warning | tail -12
  timeout 200 python3 benchmarks/bench_model.py model=random-llama8b compile=true graph=true \
    check=false lengths=[131072] "policies=[dense,topk:0.2]" reps=1 warmup=1 ppl=false \
    parts=false out=$OUT/llama8b_graph_h200 2>&1 | grep -v Warning | tail -5
elif [ "$phase" = session5 ]; then
  NL=cfg:prism/configs/policies/smollm2_probe_near_lossless.yaml
  timeout 120 python3 -m pytest -q -m gpu tests/test_estimator_ops.py tests/test_probe_fused.py \
    tests/test_graphs.py tests/test_policy_by_length.py tests/test_flex_fa4_safe.py 2>&1 \
    | tee $OUT/gpu_tests_session5.log | tail -4
  timeout 100 python3 benchmarks/check_hf_gpu.py 2>&1 | tee $OUT/check_hf_gpu_fa4.log | tail -4
  timeout 90 python3 benchmarks/bench_probe_estimator.py lengths=[8192,32768,131072] sweep=false \
    out=$OUT 2>&1 | grep -v Warning | tail -8
  timeout ${GRAPH_T:-250} python3 benchmarks/bench_model.py gguf=$GGUF compile=true graph=true \
    lengths=[8192,32768,131072] "policies=[dense,prism,$NL]" reps=3 warmup=1 parts=false \
    out=$OUT/model_graph_s5_h200 2>&1 | grep -v Warning
elif [ "$phase" = session6 ]; then
  timeout 90 python3 -m pytest -q -m gpu tests/test_meanpool_fused.py tests/test_prism_fused_gpu.py \
    tests/test_estimator_ops.py 2>&1 | tee $OUT/gpu_tests_session6.log | tail -4
  timeout 60 python3 benchmarks/bench_estimators.py out=$OUT tag=meanpool_fused_h200 \
    lengths=[8192,32768,131072] rep_ms=100 \
    'scorers=[prism,meanpool,meanpool:impl=torch,meanpool:rule=top_k+top_k=109,meanpool:rule=top_k+top_k=109+impl=torch]' \
    2>&1 | grep -v Warning | grep "^\[" 
  timeout ${EIGHTB_T:-300} python3 benchmarks/bench_model.py model=random-llama8b compile=true \
    graph=true check=false lengths=[131072] "policies=[dense,topk:0.2,topk:0.2:impl=torch]" \
    reps=1 warmup=1 ppl=false parts=false out=$OUT/llama8b_graph_s6_h200 2>&1 | grep -v Warning | tail -6
  timeout ${SMOL_T:-100} python3 benchmarks/bench_model.py gguf=$GGUF compile=true graph=true \
    lengths=[32768,131072] "policies=[dense,meanpool,meanpool:impl=torch]" reps=3 warmup=1 \
    parts=false out=$OUT/model_graph_meanpool_s6_h200 2>&1 | grep -v Warning | tail -8
elif [ "$phase" = profile8b ]; then
  timeout 110 python3 benchmarks/bench_model.py gguf=$GGUF compile=true graph=true \
    lengths=[131072] "policies=[dense,meanpool,meanpool:impl=torch]" reps=3 warmup=1 \
    parts=false out=$OUT/model_graph_meanpool_128k_s6_h200 2>&1 | grep -v Warning | tail -5
  timeout 300 python3 benchmarks/bench_model.py model=random-llama8b compile=true graph=false \
    check=false lengths=[131072] "policies=[topk:0.2]" reps=1 warmup=1 ppl=false parts=false \
    profile=[131072] profile_policy=topk:0.2 out=$OUT/llama8b_profile_s6_h200 2>&1 \
    | grep -v Warning | tail -4
elif [ "$phase" = eightb6 ]; then
  timeout 400 python3 benchmarks/bench_model.py model=random-llama8b compile=true graph=true \
    check=false lengths=[131072] "policies=[dense,topk:0.05,topk:0.1,topk:0.2,topk:0.4]" \
    reps=1 warmup=1 ppl=false parts=false out=$OUT/llama8b_graph_s6b_h200 2>&1 \
    | grep -v Warning | tail -9
elif [ "$phase" = session7 ]; then
  NL=cfg:prism/configs/policies/smollm2_probe_near_lossless.yaml
  timeout 120 python3 -m pytest -q -m gpu tests/test_probe_fused.py tests/test_estimator_ops.py \
    tests/test_meanpool_fused.py tests/test_prism_fused_gpu.py 2>&1 \
    | tee $OUT/gpu_tests_session7.log | tail -4
  for pl in ends:2 shared:2 shared:3; do
    timeout 80 python3 benchmarks/bench_probe_estimator.py lengths=[8192,32768,131072] \
      sweep=false placement=${pl%%:*} probes=${pl##*:} out=$OUT \
      name=probe_estimator_s7_${pl%%:*}${pl##*:}_h200 2>&1 | grep -v Warning | tail -6
  done
  timeout 60 python3 benchmarks/bench_estimators.py out=$OUT tag=topk_select_s7_h200 \
    lengths=[8192,32768,131072] rep_ms=100 \
    'scorers=[meanpool,meanpool:rule=top_k+top_k=109,prism:rule=top_k+top_k=109]' \
    2>&1 | grep -v Warning | grep "^\["
  timeout ${SMOL_T:-200} python3 benchmarks/bench_model.py gguf=$GGUF compile=true graph=true \
    lengths=[8192,32768] \
    "policies=[dense,prism,$NL,$NL:placement=shared,$NL:placement=shared+probes=3]" \
    reps=3 warmup=1 parts=false out=$OUT/model_graph_s7_h200 2>&1 | grep -v Warning | tail -12
elif [ "$phase" = session11 ]; then  # prepared in session 11 (no device then): the pooled mixture
  PP=cfg:prism/configs/policies/smollm2_probe_pooled.yaml
  NL=cfg:prism/configs/policies/smollm2_probe_near_lossless.yaml
  timeout 150 python3 -m pytest -q -m gpu tests/test_probe_pooled.py tests/test_estimator_ops.py \
    tests/test_probe_fused.py 2>&1 | tee $OUT/gpu_tests_session11.log | tail -4
  timeout 90 python3 benchmarks/bench_estimators.py out=$OUT tag=probe_pooled_s11_h200 \
    lengths=[8192,32768,131072] rep_ms=100 \
    'scorers=[probe,probe:pooled_mix=0.3,probe:probes=3+pooled_mix=0.2]' \
    2>&1 | grep -v Warning | grep "^\["
  timeout ${SMOL_T:-300} python3 benchmarks/bench_model.py gguf=$GGUF compile=true graph=true \
    lengths=[8192,32768] "policies=[dense,prism,$NL,$PP]" \
    reps=3 warmup=1 parts=false out=$OUT/model_graph_s11_h200 2>&1 | grep -v Warning | tail -12
elif [ "$phase" = session12 ]; then  # the pooled mixture fused on the GPU: tests, estimator cost
  timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_pooled_fused.py \
    tests/test_probe_pooled.py tests/test_estimator_ops.py tests/test_probe_fused.py 2>&1 \
    | tee $OUT/gpu_tests_session12.log | tail -4
  timeout 150 python3 benchmarks/bench_estimators.py out=$OUT tag=probe_pooled_s12_h200 \
    lengths=[8192,32768,131072] rep_ms=100 \
    'scorers=[prism,probe,probe:pooled_mix=0.3,probe:pooled_mix=0.3+pooled_stride=16,probe:probes=3+pooled_mix=0.2,probe:pooled_mix=0.3+impl=torch]' \
    2>&1 | grep -v Warning | tail -24
elif [ "$phase" = all12 ]; then  # one call: the GPU tests, the estimator cost, the real model
  bash "$0" gpu12
  bash "$0" model12
elif [ "$phase" = gpu12 ]; then  # the first half of all12 (no bundle needed)
  timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_pooled_fused.py \
    tests/test_probe_pooled.py 2>&1 | tee $OUT/gpu_tests_session12.log | tail -3
  timeout 80 python3 benchmarks/bench_estimators.py out=$OUT tag=probe_pooled_s12_h200 \
    lengths=[8192,32768,131072] rep_ms=50 \
    'scorers=[probe,probe:pooled_mix=0.3,probe:probes=3+pooled_mix=0.2]' 2>&1 | grep -v Warning \
    | tail -12
elif [ "$phase" = model12 ]; then  # the second half of all12 (GGUF=path: the model file alone)
  PP=cfg:prism/configs/policies/smollm2_probe_pooled.yaml
  P3=cfg:prism/configs/policies/smollm2_probe_p3_pooled.yaml
  NL=cfg:prism/configs/policies/smollm2_probe_near_lossless.yaml
  timeout ${SMOL_T:-450} python3 benchmarks/bench_model.py gguf=$GGUF compile=true graph=true \
    lengths=${SMOL_LENGTHS:-[8192,32768,131072]} "policies=${SMOL_POLICIES:-[dense,$NL,$PP,$P3]}" \
    reps=3 warmup=1 parts=false out=$OUT/${SMOL_TAG:-model_graph_s12_h200} 2>&1 | grep -v Warning | tail -16
elif [ "$phase" = bound15 ]; then  # session 15: the Amdahl bound next to the measured speed-up
  # (null_real: the non-attention work on real data; parts: estimator / kernel on captured Q/K/V)
  timeout ${SMOL_T:-400} python3 benchmarks/bench_model.py gguf=$GGUF compile=true graph=true \
    lengths=${SMOL_LENGTHS:-[32768,131072]} "policies=${SMOL_POLICIES:-[dense,prism]}" \
    reps=3 warmup=1 out=$OUT/${SMOL_TAG:-model_bound_s15} 2>&1 | grep -v Warning | tail -12
elif [ "$phase" = eightb15 ]; then
  timeout ${EIGHTB_T:-420} python3 benchmarks/bench_model.py model=random-llama8b compile=true \
    graph=true check=false lengths=[131072] "policies=${EIGHTB_POLICIES:-[dense,topk:0.2]}" \
    reps=3 warmup=1 ppl=false parts=false out=$OUT/${EIGHTB_TAG:-llama8b_bound_s15} 2>&1 \
    | grep -v Warning | tail -8
elif [ "$phase" = tiles15 ]; then  # FA4's tile by sparse query-block size, vs cuDNN per work
  timeout ${TILES_T:-300} python3 benchmarks/bench_fa4_tiles.py out=$OUT/fa4_tiles_s15 ${TILES_ARGS:-} \
    2>&1 | grep -v Warning | tail -30
elif [ "$phase" = rect15 ]; then  # rectangular blocks: FA4's tile, then the whole model
  timeout ${TILES_T:-150} python3 benchmarks/bench_fa4_tiles.py out=$OUT/fa4_tiles_s15 \
    lengths=[32768,131072] q_blocks=[128,192] densities=[1.0,0.15] 2>&1 | grep -v Warning | tail -12
  timeout ${SMOL_T:-330} python3 benchmarks/bench_model.py gguf=$GGUF compile=true graph=true \
    lengths=${SMOL_LENGTHS:-[32768,131072]} "policies=${SMOL_POLICIES:-[dense,prism,prism:q_block_size=192]}" \
    reps=3 warmup=1 parts=false out=$OUT/${SMOL_TAG:-model_rect_s15} 2>&1 | grep -v Warning | tail -12
elif [ "$phase" = tiles16 ]; then  # session 16, call 1 of 2: rectangular GPU tests, FA4 tiles
  timeout 150 python3 -m pytest -q -m gpu tests/test_rect_blocks.py 2>&1 | tee $OUT/gpu_tests_rect_s16.log | tail -4
  timeout ${TILES_T:-240} python3 benchmarks/bench_fa4_tiles.py out=$OUT/fa4_tiles_s16 \
    lengths=[32768,131072] q_blocks=[128,192,384] densities=[1.0,0.18,0.12] 2>&1 | grep -v Warning | tail -22
elif [ "$phase" = model16 ]; then  # session 16, call 2 of 2: SmolLM2, 128- vs 192-row query blocks
  timeout ${SMOL_T:-560} python3 benchmarks/bench_model.py gguf=$GGUF compile=true graph=true \
    lengths=${SMOL_LENGTHS:-[32768,131072]} "policies=${SMOL_POLICIES:-[dense,prism,prism:q_block_size=192]}" \
    reps=3 warmup=1 out=$OUT/${SMOL_TAG:-model_rect_s16} 2>&1 | grep -v Warning | tail -12
elif [ "$phase" = eightb7 ]; then
  timeout ${EIGHTB_T:-300} python3 benchmarks/bench_model.py model=random-llama8b compile=true \
    graph=true check=false lengths=[131072] "policies=[dense,topk:0.2]" reps=1 warmup=1 \
    ppl=false parts=false out=$OUT/llama8b_graph_s7_h200 2>&1 | grep -v Warning | tail -6
elif [ "$phase" = eightb9 ]; then
  timeout ${EIGHTB_T:-420} python3 benchmarks/bench_model.py model=random-llama8b compile=true \
    graph=true check=false lengths=[131072] "policies=[dense,topk:0.2,topk:0.1]" reps=3 warmup=1 \
    ppl=false parts=false out=$OUT/llama8b_graph_s9_h200 2>&1 | grep -v Warning | tail -8
elif [ "$phase" = confirm ]; then
  timeout 100 python3 benchmarks/bench_estimator_share.py gguf=$GGUF lengths=[32768] \
    out=$OUT/estimator_share_h200 2>&1 | grep -v Warning | grep "^{"
  timeout 120 python3 benchmarks/bench_model.py gguf=$GGUF compile=true check=false parts=false \
    ppl=false lengths=[32768] "policies=[prism]" profile=[32768] reps=2 warmup=1 \
    out=$OUT/model_profile_compiled_h200 2>&1 | grep -v Warning | tail -3
elif [ "$phase" = host ]; then
  timeout ${HOST_T:-420} python3 benchmarks/profile_host.py gguf=$GGUF ${HOST_ARGS:-} \
    "policies=[prism,cfg:prism/configs/policies/smollm2_probe_r99.yaml]" \
    out=$OUT/host_h200 2>&1 | grep -v Warning
elif [ "$phase" = checks ]; then
  timeout 120 python3 benchmarks/check_hf_gpu.py 2>&1 | tee $OUT/check_hf_gpu_fa4.log | tail -30
  timeout 200 python3 -m pytest -q -m gpu --continue-on-collection-errors tests 2>&1 | tee $OUT/gpu_tests_fa4.log | tail -15
  timeout 150 python3 benchmarks/bench_probe_estimator.py out=$OUT 2>&1 | grep -v Warning \
    | tee $OUT/probe_estimator_h200.log | tail -30
elif [ "$phase" = eightb ]; then
  timeout 300 python3 benchmarks/bench_model.py model=random-llama8b lengths=[32768,131072] \
    'policies=[dense,topk:0.05,topk:0.1,topk:0.2,topk:0.4]' reps=1 warmup=1 ppl=false parts=false \
    out=$OUT/llama8b_h200 2>&1 | grep -v Warning
  timeout 120 python3 benchmarks/check_hf_gpu.py 2>&1 | tee $OUT/check_hf_gpu_fa4.log | tail -30
  timeout 150 python3 -m pytest -q -m gpu tests 2>&1 | tee $OUT/gpu_tests_fa4.log | tail -15
fi
