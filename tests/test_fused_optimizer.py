"""The optimizer fused into the embedding backward against torch.optim and the
reference, with repeated indices over several steps."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dlrm_ops
from dlrm_ops import ops, reference
from dlrm_ops.nn import EmbeddingBagCollection
from dlrm_ops.optimizers import OPTIMIZERS

from utils import TOL, make_bags

ROWS = [40, 7, 25]


def fused(optimizer, dims=8, dtype=torch.float32, mode="sum", **kw):
    torch.manual_seed(0)
    return EmbeddingBagCollection(ROWS, dims, mode=mode, dtype=dtype, optimizer=optimizer, **kw)


def torch_tables(ebc):
    """One nn.EmbeddingBag(sparse=True) per table, same weights."""
    tables = []
    for t, (n, d) in enumerate(zip(ebc.num_embeddings, ebc.embedding_dims)):
        m = torch.nn.EmbeddingBag(n, d, mode=ebc.mode, sparse=True, include_last_offset=True)
        with torch.no_grad():
            m.weight.copy_(ebc.weight_of(t).float())
        tables.append(m)
    return tables


def run_torch(tables, indices, offsets, psw, grad):
    B = (offsets.numel() - 1) // len(tables)
    outs = []
    for t, m in enumerate(tables):
        lo, hi = int(offsets[t * B]), int(offsets[(t + 1) * B])
        outs.append(
            m(
                indices[lo:hi],
                offsets[t * B : (t + 1) * B + 1] - lo,
                per_sample_weights=None if psw is None else psw[lo:hi],
            )
        )
    torch.cat(outs, 1).backward(grad)


# 8: every kernel's any-D path; the others are whole vectors of 16 columns,
# which the kernels sum and update in registers (up to 128 on AVX-512).
DIMS = [8, [16, 48, 128]]


def batches(steps=4, B=12, max_len=6, index_dtype=torch.int64, total_dim=8 * len(ROWS)):
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        indices, offsets = make_bags(ROWS, B, max_len, index_dtype, generator=g)
        grad = torch.randn(B, total_dim, generator=g)
        yield indices, offsets, grad


@pytest.mark.parametrize(
    "optimizer, torch_opt",
    [
        ("sgd", lambda p: torch.optim.SGD(p, lr=0.1)),
        ("adagrad", lambda p: torch.optim.Adagrad(p, lr=0.1)),
        ("adam", lambda p: torch.optim.SparseAdam(p, lr=0.1)),
    ],
)
@pytest.mark.parametrize("mode, weighted", [("sum", False), ("sum", True), ("mean", False)])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dims", DIMS)
def test_matches_torch_optim(optimizer, torch_opt, mode, weighted, index_dtype, dims):
    ebc = fused(optimizer, dims=dims, mode=mode, lr=0.1)
    tables = torch_tables(ebc)
    opt = torch_opt([p for m in tables for p in m.parameters()])
    for indices, offsets, grad in batches(index_dtype=index_dtype, total_dim=ebc.total_dim):
        psw = torch.rand(indices.numel()) if weighted else None
        ebc(indices, offsets, psw).backward(grad)
        opt.zero_grad()
        run_torch(tables, indices, offsets, psw, grad)
        opt.step()
    assert ebc.weight.grad is None
    for t, m in enumerate(tables):
        torch.testing.assert_close(ebc.weight_of(t), m.weight.detach(), atol=1e-5, rtol=1e-5)
    if optimizer == "adagrad":
        state = torch.cat([opt.state[m.weight]["sum"].view(-1) for m in tables])
        torch.testing.assert_close(ebc.momentum1, state)
    if optimizer == "adam":
        m1 = torch.cat([opt.state[m.weight]["exp_avg"].view(-1) for m in tables])
        m2 = torch.cat([opt.state[m.weight]["exp_avg_sq"].view(-1) for m in tables])
        torch.testing.assert_close(ebc.momentum1, m1)
        torch.testing.assert_close(ebc.momentum2, m2)
        assert int(ebc.step) == 4


def _radix_bags(rows, B, g):
    """Over 256 lookups per table, each row drawn from 40 hot ones: repeated
    within and across bags, as the radix-sorted walk must group them."""
    lengths = torch.randint(0, 7, (len(rows) * B,), generator=g)
    idx = []
    for t, n in enumerate(rows):
        hot = torch.randint(0, n, (40,), generator=g)
        hot[:3] = torch.tensor([0, n - 1, n // 2])  # first and last rows, a top-digit edge
        # Rows equal in their low digits (12-bit rows: 6-bit digits; 24-bit
        # rows: 8-bit digits): only the later digit passes part them.
        hot[3:9] = (
            torch.tensor(
                [7, 7 + (1 << 6), 7 + (1 << 8), 7 + (1 << 12), 7 + (1 << 16), 7 + (1 << 22)]
            )
            % n
        )
        cnt = int(lengths[t * B : (t + 1) * B].sum())
        idx.append(hot[torch.randint(0, 40, (cnt,), generator=g)])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return torch.cat(idx), offsets


@pytest.mark.parametrize("mode, weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_radix_sorted_walk_matches_torch(mode, weighted):
    # Rows of 12 and 24 bits: two and three radix digits.
    rows, B, D = [3000, (1 << 23) + 5], 200, 2
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(rows, D, mode=mode, optimizer="sgd", lr=0.1)
    tables = torch_tables(ebc)
    opt = torch.optim.SGD([m.weight for m in tables], lr=0.1)
    dense = EmbeddingBagCollection(rows, D, mode=mode)  # the dense gradient's walk
    with torch.no_grad():
        dense.weight.copy_(ebc.weight)
    g = torch.Generator().manual_seed(5)
    for step in range(2):
        indices, offsets = _radix_bags(rows, B, g)
        assert all(n > 256 for n in (offsets[B] - offsets[0], offsets[2 * B] - offsets[B]))
        psw = torch.rand(indices.numel(), generator=g) if weighted else None
        grad = torch.randn(B, D * len(rows), generator=g)
        if step == 0:
            dense(indices, offsets, psw).backward(grad)
        ebc(indices, offsets, psw).backward(grad)
        opt.zero_grad()
        run_torch(tables, indices, offsets, psw, grad)
        if step == 0:
            for t, m in enumerate(tables):
                torch.testing.assert_close(
                    dense.weight.grad.view(-1)[ebc._woff[t] :][: rows[t] * D].view(rows[t], D),
                    m.weight.grad.to_dense(),
                )
        opt.step()
    for t, m in enumerate(tables):
        torch.testing.assert_close(ebc.weight_of(t), m.weight.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("B", [200, 3000])
def test_duplicates_sum_in_lookup_order(B):
    """The sort keeps a row's lookups in lookup order: the dense gradient, a
    plain float32 sum over them in that order, has the bits of one."""
    rows, D = [3000, (1 << 23) + 5], 2
    ebc = EmbeddingBagCollection(rows, D)
    indices, offsets = _radix_bags(rows, B, torch.Generator().manual_seed(7))
    grad = torch.randn(B, D * len(rows), generator=torch.Generator().manual_seed(8))
    ebc(indices, offsets).backward(grad)
    idx, off, g = indices.numpy(), offsets.numpy(), grad.numpy()
    for t, n in enumerate(rows):
        acc = {}
        for b in range(B):
            for p in range(off[t * B + b], off[t * B + b + 1]):
                x = g[b, t * D : (t + 1) * D]
                r = int(idx[p])
                acc[r] = x.copy() if r not in acc else acc[r] + x
        got = ebc.weight.grad.view(-1)[ebc._woff[t] :][: n * D].view(n, D)
        rows_hit = sorted(acc)
        assert torch.equal(got[rows_hit], torch.from_numpy(np.stack([acc[r] for r in rows_hit])))


@pytest.mark.parametrize("mode, weighted", [("sum", False), ("sum", True), ("mean", False)])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_bags_match_torch(mode, weighted, threads, dtype):
    # Table 0 has 24 lookups per bag, so the walk copies its gradient rows
    # into a contiguous buffer (kCopyLookupsPerBag in sorted_lookups.h);
    # table 1 has at most 2, gathered in place. With 3 threads the walk is
    # split inside table 0, each thread copying the rows for its chunks.
    rows, B, D = [500, 300], 128, 16
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(rows, D, mode=mode, dtype=dtype, optimizer="sgd", lr=0.1)
    tables = torch_tables(ebc)
    opt = torch.optim.SGD([m.weight for m in tables], lr=0.1)
    dense = EmbeddingBagCollection(rows, D, mode=mode, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(ebc.weight)
    g = torch.Generator().manual_seed(7)
    lengths = torch.cat([torch.full((B,), 24), torch.randint(0, 3, (B,), generator=g)])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    indices = torch.cat(
        [
            torch.randint(0, 60, (24 * B,), generator=g),
            torch.randint(0, rows[1], (int(lengths[B:].sum()),), generator=g),
        ]
    )
    psw = torch.rand(indices.numel(), generator=g) if weighted else None
    grad = torch.randn(B, D * len(rows), generator=g).to(dtype)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        dense(indices, offsets, psw).backward(grad)
        ebc(indices, offsets, psw).backward(grad)
    finally:
        torch.set_num_threads(old)
    run_torch(tables, indices, offsets, psw, grad.float())
    tol = TOL[dtype]
    for t, m in enumerate(tables):
        torch.testing.assert_close(
            dense.weight.grad.view(-1)[ebc._woff[t] :][: rows[t] * D].view(rows[t], D).float(),
            m.weight.grad.to_dense(),
            **tol,
        )
    opt.step()
    for t, m in enumerate(tables):
        torch.testing.assert_close(ebc.weight_of(t).float(), m.weight.detach(), **tol)


def _reference_run(optimizer, ebc, data, weight_decay=0.0, lr=0.1, eps=1e-8):
    """The same steps through reference.sparse_optimizer_step, from copies of
    ebc's current weights."""
    tables = torch_tables(ebc)
    states = [dict() for _ in tables]
    for indices, offsets, grad, psw in data:
        for m in tables:
            m.weight.grad = None
        run_torch(tables, indices, offsets, psw, grad)
        for m, st in zip(tables, states):
            reference.sparse_optimizer_step(
                optimizer, m.weight, m.weight.grad, st, lr=lr, eps=eps, weight_decay=weight_decay
            )
    return tables, states


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dims", DIMS)
def test_matches_reference(optimizer, weight_decay, weighted, dims):
    ebc = fused(optimizer, dims=dims, lr=0.1, eps=1e-8, weight_decay=weight_decay)
    data = []
    for indices, offsets, grad in batches(total_dim=ebc.total_dim):
        psw = torch.rand(indices.numel()) if weighted else None
        data.append((indices, offsets, grad, psw))
    tables, states = _reference_run(optimizer, ebc, data, weight_decay)
    for indices, offsets, grad, psw in data:
        ebc(indices, offsets, psw).backward(grad)
    for t, m in enumerate(tables):
        torch.testing.assert_close(ebc.weight_of(t), m.weight.detach(), atol=1e-5, rtol=1e-5)
    if optimizer == "rowwise_adagrad":
        torch.testing.assert_close(ebc.momentum1, torch.cat([s["momentum1"] for s in states]))
    if optimizer == "rowwise_adam":
        torch.testing.assert_close(ebc.momentum2, torch.cat([s["momentum2"] for s in states]))


