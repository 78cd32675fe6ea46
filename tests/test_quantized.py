"""Row-wise int8/int4 quantization and the pooled lookup over packed rows."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dlrm_ops
from dlrm_ops import reference
from dlrm_ops.nn import (
    EmbeddingBagCollection,
    QuantizedEmbeddingBag,
    QuantizedEmbeddingBagCollection,
)

from utils import first_bags, make_bags

PREPACK = {
    8: torch.ops.quantized.embedding_bag_byte_prepack,
    4: torch.ops.quantized.embedding_bag_4bit_prepack,
}


def weights(R, D, seed=0, scale=1.0):
    return torch.randn(R, D, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("R, D", [(1, 2), (100, 64), (37, 128), (5, 2), (64, 18)])
def test_bytes_equal_torch_prepack(bits, R, D):
    for seed, scale in ((0, 1.0), (1, 1e-3), (2, 300.0)):
        w = weights(R, D, seed, scale)
        packed = dlrm_ops.quantize_rowwise(w, bits)
        assert packed.dtype == torch.uint8
        assert torch.equal(packed, PREPACK[bits](w))
        assert torch.equal(packed, reference.quantize_rowwise(w, bits))


@pytest.mark.parametrize("D", [1, 3, 17, 63])
def test_odd_dims_8bit(D):
    w = weights(20, D)
    assert torch.equal(dlrm_ops.quantize_rowwise(w, 8), PREPACK[8](w))


@settings(max_examples=30, deadline=None)
@given(
    R=st.integers(1, 40),
    half_d=st.integers(1, 40),
    bits=st.sampled_from([8, 4]),
    seed=st.integers(0, 10_000),
    scale=st.sampled_from([1e-4, 1.0, 1e3]),
)
def test_random_prepack_and_round_trip(R, half_d, bits, seed, scale):
    w = weights(R, 2 * half_d, seed, scale)
    packed = dlrm_ops.quantize_rowwise(w, bits)
    assert torch.equal(packed, PREPACK[bits](w))
    deq = dlrm_ops.dequantize_rowwise(packed, bits)
    # the kernel may fuse scale * q + bias into one FMA
    torch.testing.assert_close(
        deq, reference.dequantize_rowwise(packed, bits), atol=1e-6 * float(w.abs().max()), rtol=1e-6
    )
    # at most half a quantization step per element (fp16 scale/bias for 4-bit)
    step = (w.max(1).values - w.min(1).values) / (255 if bits == 8 else 15)
    # 4-bit stores scale and bias in fp16: relative rounding, plus its subnormal
    # spacing 2^-24 in absolute terms (bias, and scale times up to 15)
    slack = (
        1e-6 * w.abs().max(1).values
        if bits == 8
        else 2e-3 * (w.abs().max(1).values + step) + 16 * 2.0**-24
    )
    assert ((deq - w).abs() <= (step / 2 + slack)[:, None] + 1e-7).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_half_inputs_and_outputs(dtype, bits):
    w = weights(30, 16).to(dtype)
    packed = dlrm_ops.quantize_rowwise(w, bits)
    assert torch.equal(packed, dlrm_ops.quantize_rowwise(w.float(), bits))
    deq = dlrm_ops.dequantize_rowwise(packed, bits, dtype=dtype)
    assert deq.dtype == dtype
    torch.testing.assert_close(deq, dlrm_ops.dequantize_rowwise(packed, bits).to(dtype))


@pytest.mark.parametrize("bits", [8, 4])
def test_constant_rows_are_exact(bits):
    w = torch.full((4, 8), 0.75)
    w[1] = 0.0
    w[2] = -3.0
    assert torch.equal(dlrm_ops.quantize_rowwise(w, bits), PREPACK[bits](w))
    torch.testing.assert_close(
        dlrm_ops.dequantize_rowwise(dlrm_ops.quantize_rowwise(w, bits), bits), w
    )


@pytest.mark.parametrize("bits", [8, 4])
def test_non_finite_rows_dequantize_to_nan_and_leave_other_rows_alone(bits):
    w = weights(4, 8)
    w[1, 3] = float("inf")
    w[2, 0] = float("nan")
    deq = dlrm_ops.dequantize_rowwise(dlrm_ops.quantize_rowwise(w, bits), bits)
    assert torch.isnan(deq[1]).all() and torch.isnan(deq[2]).all()
    ok = dlrm_ops.dequantize_rowwise(dlrm_ops.quantize_rowwise(w[[0, 3]], bits), bits)
    assert torch.equal(deq[[0, 3]], ok)


def qcollection(bits, dims, rows=(50, 7, 90), mode="sum"):
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(list(rows), dims, mode=mode)
    return ebc, QuantizedEmbeddingBagCollection.from_float(ebc, bits)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("mode, weighted", [("sum", False), ("sum", True), ("mean", False)])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dims", [16, [8, 64, 2]])
def test_lookup_matches_reference(bits, mode, weighted, index_dtype, dims):
    ebc, q = qcollection(bits, dims, mode=mode)
    indices, offsets = make_bags(q.num_embeddings, B=11, max_len=7, index_dtype=index_dtype)
    psw = torch.rand(indices.numel()) if weighted else None
    out = q(indices, offsets, psw)
    tables = [q.dequantized_weight_of(t) for t in range(3)]
    ref = reference.table_batched_embedding_bag(tables, indices, offsets, mode, psw)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("mode, weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_streamed_output_has_the_bits_of_a_cached_one(bits, mode, weighted):
    """[4096, 528] fp32 outputs (8.65 MB) are written past the caches
    (kStreamOutputBytes in csrc/cpu/pooling.h), table 1 through them."""
    B = 4096
    ebc, q = qcollection(bits, [8, 8, 512], mode=mode)
    indices, offsets = make_bags(q.num_embeddings, B=B, max_len=3)
    psw = torch.rand(indices.numel()) if weighted else None
    out = q(indices, offsets, psw)
    tables = [q.dequantized_weight_of(t) for t in range(3)]
    ref = reference.table_batched_embedding_bag(tables, indices, offsets, mode, psw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    small_idx, small_off, pos = first_bags(indices, offsets, 3, B, 64)
    assert torch.equal(out[:64], q(small_idx, small_off, psw[pos] if weighted else None))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_lookup_matches_torch_quantized_ops(bits, mode):
    w = weights(200, 32)
    packed = PREPACK[bits](w)
    indices, offsets = make_bags([200], B=16, max_len=9)
    psw = torch.rand(indices.numel()) if mode == "sum" else None
    op = (
        torch.ops.quantized.embedding_bag_byte_rowwise_offsets
        if bits == 8
        else torch.ops.quantized.embedding_bag_4bit_rowwise_offsets
    )
    ref = op(packed, indices, offsets, False, 0, False, psw, None, True)
    if mode == "mean":  # torch's quantized CPU ops ignore `mode` and always sum
        ref = ref / (offsets[1:] - offsets[:-1]).clamp(min=1).unsqueeze(1)
    q = QuantizedEmbeddingBagCollection([200], [32], bits, mode)
    q.packed.copy_(packed.view(-1))
    torch.testing.assert_close(q(indices, offsets, psw), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_output(dtype):
    ebc, q = qcollection(8, 16)
    indices, offsets = make_bags(q.num_embeddings, B=5, max_len=4)
    out32 = q(indices, offsets)
    q.output_dtype = dtype
    out = q(indices, offsets)
    assert out.dtype == dtype
    torch.testing.assert_close(out, out32.to(dtype))


def test_empty_bags_and_odd_dim_8bit():
    ebc, q = qcollection(8, [3, 1, 5])
    offsets = torch.zeros(3 * 4 + 1, dtype=torch.int64)
    assert torch.equal(q(torch.zeros(0, dtype=torch.int64), offsets), torch.zeros(4, 9))
    indices, offsets = make_bags(q.num_embeddings, B=6, max_len=3)
    ref = reference.table_batched_embedding_bag(
        [q.dequantized_weight_of(t) for t in range(3)], indices, offsets
    )
    torch.testing.assert_close(q(indices, offsets), ref)


def test_quantized_close_to_fp32_collection():
    ebc, q = qcollection(8, 64)
    indices, offsets = make_bags(q.num_embeddings, B=20, max_len=5)
    torch.testing.assert_close(
        q(indices, offsets), ebc(indices, offsets).detach(), atol=0.02, rtol=0.02
    )


def test_bad_input():
    ebc, q = qcollection(8, 4, rows=(5, 6))
    idx = torch.tensor([0, 1, 2, 3, 4, 0, 1, 9])
    off = torch.tensor([0, 3, 5, 6, 8])
    with pytest.raises(
        RuntimeError,
        match=r"indices\[7\] = 9 is out of range for table 1 with 6 rows "
        r"\(bag 1 of table 1\)",
    ):
        q(idx, off)
    with pytest.raises(RuntimeError, match=r"offsets must be non-decreasing"):
        q(idx, torch.tensor([0, 3, 2, 6, 8]))
    with pytest.raises(RuntimeError, match=r"bits must be 8 or 4, got 2"):
        dlrm_ops.quantize_rowwise(torch.randn(3, 4), 2)
    with pytest.raises(RuntimeError, match=r"4-bit rows need an even dim, got 3"):
        dlrm_ops.quantize_rowwise(torch.randn(3, 3), 4)
    with pytest.raises(RuntimeError, match=r"packed must have dtype in \{uint8\}, got float32"):
        dlrm_ops.dequantize_rowwise(torch.randn(3, 12), 8)
    with pytest.raises(RuntimeError, match=r"weight must be 2-D, got 1-D"):
        dlrm_ops.quantize_rowwise(torch.randn(3), 8)
    with pytest.raises(ValueError, match=r"4-bit tables need even dims"):
        QuantizedEmbeddingBagCollection([4], [3], bits=4)


def test_quantize_model_reports_bytes_and_matches():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {
            "ebc": EmbeddingBagCollection([100, 200], 16),
            "bag": torch.nn.EmbeddingBag(50, 8, mode="sum"),
            "ours": dlrm_ops.nn.EmbeddingBag(60, 8, mode="mean"),
            "lin": torch.nn.Linear(4, 4),
        }
    )
    indices, offsets = make_bags([100, 200], B=4, max_len=3)
    x = torch.randint(0, 50, (4, 3))
    expect = (
        model["ebc"](indices, offsets).detach(),
        model["bag"](x).detach(),
        model["ours"](x).detach(),
    )
    report = dlrm_ops.quantize(model, bits=8)
    assert sorted(report.modules) == ["bag", "ebc", "ours"]
    assert report.bytes_before == (300 * 16 + 50 * 8 + 60 * 8) * 4
    assert report.bytes_after == 300 * 24 + 50 * 16 + 60 * 16
    assert report.bytes_saved > 0 and "MiB saved" in str(report)
    assert isinstance(model["ebc"], QuantizedEmbeddingBagCollection)
    assert isinstance(model["bag"], QuantizedEmbeddingBag)
    got = (model["ebc"](indices, offsets), model["bag"](x), model["ours"](x))
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e, atol=0.03, rtol=0.03)


def test_state_dict_round_trip(tmp_path):
    _, q = qcollection(4, 8)
    torch.save(q.state_dict(), tmp_path / "q.pt")
    q2 = QuantizedEmbeddingBagCollection(q.num_embeddings, q.embedding_dims, bits=4)
    q2.load_state_dict(torch.load(tmp_path / "q.pt"))
    assert torch.equal(q.packed, q2.packed)


def test_opcheck_and_compile():
    _, q = qcollection(8, 16)
    indices, offsets = make_bags(q.num_embeddings, B=5, max_len=4)
    ops = torch.ops.dlrm_ops
    w = weights(10, 16)
    torch.library.opcheck(ops.quantize_rowwise, (w, 8))
    torch.library.opcheck(ops.quantize_rowwise, (w, 4))
    torch.library.opcheck(
        ops.dequantize_rowwise, (dlrm_ops.quantize_rowwise(w, 4), 4, torch.bfloat16)
    )
    torch.library.opcheck(
        ops.quantized_embedding_bag_forward,
        (
            q.packed,
            q.weights_offsets,
            q.dim_offsets,
            q.rows,
            indices,
            offsets,
        ),
        dict(
            pooling=dlrm_ops.ops.Pooling.SUM,
            per_sample_weights=torch.rand(indices.numel()),
            total_dim=48,
            bits=8,
            output_dtype=None,
        ),
    )
    compiled = torch.compile(q, fullgraph=True)
    torch.testing.assert_close(compiled(indices, offsets), q(indices, offsets))
