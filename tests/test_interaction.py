"""Pairwise dot interaction against the bmm+gather reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dlrm_ops
from dlrm_ops import ops, reference
from dlrm_ops.nn import DotInteraction, EmbeddingBagCollection

from utils import TOL, make_bags

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SETTINGS = [(s, o) for s in (False, True) for o in ("tril", "triu")]


def inputs(B, T, D, dtype=torch.float32, flat=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(B, D, generator=g).to(dtype)
    sparse = torch.randn(B, T, D, generator=g).to(dtype)
    return dense, sparse.view(B, T * D) if flat else sparse


def tol(dtype, D):  # fp16/bf16 outputs round sums of D products
    return dict(atol=TOL[dtype]["atol"] * max(1, D**0.5), rtol=TOL[dtype]["rtol"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("self_interaction, order", SETTINGS)
@pytest.mark.parametrize("B, T, D", [(1, 1, 1), (7, 26, 64), (3, 100, 8), (4, 5, 33), (2, 3, 128)])
def test_forward_matches_reference(dtype, self_interaction, order, B, T, D):
    dense, sparse = inputs(B, T, D, dtype)
    out = dlrm_ops.dot_interaction(dense, sparse, self_interaction=self_interaction, order=order)
    ref = reference.dot_interaction(dense, sparse, self_interaction, order)
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, **tol(dtype, D))


def test_orders_are_dlrm_and_torchrec_conventions():
    dense = torch.tensor([[1.0, 0.0]])
    sparse = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])  # x0=(1,0) x1=(2,0) x2=(0,3)
    # tril: (1,0) (2,0) (2,1) -> 2, 0, 0 ; with self: (0,0) (1,0) (1,1) (2,0) (2,1) (2,2)
    assert dlrm_ops.dot_interaction(dense, sparse).tolist() == [[1, 0, 2, 0, 0]]
    assert dlrm_ops.dot_interaction(dense, sparse, self_interaction=True).tolist() == [
        [1, 0, 1, 2, 4, 0, 0, 9]
    ]
    # triu: (0,1) (0,2) (1,2)
    sparse2 = torch.tensor([[[2.0, 0.0], [1.0, 3.0]]])
    assert dlrm_ops.dot_interaction(dense, sparse2, order="triu").tolist() == [[1, 0, 2, 1, 2]]
    assert dlrm_ops.dot_interaction(dense, sparse2, order="tril").tolist() == [[1, 0, 2, 1, 2]]


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(0, 9),
    T=st.integers(1, 40),
    D=st.integers(1, 70),
    self_i=st.booleans(),
    order=st.sampled_from(["tril", "triu"]),
    flat=st.booleans(),
    seed=st.integers(0, 999),
)
def test_random_shapes(B, T, D, self_i, order, flat, seed):
    dense, sparse = inputs(B, T, D, flat=flat, seed=seed)
    out = dlrm_ops.dot_interaction(dense, sparse, self_interaction=self_i, order=order)
    ref = reference.dot_interaction(dense, sparse, self_i, order)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("self_interaction, order", SETTINGS)
@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize(
    "T, D", [(9, 24), (26, 32), (5, 64)]
)  # D % 16 == 0: fp32 rows used in place
def test_gradients_match_reference(dtype, self_interaction, order, flat, T, D):
    B = 6
    dense, sparse = inputs(B, T, D, dtype, flat)
    d1, s1 = dense.clone().requires_grad_(), sparse.clone().requires_grad_()
    d2, s2 = dense.clone().requires_grad_(), sparse.clone().requires_grad_()
    out = dlrm_ops.dot_interaction(d1, s1, self_interaction=self_interaction, order=order)
    grad = torch.randn(out.shape).to(dtype)
    out.backward(grad)
    reference.dot_interaction(d2, s2, self_interaction, order).backward(grad)
    assert s1.grad.shape == sparse.shape
    torch.testing.assert_close(d1.grad, d2.grad, **tol(dtype, T))
    torch.testing.assert_close(s1.grad, s2.grad, **tol(dtype, T))


def test_gradcheck():
    dense, sparse = inputs(3, 4, 5)
    dense, sparse = dense.requires_grad_(), sparse.requires_grad_()
    for self_i, order in SETTINGS:
        f = lambda d, s: dlrm_ops.dot_interaction(d, s, self_interaction=self_i, order=order)  # noqa: E731
        assert torch.autograd.gradcheck(f, (dense, sparse), eps=1e-2, atol=1e-2, rtol=1e-2)


def test_reads_collection_output_in_place_and_strided_sparse():
    ebc = EmbeddingBagCollection([10] * 4, 8)
    indices, offsets = make_bags([10] * 4, B=5, max_len=3)
    pooled = ebc(indices, offsets)  # [B, 32]
    dense = torch.randn(5, 8)
    out = dlrm_ops.dot_interaction(dense, pooled)
    torch.testing.assert_close(out, reference.dot_interaction(dense, pooled))
    for D in (8, 32):  # D = 32: the fp32 rows are read in place
        dense = torch.randn(5, D)
        wide = torch.randn(5, 5 * D)
        strided = wide[:, D:].requires_grad_()  # sample stride 5 D, T*D = 4 D
        out = dlrm_ops.dot_interaction(dense, strided)
        torch.testing.assert_close(out, reference.dot_interaction(dense, strided))
        g = torch.randn_like(out)
        (got,) = torch.autograd.grad(out, strided, g)
        (expect,) = torch.autograd.grad(reference.dot_interaction(dense, strided), strided, g)
        torch.testing.assert_close(got, expect)
    dense = torch.randn(5, 8)
    both = torch.randn(5, 4, 8).transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous
    torch.testing.assert_close(
        dlrm_ops.dot_interaction(dense, both), reference.dot_interaction(dense, both)
    )


def test_inputs_not_modified():
    dense, sparse = inputs(4, 3, 5)
    d0, s0 = dense.clone(), sparse.clone()
    dlrm_ops.dot_interaction(dense.requires_grad_(), sparse.requires_grad_()).sum().backward()
    assert torch.equal(dense.detach(), d0) and torch.equal(sparse.detach(), s0)


@pytest.mark.parametrize(
    "dense, sparse, kwargs, exc, msg",
    [
        (
            torch.randn(2, 4),
            torch.randn(2, 3, 5),
            {},
            RuntimeError,
            r"sparse must have the dim of dense \(4\) in its last axis, got 5",
        ),
        (
            torch.randn(2, 4),
            torch.randn(3, 3, 4),
            {},
            RuntimeError,
            r"sparse must have the batch size of dense \(2\), got 3",
        ),
        (
            torch.randn(2, 4),
            torch.randn(2, 10),
            {},
            RuntimeError,
            r"sparse has 10 columns, not a multiple of the dense dim D = 4",
        ),
        (torch.randn(2, 4, 1), torch.randn(2, 8), {}, RuntimeError, r"dense must be 2-D, got 3-D"),
        (
            torch.randn(2, 4),
            torch.randn(8),
            {},
            RuntimeError,
            r"sparse must be \[B, T, D\] or \[B, T\*D\], got 1-D",
        ),
        (
            torch.randn(2, 4),
            torch.randn(2, 8).double(),
            {},
            RuntimeError,
            r"sparse must have the dtype of dense \(float32\), got float64",
        ),
        (
            torch.randn(2, 4),
            torch.randn(2, 0, 4),
            {},
            RuntimeError,
            r"sparse must hold at least one feature",
        ),
        (
            torch.randn(2, 4),
            torch.randn(2, 8),
            dict(order="diag"),
            ValueError,
            r"order must be one of",
        ),
    ],
)
def test_bad_input(dense, sparse, kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        dlrm_ops.dot_interaction(dense, sparse, **kwargs)


def test_module():
    m = DotInteraction(self_interaction=True, order="triu")
    dense, sparse = inputs(3, 5, 4)
    assert m(dense, sparse).shape == (3, DotInteraction.output_dim(5, 4, True))
    with pytest.raises(ValueError, match="order must be one of"):
        DotInteraction(order="x")


def test_opcheck():
    dense, sparse = inputs(4, 6, 8)
    for self_i, order in ((False, ops.InteractionOrder.TRIL), (True, ops.InteractionOrder.TRIU)):
        torch.library.opcheck(
            torch.ops.dlrm_ops.dot_interaction,
            (dense.requires_grad_(), sparse.requires_grad_(), self_i, order),
        )
        grad = torch.randn(4, DotInteraction.output_dim(6, 8, self_i))
        torch.library.opcheck(
            torch.ops.dlrm_ops.dot_interaction_backward,
            (grad, dense.detach(), sparse.detach(), self_i, order),
        )


def test_torch_compile_fullgraph():
    lin = torch.nn.Linear(8 + 21, 1)
    m = DotInteraction()

    def f(dense, sparse):
        return lin(m(dense, sparse)).sum()

    compiled = torch.compile(f, fullgraph=True)
    for B in (3, 5):
        dense, sparse = inputs(B, 6, 8)
        d1, s1 = dense.clone().requires_grad_(), sparse.clone().requires_grad_()
        d2, s2 = dense.clone().requires_grad_(), sparse.clone().requires_grad_()
        f(d1, s1).backward()
        compiled(d2, s2).backward()
        torch.testing.assert_close(d1.grad, d2.grad)
        torch.testing.assert_close(s1.grad, s2.grad)


@pytest.mark.parametrize("order", ["tril", "triu"])
@pytest.mark.parametrize("self_interaction", [False, True])
@pytest.mark.parametrize("T, D", [(3, 32), (2, 8), (20, 48)])
def test_samples_split_over_threads_stay_separate(order, self_interaction, T, D):
    """Many samples split over threads: no sample's writes reach another's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check_split_samples(order, self_interaction, T, D)
    finally:
        torch.set_num_threads(threads)