@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad", "adam", "rowwise_adam"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights(optimizer, dtype):
    ebc = fused(optimizer, dtype=dtype, lr=0.05)
    ref = torch_tables(ebc)
    for m in ref:
        m.weight.data = m.weight.data.to(dtype)
    states = [dict() for _ in ref]
    for indices, offsets, grad in batches():
        grad = grad.to(dtype)
        ebc(indices, offsets).backward(grad)
        for m in ref:
            m.weight.grad = None
        run_torch(ref, indices, offsets, None, grad)
        for m, st in zip(ref, states):
            reference.sparse_optimizer_step(optimizer, m.weight, m.weight.grad, st, lr=0.05)
    assert ebc.momentum1.dtype == torch.float32
    for t, m in enumerate(ref):
        torch.testing.assert_close(ebc.weight_of(t), m.weight.detach(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stochastic_rounding_is_unbiased_and_reproducible(dtype):
    def train():
        ebc = EmbeddingBagCollection(
            [1], 64, dtype=dtype, optimizer="sgd", lr=1e-4, stochastic_rounding=True
        )
        with torch.no_grad():
            ebc.weight.fill_(1.0)
        idx, off = torch.zeros(1, dtype=torch.int64), torch.tensor([0, 1])
        for _ in range(50):
            ebc(idx, off).backward(torch.ones(1, 64))
        return ebc.weight.detach().float()

    a, b = train(), train()
    assert torch.equal(a, b)
    # 50 steps of -1e-4 each: round-to-nearest would never move off 1.0 (the
    # step is below half an ulp); stochastic rounding tracks 0.995 on average.
    assert abs(a.mean().item() - 0.995) < 2e-3


_REGISTER_PATH_RUN = """
import itertools, sys, torch, dlrm_ops
from dlrm_ops.nn import EmbeddingBagCollection
from utils import make_bags
out = []
# fp32 SGD and row-wise Adagrad without weight decay update in registers
for optimizer, wd, dtype, (mode, weighted) in itertools.product(
        ("sgd", "adagrad", "rowwise_adagrad", "adam"), (0.0, 0.01),
        (torch.float32, torch.bfloat16, torch.float16),
        (("sum", False), ("sum", True), ("mean", False))):
    ebc = EmbeddingBagCollection([60, 300], 128, mode=mode, dtype=dtype,
                                 optimizer=optimizer, lr=0.05, weight_decay=wd)
    with torch.no_grad():
        ebc.weight.copy_(torch.linspace(-1, 1, ebc.weight.numel()).view_as(ebc.weight))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        i, o = make_bags([60, 300], 40, 9, generator=g)
        psw = torch.rand(i.numel(), generator=g) if weighted else None
        ebc(i, o, psw).backward(torch.randn(40, 256, generator=g).to(dtype))
    out += [ebc.weight.detach().float().view(-1), ebc.momentum1, ebc.momentum2]
torch.save(torch.cat(out), sys.argv[1])
"""


@pytest.mark.skipif(
    dlrm_ops.build_info().get("cpu_capability") != "avx512",
    reason="compares the AVX-512 build's register path with the AVX2 build",
)
def test_register_path_gives_the_bits_of_the_any_dim_path(tmp_path):
    # D = 128 is one block of 8 vectors under AVX-512, summed and updated in
    # registers; the AVX2 build (4 vectors at most) takes the any-D path.
    results = []
    for capability in ("avx512", "avx2"):
        path = tmp_path / f"{capability}.pt"
        env = dict(os.environ, DLRM_OPS_CPU_CAPABILITY=capability)
        res = subprocess.run(
            [sys.executable, "-c", _REGISTER_PATH_RUN, str(path)],
            env=env,
            capture_output=True,
            text=True,
            cwd=os.path.dirname(__file__),
        )
        assert res.returncode == 0, res.stderr
        results.append(torch.load(path))
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_bit_identical_for_any_thread_count(optimizer):
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            ebc = EmbeddingBagCollection([50, 300], 16, optimizer=optimizer, lr=0.05)
            with torch.no_grad():
                ebc.weight.copy_(torch.linspace(-1, 1, ebc.weight.numel()).view_as(ebc.weight))
            g = torch.Generator().manual_seed(0)
            for _ in range(3):
                indices, offsets = make_bags([50, 300], 600, 12, generator=g)
                ebc(indices, offsets).backward(torch.randn(600, 32, generator=g))
            results.append(torch.cat([ebc.weight.detach().view(-1), ebc.momentum1]))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_state_dict_round_trip_and_lr_change(tmp_path):
    data = list(batches(steps=6))
    a = fused("adam", lr=0.1)
    for i, (indices, offsets, grad) in enumerate(data[:3]):
        a(indices, offsets).backward(grad)
    assert set(a.state_dict()) == {"weight", "momentum1", "momentum2", "step", "hparams"}
    torch.save(a.state_dict(), tmp_path / "ckpt.pt")
    b = EmbeddingBagCollection(ROWS, 8, optimizer="adam", lr=0.5)
    b.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    assert b.lr == 0.1 and int(b.step) == 3
    for m in (a, b):
        m.lr = 0.02
        for indices, offsets, grad in data[3:]:
            m(indices, offsets).backward(grad)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.momentum2, b.momentum2)

    # the lr change took effect: same run with lr kept at 0.1 differs
    c = fused("adam", lr=0.1)
    for indices, offsets, grad in data:
        c(indices, offsets).backward(grad)
    assert not torch.allclose(c.weight, a.weight)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"optimizer must be None or one of"):
        EmbeddingBagCollection([5], 4, optimizer="lamb")
    with pytest.raises(ValueError, match=r"sparse=True and a fused optimizer exclude each other"):
        EmbeddingBagCollection([5], 4, optimizer="sgd", sparse=True)
    ebc = EmbeddingBagCollection([5], 4, optimizer="adagrad")
    w0 = ebc.weight.detach().clone()
    args = (
        torch.ones(1, 4),
        ebc.weight.detach(),
        ebc.momentum1,
        ebc.momentum2,
        ebc.step,
        ebc.weights_offsets,
        ebc.dim_offsets,
        ebc.rows,
        torch.tensor([0, 7]),
        torch.tensor([0, 2]),
    )
    kwargs = dict(
        pooling=ops.Pooling.SUM,
        per_sample_weights=None,
        hparams=ebc.hparams,
        optimizer=ops.OPTIMIZERS["adagrad"],
        stochastic_rounding=False,
    )
    with pytest.raises(RuntimeError, match=r"indices\[1\] = 7 is out of range for table 0"):
        torch.ops.dlrm_ops.embedding_bag_update_(*args, **kwargs)
    assert torch.equal(ebc.weight, w0) and int(ebc.step) == 0  # nothing written
    bad_state = list(args)
    bad_state[2] = torch.zeros(3)
    with pytest.raises(
        RuntimeError, match=r"momentum1 must have 20 elements for this optimizer, got 3"
    ):
        torch.ops.dlrm_ops.embedding_bag_update_(*bad_state, **kwargs)


