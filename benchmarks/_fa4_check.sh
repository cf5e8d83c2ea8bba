#!/usr/bin/env bash
# FA4 re-check after a fix (the wheels travel as two parts in .y1/.y2, copied to /root/y)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
cat /root/y/q0* > /root/w.tar && echo "a6604a4a2d5b045b930e7330b527f385  /root/w.tar" | md5sum -c - || exit 3
mkdir -p /root/w && tar -xf /root/w.tar -C /root/w
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /root/w/.whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD PYTHONUNBUFFERED=1
timeout 150 python3 benchmarks/check_hf_gpu.py 2>&1 | grep -v Warning | tee $OUT/check_hf_gpu_fa4.log | tail -25
timeout 100 python3 -m pytest -q -m gpu tests/test_probe_fused.py tests/test_span_block_mask.py tests/test_flex_fa4_safe.py tests/test_hf.py 2>&1 | tail -3 | tee $OUT/gpu_tests_after_fix.log
