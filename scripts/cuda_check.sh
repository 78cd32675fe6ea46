#!/usr/bin/env bash
# On a CUDA machine: build with the CUDA kernels, run the test suite, then the
# CUDA benchmarks. Logs go to $OUT (the device tool's folder) or /tmp.
#   scripts/cuda_check.sh [all|tests|all-tests|bench]
# all (default): device tests and benchmarks; tests: the device tests
# (tests/test_ops.py, every op on the CPU and CUDA; tests/test_errors.py, the
# check modes and CUDA-graph capture); all-tests: the whole
# suite; bench: benchmarks only.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
what="${1:-all}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
CUDA_ARCHS="${CUDA_ARCHS:-90}" python3 -m pip install -q --no-build-isolation --no-deps -e . \
  >"$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
status=0
if [ "$what" != bench ]; then
  python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_ops.py tests/test_errors.py 2>&1 \
    | tee "$out/test_cuda.log" | tail -40
  status=${PIPESTATUS[0]}
  if [ "$what" = all-tests ]; then
    python3 -m pytest -q -n 8 -p no:cacheprovider tests 2>&1 | tee "$out/test_all.log" | tail -5
  fi
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  python3 -m dlrm_ops benchmark --device cuda --rows 500000 --ops "${BENCH_OPS:-forward,train,interaction,quantized,dlrm}" --json "$out/bench_cuda.json" 2>&1 | tee "$out/bench_cuda.log"
fi
exit $status