def test_training_step_under_torch_compile():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.ebc = EmbeddingBagCollection(ROWS, 8, optimizer="rowwise_adagrad", lr=0.1)
            self.lin = torch.nn.Linear(24, 1)

        def forward(self, indices, offsets):
            return self.lin(self.ebc(indices, offsets)).pow(2).mean()

    eager, compiled_model = Model(), Model()
    step = torch.compile(lambda m, i, o: m(i, o).backward())
    for indices, offsets, _ in batches():
        eager(indices, offsets).backward()
        step(compiled_model, indices, offsets)
    torch.testing.assert_close(compiled_model.ebc.weight, eager.ebc.weight)
    torch.testing.assert_close(compiled_model.ebc.momentum1, eager.ebc.momentum1)
    torch.testing.assert_close(compiled_model.lin.weight.grad, eager.lin.weight.grad)


# Tables past the 64 MiB at which the CPU training forward gathers one-lookup
# bags in row order and hands its sort to the update (csrc/cpu/embedding_bag_kernel.cpp).
ROW_ORDER_ROWS, ROW_ORDER_D, ROW_ORDER_B = 270_000, 32, 64


def one_per_bag(seed, index_dtype):
    g = torch.Generator().manual_seed(seed)
    hot = torch.randint(0, ROW_ORDER_ROWS, (8,), generator=g)  # duplicates, as Zipf makes
    idx = torch.where(
        torch.rand(2 * ROW_ORDER_B, generator=g) < 0.3,
        hot[torch.randint(0, 8, (2 * ROW_ORDER_B,), generator=g)],
        torch.randint(0, ROW_ORDER_ROWS, (2 * ROW_ORDER_B,), generator=g),
    )
    return idx.to(index_dtype), torch.arange(2 * ROW_ORDER_B + 1).to(index_dtype)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize(
    "optimizer,mode,weighted",
    [("sgd", "sum", False), ("rowwise_adagrad", "sum", True), ("adam", "mean", False)],
)
def test_row_order_training_forward(optimizer, mode, weighted, index_dtype):
    """On tables big enough for the row-order forward: its output is the plain
    forward's, and the update that takes its sort makes the weights and state
    of an update that sorts again (the held sort refused after a forward of
    other indices)."""
    torch.manual_seed(0)
    dims = [ROW_ORDER_D] * 2
    a = EmbeddingBagCollection([ROW_ORDER_ROWS] * 2, dims, optimizer=optimizer, lr=0.1, mode=mode)
    b = EmbeddingBagCollection([ROW_ORDER_ROWS] * 2, dims, optimizer=optimizer, lr=0.1, mode=mode)
    b.load_state_dict(a.state_dict())
    plain = EmbeddingBagCollection([ROW_ORDER_ROWS] * 2, dims, mode=mode)
    plain.weight = a.weight
    idx, off = one_per_bag(1, index_dtype)
    other, _ = one_per_bag(2, index_dtype)
    psw = torch.rand(idx.numel()) if weighted else None
    grad = torch.randn(ROW_ORDER_B, 2 * ROW_ORDER_D)
    before = a.weight.detach().clone()
    for step in range(2):
        with torch.no_grad():
            expect = plain(idx, off, psw)
        out_a = a(idx, off, psw)
        torch.testing.assert_close(out_a, expect, atol=0, rtol=0)
        out_a.backward(grad)  # takes the forward's sort
        out_b = b(idx, off, psw)
        b(other, off, psw)  # holds the sort of other indices: refused below
        out_b.backward(grad)
        assert torch.equal(a.weight, b.weight), step
        assert torch.equal(a.momentum1, b.momentum1) and torch.equal(a.momentum2, b.momentum2)
    assert not torch.equal(a.weight, before)
    bad = idx.clone()
    bad[5] = ROW_ORDER_ROWS
    with pytest.raises(RuntimeError, match=r"indices\[5\] = 270000 is out of range for table 0"):
        a(bad, off, psw)


