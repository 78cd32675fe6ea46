"""Table-batched embedding bag against the pure-PyTorch reference and torch."""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import dlrm_ops
from dlrm_ops import ops, reference
from dlrm_ops.nn import EmbeddingBagCollection
from dlrm_ops.nn._memory import on_huge_pages

from utils import (
    TOL,
    anon_huge_kib,
    first_bags,
    huge_kib_in,
    make_bags,
    offsets_dropping_at,
    thp_available,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INDEX_DTYPES = [torch.int32, torch.int64]
POOLINGS = [("sum", False), ("sum", True), ("mean", False)]  # weights need sum pooling


def tables_of(ebc):
    return [ebc.weight_of(t) for t in range(ebc.num_tables)]


def psw_for(indices, dtype, seed=1):
    return torch.rand(indices.numel(), generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("mode, weighted", POOLINGS)
@pytest.mark.parametrize("dims", [8, [4, 16, 1, 33, 48, 128]])
def test_forward_matches_reference(dtype, index_dtype, mode, weighted, dims):
    rows = [50, 7, 300, 1, 20, 9]
    ebc = EmbeddingBagCollection(rows, dims, mode=mode, dtype=dtype)
    indices, offsets = make_bags(rows, B=13, max_len=6, index_dtype=index_dtype)
    psw = psw_for(indices, dtype) if weighted else None
    out = ebc(indices, offsets, psw)
    ref = reference.table_batched_embedding_bag(tables_of(ebc), indices, offsets, mode, psw)
    assert out.dtype == dtype and out.shape == (13, ebc.total_dim)
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_forward_matches_torch_embedding_bag(dtype, mode):
    rows = [40, 60, 5]
    ebc = EmbeddingBagCollection(rows, 16, mode=mode, dtype=dtype)
    indices, offsets = make_bags(rows, B=9, max_len=5)
    out = ebc(indices, offsets)
    B = 9
    for t in range(3):
        lo, hi = int(offsets[t * B]), int(offsets[(t + 1) * B])
        ref = F.embedding_bag(
            indices[lo:hi],
            ebc.weight_of(t),
            offsets[t * B : (t + 1) * B + 1] - lo,
            mode=mode,
            include_last_offset=True,
        )
        torch.testing.assert_close(out[:, 16 * t : 16 * (t + 1)], ref, **TOL[dtype])


def test_empty_bags_and_empty_batch():
    ebc = EmbeddingBagCollection([5, 6], [3, 2])
    offsets = torch.zeros(2 * 4 + 1, dtype=torch.int64)
    out = ebc(torch.zeros(0, dtype=torch.int64), offsets)
    assert torch.equal(out, torch.zeros(4, 5))
    out = ebc(torch.zeros(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    assert out.shape == (0, 5)


def test_single_index_bags_copy_rows_exactly():
    ebc = EmbeddingBagCollection([1000] * 3, 64)
    idx = torch.randint(0, 1000, (3 * 100,))
    out = ebc(idx, torch.arange(0, 301))
    expect = torch.cat([ebc.weight_of(t)[idx[t * 100 : (t + 1) * 100]] for t in range(3)], 1)
    assert torch.equal(out, expect)


# [4096, 8 + 8 + 512] fp32 outputs are 8.65 MB, over the 8 MiB from which
# pooled outputs are written past the caches (kStreamOutputBytes,
# csrc/cpu/pooling.h); table 1 starts mid-line and is written through them.
STREAMED = dict(rows=[30, 40, 50], dims=[8, 8, 512], B=4096)


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("mode, weighted", POOLINGS)
def test_streamed_output_has_the_bits_of_a_cached_one(mode, weighted, index_dtype):
    rows, B = STREAMED["rows"], STREAMED["B"]
    ebc = EmbeddingBagCollection(rows, STREAMED["dims"], mode=mode)
    indices, offsets = make_bags(rows, B=B, max_len=3, index_dtype=index_dtype)
    psw = psw_for(indices, torch.float32) if weighted else None
    with torch.no_grad():
        out = ebc(indices, offsets, psw)
        small_idx, small_off, pos = first_bags(indices, offsets, len(rows), B, 64)
        small = ebc(small_idx, small_off, psw[pos] if weighted else None)
    ref = reference.table_batched_embedding_bag(tables_of(ebc), indices, offsets, mode, psw)
    torch.testing.assert_close(out, ref)
    assert torch.equal(out[:64], small)


@settings(max_examples=40, deadline=None)
@given(
    T=st.integers(1, 5),
    B=st.integers(0, 20),
    max_len=st.integers(0, 8),
    D=st.lists(st.integers(1, 70), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(["sum", "mean"]),
    i32=st.booleans(),
)
def test_random_shapes(T, B, max_len, D, seed, mode, i32):
    dims = (D * T)[:T]
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, 100, (T,), generator=g).tolist()
    ebc = EmbeddingBagCollection(rows, dims, mode=mode)
    indices, offsets = make_bags(rows, B, max_len, torch.int32 if i32 else torch.int64, generator=g)
    out = ebc(indices, offsets)
    ref = reference.table_batched_embedding_bag(tables_of(ebc), indices, offsets, mode)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode, weighted", POOLINGS)
@pytest.mark.parametrize("dims", [8, [4, 16, 3]])
def test_dense_gradients_match_reference(dtype, mode, weighted, dims):
    rows = [30, 8, 50]
    ebc = EmbeddingBagCollection(rows, dims, mode=mode, dtype=dtype)
    indices, offsets = make_bags(rows, B=11, max_len=7)  # many repeated rows
    psw = psw_for(indices, dtype).requires_grad_(weighted) if weighted else None
    out = ebc(indices, offsets, psw)
    grad = torch.randn(out.shape).to(dtype)
    out.backward(grad)

    w_ref = ebc.weight.detach().clone().requires_grad_()
    psw_ref = psw.detach().clone().requires_grad_() if weighted else None
    tables = [
        w_ref.view(-1)[ebc._woff[t] : ebc._woff[t] + n * d].view(n, d)
        for t, (n, d) in enumerate(zip(rows, ebc.embedding_dims))
    ]
    reference.table_batched_embedding_bag(tables, indices, offsets, mode, psw_ref).backward(grad)
    torch.testing.assert_close(ebc.weight.grad, w_ref.grad, **TOL[dtype])
    if weighted:
        assert psw.grad.dtype == dtype
        torch.testing.assert_close(psw.grad, psw_ref.grad, **TOL[dtype])


@pytest.mark.parametrize("weighted", [False, True])
def test_dense_gradient_of_a_batch_beyond_the_cached_sort_scratch(weighted):
    # Over 4.2M lookups the sort's scratch (kCachedScratchBytes, 64 MiB, in
    # sorted_lookups.h) is allocated for the call instead of kept per thread;
    # a small call before and after uses the cached one.
    rows, B, n = [1000, 300], 64, 4_300_000
    ebc = EmbeddingBagCollection(rows, 4)
    g = torch.Generator().manual_seed(0)
    for big in (False, True, False):
        per_table = n // 2 if big else 200
        lengths = torch.full((2 * B,), per_table // B)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        indices = torch.cat([torch.randint(0, r, (per_table // B * B,), generator=g) for r in rows])
        psw = torch.rand(indices.numel(), generator=g) if weighted else None
        grad = torch.randn(B, 8, generator=g)
        ebc.weight.grad = None
        ebc(indices, offsets, psw).backward(grad)
        w_ref = ebc.weight.detach().clone().requires_grad_()
        tables = [
            w_ref.view(-1)[ebc._woff[t] : ebc._woff[t] + r * 4].view(r, 4)
            for t, r in enumerate(rows)
        ]
        reference.table_batched_embedding_bag(tables, indices, offsets, "sum", psw).backward(grad)
        torch.testing.assert_close(ebc.weight.grad, w_ref.grad, atol=1e-3, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:Input #")
def test_gradcheck_per_sample_weights_and_weights():
    rows = [6, 4]
    ebc = EmbeddingBagCollection(rows, [3, 2])
    indices, offsets = make_bags(rows, B=3, max_len=3)
    psw = torch.rand(indices.numel(), requires_grad=True)
    w = ebc.weight.detach().clone().requires_grad_()

    def f(w, psw):
        return dlrm_ops.table_batched_embedding_bag(
            w,
            ebc.weights_offsets,
            ebc.dim_offsets,
            ebc.rows,
            indices,
            offsets,
            per_sample_weights=psw,
        )

    # fp32 kernels: finite differences with a large step and matching tolerance.
    assert torch.autograd.gradcheck(f, (w, psw), eps=1e-2, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dims", [16, [4, 8]])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_sparse_gradient_equals_dense(dims, mode):
    rows = [20, 30]
    dense = EmbeddingBagCollection(rows, dims, mode=mode)
    sparse = EmbeddingBagCollection(rows, dims, mode=mode, sparse=True)
    sparse.load_state_dict(dense.state_dict())
    indices, offsets = make_bags(rows, B=8, max_len=5)
    grad = torch.randn(8, dense.total_dim)
    dense(indices, offsets).backward(grad)
    sparse(indices, offsets).backward(grad)
    assert sparse.weight.grad.is_sparse
    torch.testing.assert_close(sparse.weight.grad.to_dense(), dense.weight.grad)


@pytest.mark.parametrize("opt", ["SGD", "Adagrad", "SparseAdam"])
def test_sparse_gradient_trains_with_torch_optim_like_nn_embedding_bag(opt):
    torch.manual_seed(0)
    ours = dlrm_ops.nn.EmbeddingBag(50, 8, mode="sum", sparse=True)
    ref = torch.nn.EmbeddingBag(50, 8, mode="sum", sparse=True)
    ref.load_state_dict(ours.state_dict())
    make = lambda p: getattr(torch.optim, opt)(p, lr=0.1)  # noqa: E731
    o1, o2 = make(ours.parameters()), make(ref.parameters())
    for step in range(4):
        inp = torch.randint(0, 50, (16, 3))
        for m, o in ((ours, o1), (ref, o2)):
            o.zero_grad()
            m(inp).pow(2).sum().backward()
            o.step()
    torch.testing.assert_close(ours.weight, ref.weight)


def test_dense_backward_is_deterministic_across_threads():
    rows = [100]
    ebc = EmbeddingBagCollection(rows, 32)
    indices, offsets = make_bags(rows, B=4000, max_len=10)
    grad = torch.randn(4000, 32)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            ebc.weight.grad = None
            ebc(indices, offsets).backward(grad)
            results.append(ebc.weight.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_chunks_taken_by_other_threads_cover_every_lookup():
    # Forward and update share each thread's part out in 32 chunks, which
    # threads done early take from the others: 7 threads on this machine's
    # cores make them take many. Every bag and every run exactly once.
    rows = [3000, 40, 900]
    indices, offsets = make_bags(
        rows, B=3000, max_len=12, generator=torch.Generator().manual_seed(1)
    )
    grad = torch.randn(3000, 3 * 16, generator=torch.Generator().manual_seed(2))
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 7):
            torch.set_num_threads(n)
            ebc = EmbeddingBagCollection(rows, 16, optimizer="sgd", lr=0.1)
            with torch.no_grad():
                ebc.weight.copy_(torch.linspace(-1, 1, ebc.weight.numel()).view_as(ebc.weight))
            tables = [t.detach().clone() for t in tables_of(ebc)]
            out = ebc(indices, offsets)
            torch.testing.assert_close(
                out, reference.table_batched_embedding_bag(tables, indices, offsets)
            )
            out.backward(grad)
            results.append(ebc.weight.detach().clone())
    finally:
        torch.set_num_threads(threads)
    dense = [t.requires_grad_() for t in tables]
    reference.table_batched_embedding_bag(dense, indices, offsets).backward(grad)
    expected = torch.cat([(t - 0.1 * t.grad).detach() for t in dense])
    torch.testing.assert_close(results[0], expected.view_as(results[0]))
    assert torch.equal(results[0], results[1])


def test_inputs_are_not_modified():
    rows = [10, 10]
    ebc = EmbeddingBagCollection(rows, 4)
    indices, offsets = make_bags(rows, B=5, max_len=4, index_dtype=torch.int32)
    psw = torch.rand(indices.numel())
    before = [t.clone() for t in (indices, offsets, psw, ebc.weight.detach())]
    ebc(indices, offsets, psw).sum().backward()
    for a, b in zip(before, (indices, offsets, psw, ebc.weight.detach())):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- bad input


def _call(ebc, indices, offsets, psw=None):
    return ebc(indices, offsets, psw)


@pytest.mark.parametrize(
    "bad, pos, msg",
    [
        (7, 3, r"indices\[3\] = 7 is out of range for table 0 with 5 rows \(bag 1 of table 0\)"),
        (-1, 5, r"indices\[5\] = -1 is out of range for table 1 with 6 rows"),
        (6, 6, r"indices\[6\] = 6 is out of range for table 1 with 6 rows \(bag 1 of table 1\)"),
    ],
)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_out_of_range_index_names_table_and_position(bad, pos, msg, index_dtype):
    ebc = EmbeddingBagCollection([5, 6], 4)
    indices = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2], dtype=index_dtype)
    offsets = torch.tensor([0, 3, 5, 6, 8], dtype=index_dtype)
    indices[pos] = bad
    with pytest.raises(RuntimeError, match=msg):
        ebc(indices, offsets)


def test_out_of_range_index_in_dense_backward():
    ebc = EmbeddingBagCollection([5], 4)
    with pytest.raises(RuntimeError, match=r"indices\[1\] = 9 is out of range"):
        torch.ops.dlrm_ops.embedding_bag_backward_dense(
            torch.ones(2, 4),
            ebc.weight.detach(),
            ebc.weights_offsets,
            ebc.dim_offsets,
            ebc.rows,
            torch.tensor([0, 9, 2]),
            torch.tensor([0, 2, 3]),
            pooling=ops.Pooling.SUM,
            per_sample_weights=None,
        )


@pytest.mark.parametrize(
    "offsets, msg",
    [
        ([1, 2, 4], r"offsets\[0\] must be 0, got 1"),
        (
            [0, 3, 2, 4, 4],
            r"offsets must be non-decreasing, but offsets\[2\] = 2 < offsets\[1\] = 3 "
            r"\(table 0, bag 1\)",
        ),
        ([0, 1, 2, 3, 3], r"offsets\[-1\] must equal the number of indices \(4\), got 3"),
        ([0, 1, 4, 4], r"offsets must have T\*B\+1 entries for T = 2 tables, got 4"),
    ],
)
def test_bad_offsets(offsets, msg):
    ebc = EmbeddingBagCollection([5, 5], 4)
    with pytest.raises(RuntimeError, match=msg):
        ebc(torch.tensor([0, 1, 2, 3]), torch.tensor(offsets))


# Drops before, at and after the vectorised check's block edges (8 and 16
# lanes) and, in 40000 bags, its threads' chunks (16384 offsets or more each).
@pytest.mark.parametrize(
    "pos,bags",
    [
        (1, 100),
        (7, 100),
        (8, 100),
        (15, 100),
        (16, 100),
        (17, 100),
        (64, 100),
        (99, 100),
        (16384, 40000),
        (16385, 40000),
        (20001, 40000),
        (39999, 40000),
    ],
)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_offsets_dropping_anywhere_are_named(pos, bags, index_dtype):
    ebc = EmbeddingBagCollection([5], 4)
    indices, offsets = offsets_dropping_at(pos, index_dtype, bags)
    with pytest.raises(
        RuntimeError,
        match=rf"offsets must be non-decreasing, but offsets\[{pos}\] "
        rf"= {pos - 2} < offsets\[{pos - 1}\] = {pos - 1}",
    ):
        ebc(indices, offsets)


def test_bad_dtypes_and_shapes():
    ebc = EmbeddingBagCollection([5, 5], 4)
    idx, off = torch.tensor([0, 1]), torch.tensor([0, 1, 1, 2, 2])
    with pytest.raises(
        RuntimeError, match=r"indices must have dtype in \{int32, int64\}, got float32"
    ):
        ebc(idx.float(), off)
    with pytest.raises(
        RuntimeError, match=r"offsets must have the dtype of indices \(int64\), got int32"
    ):
        ebc(idx, off.int())
    with pytest.raises(RuntimeError, match=r"indices must be 1-D, got 2-D"):
        ebc(idx.view(1, 2), off)
    with pytest.raises(
        RuntimeError, match=r"per_sample_weights must have one entry per index \(2\), got 3"
    ):
        ebc(idx, off, torch.ones(3))
    with pytest.raises(RuntimeError, match=r"per_sample_weights must have dtype"):
        ebc(idx, off, torch.ones(2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"indices must be contiguous"):
        ebc(torch.tensor([0, 9, 1, 9])[::2], off)
    mean = EmbeddingBagCollection([5, 5], 4, mode="mean")
    with pytest.raises(
        RuntimeError, match=r"per_sample_weights is only supported with sum pooling"
    ):
        mean(idx, off, torch.ones(2))
    with pytest.raises(ValueError, match=r"mode must be one of"):
        EmbeddingBagCollection([5], 4, mode="max")
    with pytest.raises(ValueError, match=r"embedding_dim lists 1 dims for 2 tables"):
        EmbeddingBagCollection([5, 5], [4])


def test_bad_table_metadata():
    ebc = EmbeddingBagCollection([5, 5], 4)
    idx, off = torch.tensor([0, 1]), torch.tensor([0, 1, 1, 2, 2])
    f = dlrm_ops.table_batched_embedding_bag
    with pytest.raises(
        RuntimeError, match=r"weights_offsets must have one entry per table \(2\), got 3"
    ):
        f(ebc.weight, torch.zeros(3, dtype=torch.int64), ebc.dim_offsets, ebc.rows, idx, off)
    with pytest.raises(
        RuntimeError,
        match=r"table 1 \(9 rows of dim 4 at element 20\) does not fit in weights of 40 elements",
    ):
        f(ebc.weight, ebc.weights_offsets, ebc.dim_offsets, torch.tensor([5, 9]), idx, off)
    with pytest.raises(RuntimeError, match=r"total_dim must equal dim_offsets\[-1\] = 8, got 7"):
        f(ebc.weight, ebc.weights_offsets, ebc.dim_offsets, ebc.rows, idx, off, total_dim=7)
    with pytest.raises(RuntimeError, match=r"weights must have dtype in"):
        f(ebc.weight.double(), ebc.weights_offsets, ebc.dim_offsets, ebc.rows, idx, off)


# ----------------------------------------------------------- module contract


def test_collection_state_dict_round_trip(tmp_path):
    a = EmbeddingBagCollection([10, 20], [4, 8])
    assert list(a.state_dict()) == ["weight"]
    torch.save(a.state_dict(), tmp_path / "ebc.pt")
    b = EmbeddingBagCollection([10, 20], [4, 8])
    b.load_state_dict(torch.load(tmp_path / "ebc.pt"))
    assert torch.equal(a.weight, b.weight)
    assert a.weight_of(1).shape == (20, 8)
    assert a.weight_of(1).data_ptr() == a.weight.data_ptr() + 40 * 4


def _compare_drop_in(ours, ref, *args, **kwargs):
    torch.testing.assert_close(ours(*args, **kwargs), ref(*args, **kwargs))


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("include_last_offset", [False, True])
def test_embedding_bag_drop_in(mode, include_last_offset):
    torch.manual_seed(0)
    ref = torch.nn.EmbeddingBag(30, 6, mode=mode, include_last_offset=include_last_offset)
    ours = dlrm_ops.nn.EmbeddingBag(30, 6, mode=mode, include_last_offset=include_last_offset)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    inp = torch.randint(0, 30, (10,))
    offsets = torch.tensor([0, 3, 3, 7] + ([10] if include_last_offset else []))
    _compare_drop_in(ours, ref, inp, offsets)
    _compare_drop_in(ours, ref, inp.int(), offsets.int())
    _compare_drop_in(ours, ref, torch.randint(0, 30, (4, 5)))
    if mode == "sum":
        _compare_drop_in(ours, ref, inp, offsets, per_sample_weights=torch.rand(10))
        _compare_drop_in(
            ours, ref, torch.randint(0, 30, (4, 5)), per_sample_weights=torch.rand(4, 5)
        )


def test_convert_swaps_modules_and_keeps_weights():
    model = torch.nn.Sequential(
        torch.nn.EmbeddingBag(20, 4, mode="sum"),
        torch.nn.ModuleDict({"e": torch.nn.EmbeddingBag(10, 3)}),
    )
    w0 = model[0].weight
    x = torch.randint(0, 10, (6, 2))
    expect = (model[0](x), model[1]["e"](x))
    dlrm_ops.convert(model)
    assert type(model[0]) is dlrm_ops.nn.EmbeddingBag and model[0].weight is w0
    assert type(model[1]["e"]) is dlrm_ops.nn.EmbeddingBag
    torch.testing.assert_close(model[0](x), expect[0])
    torch.testing.assert_close(model[1]["e"](x), expect[1])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_norm=1.0),
        dict(mode="max"),
        dict(padding_idx=0),
        dict(scale_grad_by_freq=True),
        dict(dtype=torch.float64),
    ],
)
def test_converted_options_the_kernels_lack_run_torch(kwargs):
    """A converted model works wherever it did: these options run PyTorch's
    own kernel, gradients included."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.EmbeddingBag(20, 4, **kwargs))
    ref = copy.deepcopy(model)
    dlrm_ops.convert(model)
    assert type(model[0]) is dlrm_ops.nn.EmbeddingBag
    x, off = torch.tensor([0, 3, 3, 7, 0]), torch.tensor([0, 2])
    out, expect = model[0](x, off), ref[0](x, off)
    torch.testing.assert_close(out, expect)
    out.pow(2).sum().backward()
    expect.pow(2).sum().backward()
    torch.testing.assert_close(model[0].weight.grad, ref[0].weight.grad)


def test_drop_in_raises_torchs_exception_types():
    for mode in ("sum", "mean"):
        ours, theirs = (
            dlrm_ops.nn.EmbeddingBag(10, 4, mode=mode),
            torch.nn.EmbeddingBag(10, 4, mode=mode),
        )
        x, off = torch.tensor([1, 2, 3]), torch.tensor([0, 2])
        for psw in (torch.rand(2), torch.rand(3), torch.rand(3).double()):
            try:
                theirs(x, off, per_sample_weights=psw)
            except Exception as e:  # noqa: BLE001 (the type is what is compared)
                with pytest.raises(type(e)):
                    ours(x, off, per_sample_weights=psw)
            else:
                ours(x, off, per_sample_weights=psw)


def test_include_last_offset_ends_at_the_last_offset():
    """torch's bags end at offsets[-1]: indices past it take no part."""
    torch.manual_seed(0)
    x, off, psw = torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2]), torch.rand(4)
    for mode in ("mean", "sum"):  # torch divides a mean's last bag by the indices to the end
        theirs = torch.nn.EmbeddingBag(10, 4, include_last_offset=True, mode=mode)
        ours = dlrm_ops.convert(copy.deepcopy(torch.nn.Sequential(theirs)))[0]
        torch.testing.assert_close(ours(x, off), theirs(x, off))
    torch.testing.assert_close(ours(x, off, psw), theirs(x, off, psw))


def test_convert_shares_a_module_registered_twice_and_refuses_subclasses():
    bag = torch.nn.EmbeddingBag(10, 4)
    model = torch.nn.Module()
    model.a, model.b = bag, bag
    model.inner = torch.nn.Sequential(bag)
    dlrm_ops.convert(model)
    assert type(model.a) is dlrm_ops.nn.EmbeddingBag
    assert model.a is model.b is model.inner[0]

    class Mine(torch.nn.EmbeddingBag):
        pass

    model = torch.nn.Sequential(torch.nn.EmbeddingBag(10, 4), Mine(10, 4))
    with pytest.raises(
        NotImplementedError, match=r"subclasses of torch.nn.EmbeddingBag: 1 \(Mine\)"
    ):
        dlrm_ops.convert(model)
    assert type(model[0]) is torch.nn.EmbeddingBag  # all or nothing


# ------------------------------------------------------ opcheck and compile


def test_collection_under_torch_compile_fullgraph():
    rows = [40, 30, 20]

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ebc = EmbeddingBagCollection(rows, 8)
            self.lin = torch.nn.Linear(24, 1)

        def forward(self, indices, offsets):
            return self.lin(self.ebc(indices, offsets)).sum()

    model = Model()
    compiled = torch.compile(model, fullgraph=True)
    for B in (6, 9):
        indices, offsets = make_bags(rows, B=B, max_len=4)
        expect = model(indices, offsets)
        expect.backward()
        g_eager = model.ebc.weight.grad.clone()
        model.zero_grad()
        got = compiled(indices, offsets)
        got.backward()
        torch.testing.assert_close(got, expect)
        torch.testing.assert_close(model.ebc.weight.grad, g_eager)
        model.zero_grad()


@pytest.mark.skipif(not thp_available(), reason="needs Linux with transparent huge pages")
def test_large_tables_are_backed_by_huge_pages():
    before = anon_huge_kib()
    ebc = EmbeddingBagCollection([300_000] * 2, 32, optimizer="adagrad")  # 2 x 77 MB
    assert anon_huge_kib() - before >= 50 * 1024  # of 2 x 77 MB (compaction may miss a few)
    small = EmbeddingBagCollection([10], 4)  # below the threshold: plain pages, still correct
    assert small.weight.shape == (10, 4) and ebc.momentum1.abs().sum() == 0


@pytest.mark.skipif(not thp_available(), reason="needs Linux with transparent huge pages")
def test_reused_memory_comes_back_on_huge_pages():
    """Memory already touched on 4 KiB pages, as tcmalloc or jemalloc hand
    back a freed tensor's span, is moved onto huge pages, not left as it was."""
    t = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # no advice: 4 KiB pages ("madvise")
    on_huge_pages(t).fill_(2)
    assert huge_kib_in(t) >= 48 * 1024  # of 64 MiB (compaction may miss a few)
    assert bool((t == 2).all())


TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


@pytest.mark.skipif(
    not (thp_available() and os.path.exists(TCMALLOC)),
    reason="needs transparent huge pages and tcmalloc",
)
@pytest.mark.skipif(
    "LD_PRELOAD" in os.environ,
    reason="sets its own allocator (scripts/test_sanitized.sh preloads ASan)",
)
def test_table_on_huge_pages_after_a_freed_tensor_under_tcmalloc():
    """The benchmark's case: under tcmalloc a table built after a big tensor
    was freed reuses that tensor's 4 KiB pages unless they are dropped."""
    code = (
        "import torch; from utils import huge_kib_in; "
        "from dlrm_ops.nn import EmbeddingBagCollection as E; "
        "t = torch.empty(160 << 20, dtype=torch.uint8).fill_(1); del t; "
        "e = E([600_000], 64); print(huge_kib_in(e.weight))"
    )
    env = dict(os.environ, LD_PRELOAD=TCMALLOC)
    res = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        cwd=os.path.dirname(__file__),
    )
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.split()[-1]) >= 100 * 1024  # of 146 MiB
