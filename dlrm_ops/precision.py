"""Mixed precision: bf16 matrix multiplies with fp32 master weights, where
the CPU multiplies bf16 natively (AVX512-BF16 or AMX) or on CUDA."""

import os
from typing import Optional, Tuple

import torch

PRECISIONS = ("fp32", "bf16")


def native_bf16(device: str = "cpu") -> bool:
    """Whether bf16 GEMMs run natively here. ``DLRM_OPS_NATIVE_BF16=0/1``
    overrides the CPU's answer (tests use it)."""
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    forced = os.environ.get("DLRM_OPS_NATIVE_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve(precision: str, device: str, force: bool) -> Tuple[str, Optional[str]]:
    """The precision to run, and a note when bf16 falls back to fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and not force and not native_bf16(device):
        return "fp32", (
            "note: bf16 asked for, but this CPU has no native bf16 (AVX512-BF16 or AMX): "
            "emulated bf16 is slower than fp32, so fp32 is used (--force-precision to use bf16)"
        )
    return precision, None
