#!/usr/bin/env bash
# torch.profiler of one compiled (compile_regions) Prism pre-fill at 32K with FA4, random SmolLM2
# weights (the kernels of the attention path, not the densities of real text); FA4 wheels as two
# parts in .y1/.y2, copied to /root/y (see _fa4_check.sh)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
cat /root/y/q0* > /root/w.tar && echo "a6604a4a2d5b045b930e7330b527f385  /root/w.tar" | md5sum -c - || exit 3
mkdir -p /root/w && tar -xf /root/w.tar -C /root/w
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /root/w/.whl/*.whl \
  ${WS:-.wsmall}/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD PYTHONUNBUFFERED=1
timeout 200 python3 benchmarks/bench_model.py model=random-smollm2 compile=true check=false \
  parts=false ppl=false lengths=[32768] "policies=[dense,prism]" profile=[32768] reps=2 warmup=1 \
  out=$OUT/model_profile_compiled_h200 2>&1 | grep -v Warning | tail -6
