"""The CUDA kernels compile (nvcc, without linking) where torch has no CUDA and
setup.py therefore leaves them out of the build."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.skipif(
    torch.version.cuda is not None, reason="torch has CUDA: the build compiles them"
)
def test_cuda_kernels_compile():
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "check_cuda_compile.sh")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning" not in r.stderr.lower(), r.stderr
