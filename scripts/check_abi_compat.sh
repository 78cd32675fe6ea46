#!/usr/bin/env bash
# Checks the stable-ABI promise: the extension built here under torch 2.13.0
# imports and passes the op tests under torch 2.14.1 without a rebuild.
# Not part of the default test run: it installs a 5 GB torch into a venv.
#   bash scripts/check_abi_compat.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-/tmp/dlrm_ops_abi_venv}
shift || true
built=$(python -c "import torch; print(torch.__version__)")
ls dlrm_ops/_kernels.so >/dev/null || { echo "build first: pip install --no-build-isolation -e ."; exit 1; }
echo "extension built under torch $built"
[ -x "$venv/bin/python" ] || python -m venv "$venv"
"$venv/bin/pip" install -q torch==2.14.1 -r requirements-dev.txt
# Import the package from this tree (the already-built .so files), never rebuilding.
PYTHONPATH="$PWD" "$venv/bin/python" - <<'PY'
import torch, dlrm_ops
info = dlrm_ops.build_info()
print("running under torch", torch.__version__, "| built with", info["torch_built_with"])
assert info["torch_built_with"] != torch.__version__, "same torch: nothing checked"
PY
PYTHONPATH="$PWD" "$venv/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
