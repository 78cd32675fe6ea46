#!/usr/bin/env bash
# Builds the op library with AddressSanitizer + UBSan (build/asan, apart from
# the installed build, which stays as it is) and runs tests against it. Python
# is not instrumented, so the sanitizer runtimes are preloaded; any report
# aborts the process, which fails its test (fuzz cases run in child processes).
#   bash scripts/test_sanitized.sh              # the bad-input and fuzz tests (CI)
#   bash scripts/test_sanitized.sh tests -x     # or any pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
build=build/asan
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DDLRM_OPS_SANITIZE=ON \
  -DPython_EXECUTABLE="$(command -v python)" -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/$build/lib" \
  > "$build.log" 2>&1 || { cat "$build.log"; exit 1; }
cmake --build "$build" --target dlrm_ops_kernels -j "${MAX_JOBS:-$(nproc)}" >> "$build.log" 2>&1 \
  || { tail -50 "$build.log"; exit 1; }
if [ $# -eq 0 ]; then
  set -- tests/test_hardening.py tests/test_fuzz.py tests/test_embedding_bag.py \
    tests/test_fused_optimizer.py tests/test_interaction.py tests/test_quantized.py \
    -k "hardening or fuzz or bad or empty or range or malformed or overflow"
fi
DLRM_OPS_LIBRARY="$PWD/$build/lib/_kernels.so" \
LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS=detect_leaks=0,abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1,print_stacktrace=1 \
TORCHINDUCTOR_COMPILE_THREADS=1 python -m pytest -q -p no:cacheprovider "$@"