def test_held_sort_refused_for_changed_indices():
    """The held sort is of the forward's indices byte for byte: an update of
    the same tensor changed in place (one index) sorts for itself."""
    dims = [ROW_ORDER_D] * 2
    a = EmbeddingBagCollection([ROW_ORDER_ROWS] * 2, dims, optimizer="sgd", lr=0.1)
    b = EmbeddingBagCollection([ROW_ORDER_ROWS] * 2, dims, optimizer="sgd", lr=0.1)
    b.load_state_dict(a.state_dict())
    idx, off = one_per_bag(4, torch.int64)
    grad = torch.randn(ROW_ORDER_B, 2 * ROW_ORDER_D)

    def update(m):
        torch.ops.dlrm_ops.embedding_bag_update_(
            grad,
            m.weight.detach(),
            m.momentum1,
            m.momentum2,
            m.step,
            m.weights_offsets,
            m.dim_offsets,
            m.rows,
            idx,
            off,
            pooling=ops.Pooling.SUM,
            per_sample_weights=None,
            hparams=m.hparams,
            optimizer=dlrm_ops.ops.OPTIMIZERS["sgd"],
            stochastic_rounding=False,
        )

    with torch.no_grad():
        a(idx, off)  # holds its sort
    idx[7] = (idx[7] + 1) % ROW_ORDER_ROWS
    update(a)  # must refuse it
    update(b)  # nothing held
    assert torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_held_sort_refused_for_other_bags(optimizer):
    """An update of the forward's indices under other offsets (same count, two
    lookups in every other bag) sorts for itself: a position is a bag only
    with one lookup per bag."""
    dims = [ROW_ORDER_D] * 2
    a = EmbeddingBagCollection([ROW_ORDER_ROWS] * 2, dims, optimizer=optimizer, lr=0.1)
    b = EmbeddingBagCollection([ROW_ORDER_ROWS] * 2, dims, optimizer=optimizer, lr=0.1)
    b.load_state_dict(a.state_dict())
    idx, off = one_per_bag(3, torch.int64)
    pairs = torch.arange(0, 2 * ROW_ORDER_B + 1, 2).repeat_interleave(2)[1:]  # 0, 2, 2, 4, 4, ...
    grad = torch.randn(ROW_ORDER_B, 2 * ROW_ORDER_D)

    def update(m):
        torch.ops.dlrm_ops.embedding_bag_update_(
            grad,
            m.weight.detach(),
            m.momentum1,
            m.momentum2,
            m.step,
            m.weights_offsets,
            m.dim_offsets,
            m.rows,
            idx,
            pairs,
            pooling=ops.Pooling.SUM,
            per_sample_weights=None,
            hparams=m.hparams,
            optimizer=dlrm_ops.ops.OPTIMIZERS[optimizer],
            stochastic_rounding=False,
        )

    w0 = a.weight.detach().clone()
    with torch.no_grad():
        a(idx, off)  # holds its sort (one lookup per bag)
    update(a)  # must refuse it
    update(b)  # nothing held
    assert torch.equal(a.weight, b.weight) and torch.equal(a.momentum1, b.momentum1)
    assert not torch.equal(a.weight, w0)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_row_order_refused_for_a_late_bag_of_two(index_dtype):
    """Bags of one lookup but for one pair far into a big batch (past the
    first thread's share of the offsets scan): the training forward gathers
    in bag order, and the step matches the plain forward and a dense SGD step."""
    B = 20_000
    dims = [ROW_ORDER_D] * 2
    a = EmbeddingBagCollection([ROW_ORDER_ROWS] * 2, dims, optimizer="sgd", lr=0.1)
    plain = EmbeddingBagCollection([ROW_ORDER_ROWS] * 2, dims)
    plain.weight = torch.nn.Parameter(a.weight.detach().clone())
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, ROW_ORDER_ROWS, (2 * B,), generator=g)
    idx[100:200] = idx[7]  # duplicates
    off = torch.arange(2 * B + 1)
    off[30_001] += 1  # bag 30000 (table 1) holds two lookups, bag 30001 none
    idx, off = idx.to(index_dtype), off.to(index_dtype)
    grad = torch.randn(B, 2 * ROW_ORDER_D, generator=g)
    out = a(idx, off)
    expect = plain(idx, off)
    torch.testing.assert_close(out, expect.detach(), atol=0, rtol=0)
    out.backward(grad)
    expect.backward(grad)
    torch.testing.assert_close(a.weight.detach(), plain.weight.detach() - 0.1 * plain.weight.grad)
