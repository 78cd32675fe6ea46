#!/usr/bin/env bash
# Builds the kernels with AddressSanitizer + UBSan and runs the test suite
# under them (Python itself is not instrumented, so the ASan runtime is
# preloaded). Rebuilds the normal release build afterwards.
#   bash scripts/test_sanitized.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
SANITIZE=1 pip install -q --no-build-isolation -e .
trap 'pip install -q --no-build-isolation -e .' EXIT
LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS=detect_leaks=0,abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1,print_stacktrace=1 \
TORCHINDUCTOR_COMPILE_THREADS=1 python -m pytest -q -p no:cacheprovider tests -k "not compile" "$@"
