"""bf16 mixed precision: bf16 GEMMs on fp32 master weights, the fallback
where the CPU has no native bf16, and checkpoints that keep fp32."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dlrm_ops import precision
from dlrm_ops.data import SyntheticData
from dlrm_ops.models import DLRM
from dlrm_ops.nn.mlp import mlp

TABLES = [50, 200, 1000]


def model(**kw):
    torch.manual_seed(0)
    return DLRM(TABLES, 8, [13, 32, 8], [32, 1], **kw)


def test_bf16_matches_fp32_on_a_batch_and_keeps_fp32_masters():
    """Logits within 0.05 + 2% of fp32's (bf16 keeps 8 bits of mantissa);
    the weights and the optimizer state stay fp32."""
    fp32, bf16 = model(), model(precision="bf16")
    b = SyntheticData(TABLES, 13, 256, 1, seed=3).batch(0)
    a = fp32(b.dense, b.indices, b.offsets)
    z = bf16(b.dense, b.indices, b.offsets)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, a, atol=0.05, rtol=0.02)
    assert not torch.equal(z, a)  # it did run in bf16
    F.binary_cross_entropy_with_logits(z, b.labels).backward()
    for name, t in bf16.state_dict().items():
        assert t.dtype in (torch.float32, torch.float64, torch.int64), name
    assert all(p.grad.dtype == torch.float32 for p in bf16.dense_parameters())


@pytest.mark.parametrize("tables", ["fp32", "bf16"])
def test_bf16_trains_and_round_trips(tables):
    dtype = torch.bfloat16 if tables == "bf16" else torch.float32
    m = model(precision="bf16", embedding_dtype=dtype)
    opt = torch.optim.SGD(m.dense_parameters(), lr=0.2)
    data = SyntheticData(TABLES, 13, 256, 60, seed=1)
    losses = []
    for b in data:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(m(b.dense, b.indices, b.offsets), b.labels)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-10:]) < sum(losses[:10]) * 0.97, losses
    again = model(precision="bf16", embedding_dtype=dtype)
    again.load_state_dict(m.state_dict())
    b = data.batch(0)
    with torch.no_grad():
        torch.testing.assert_close(
            again(b.dense, b.indices, b.offsets), m(b.dense, b.indices, b.offsets)
        )


def test_fused_mlp_bf16_inference_matches_autocast():
    m = mlp([40, 64, 32, 1], final_relu=False, fused=True)
    x = torch.randn(128, 40)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = m(x)
        plain = torch.nn.Sequential(*m)(x)
    assert fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), plain.float(), atol=0.05, rtol=0.02)


def test_fallback_without_native_bf16(monkeypatch):
    monkeypatch.setenv("DLRM_OPS_NATIVE_BF16", "0")
    used, note = precision.resolve("bf16", "cpu", force=False)
    assert used == "fp32" and "no native bf16" in note
    assert precision.resolve("bf16", "cpu", force=True) == ("bf16", None)
    monkeypatch.setenv("DLRM_OPS_NATIVE_BF16", "1")
    assert precision.resolve("bf16", "cpu", force=False) == ("bf16", None)
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.resolve("fp8", "cpu", False)


def test_command_precision_flag_and_fallback(tmp_path):
    args = [sys.executable, "-m", "dlrm_ops", "train", "--arch-embedding-size", "20-30"]
    args += ["--arch-mlp-bot", "13-8-4", "--arch-sparse-feature-size", "4", "--arch-mlp-top"]
    args += ["8-1", "--num-batches", "5", "--no-progress", "--compare-reference", "0"]
    args += ["--num-test-batches", "1", "--precision", "bf16"]
    env = {**os.environ, "DLRM_OPS_NATIVE_BF16": "0"}
    off = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert off.returncode == 0 and "no native bf16" in off.stderr and ", fp32," in off.stdout
    env["DLRM_OPS_NATIVE_BF16"] = "1"
    on = subprocess.run(
        args + ["--save-model", str(tmp_path / "m.pt")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert on.returncode == 0 and ", bf16," in on.stdout, on.stderr
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    assert ckpt["args"]["precision"] == "bf16"
    assert ckpt["model"]["bottom.0.weight"].dtype == torch.float32