def check_split_samples(order, self_interaction, T, D):
    dense, sparse = inputs(257, T, D, torch.float32)
    out = dlrm_ops.dot_interaction(dense, sparse, self_interaction=self_interaction, order=order)
    ref = reference.dot_interaction(dense, sparse, self_interaction, order)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(out)
    d, s = dense.clone().requires_grad_(), sparse.clone().requires_grad_()
    got = torch.autograd.grad(
        dlrm_ops.dot_interaction(d, s, self_interaction=self_interaction, order=order), (d, s), g
    )
    expect = torch.autograd.grad(
        reference.dot_interaction(d, s, self_interaction, order), (d, s), g
    )
    torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-4)


def test_list_of_features_read_in_place_or_concatenated():
    dense = torch.randn(5, 8)
    pooled = torch.randn(5, 3 * 8, requires_grad=True)
    ly = list(pooled.split(8, dim=1))  # an EmbeddingBagList's output
    assert dlrm_ops.ops._features(ly) is pooled
    torch.testing.assert_close(
        dlrm_ops.dot_interaction(dense, ly), dlrm_ops.dot_interaction(dense, pooled)
    )
    apart = [torch.randn(5, 8) for _ in range(3)]
    torch.testing.assert_close(
        dlrm_ops.dot_interaction(dense, apart), dlrm_ops.dot_interaction(dense, torch.cat(apart, 1))
    )
    assert dlrm_ops.ops._features(ly[::-1]) is not pooled  # out of order: a copy
