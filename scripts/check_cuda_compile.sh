#!/usr/bin/env bash
# Compiles the CUDA kernels (csrc/cuda/*.cu) with nvcc against the installed
# torch's headers, without linking: the check that they build, for machines
# whose torch has no CUDA (where setup.py leaves them out).
# Usage: scripts/check_cuda_compile.sh [arch, default sm_90]
set -euo pipefail
cd "$(dirname "$0")/.."
arch="${1:-sm_90}"
inc="$(python -c 'import torch.utils.cpp_extension as c; print(c.include_paths()[0])')"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
pids=()
for f in csrc/cuda/*.cu; do
  nvcc -c -std=c++17 -O3 -arch="$arch" -DUSE_CUDA -DTORCH_TARGET_VERSION=0x020d000000000000 \
    -Xcompiler -Wall -Icsrc -I"$inc" "$f" -o "$out/$(basename "$f").o" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
[ $status -eq 0 ] && echo "CUDA kernels compile ($arch)"
exit $status
