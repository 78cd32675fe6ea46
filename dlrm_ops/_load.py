"""Loads the native op library (stable-ABI `_kernels.so`) into torch.ops.dlrm_ops.
DLRM_OPS_LIBRARY names another build of it (scripts/test_sanitized.sh loads
the sanitizer build so)."""

import os
from pathlib import Path

import torch

_LIB = Path(os.environ.get("DLRM_OPS_LIBRARY") or Path(__file__).resolve().parent / "_kernels.so")


def load() -> None:
    if not _LIB.exists():
        raise ImportError(
            f"dlrm_ops native library not found at {_LIB}; build it with "
            "`pip install --no-build-isolation -e .` from the repository root"
        )
    torch.ops.load_library(str(_LIB))
