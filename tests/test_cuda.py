"""The CUDA kernels against the CPU ops (themselves tested against the
pure-PyTorch references) and the references. Skipped without a GPU."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dlrm_ops
from dlrm_ops.optimizers import OPTIMIZERS
from dlrm_ops import reference
from dlrm_ops.nn import EmbeddingBagCollection, QuantizedEmbeddingBagCollection

from conftest import TOL, make_bags

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
cuda = torch.device("cuda")
ROWS = [40, 7, 25, 300]


def collection(dims, dtype=torch.float32, mode="sum", device="cpu", rows=ROWS, **kw):
    """Initialised on the CPU (the same weights on every device), then moved."""
    torch.manual_seed(0)
    return EmbeddingBagCollection(rows, dims, mode=mode, dtype=dtype, **kw).to(device)


def meta(ebc):
    return ebc.weights_offsets, ebc.dim_offsets, ebc.rows


def to_cuda(*ts):
    return [None if t is None else t.to(cuda) for t in ts]


def bags(B=33, max_len=7, index_dtype=torch.int64, seed=0):
    return make_bags(ROWS, B, max_len, index_dtype, generator=torch.Generator().manual_seed(seed))


def close(a, b, dtype=torch.float32):
    torch.testing.assert_close(a.cpu().float(), b.cpu().float(), equal_nan=True, **TOL[dtype])


# torch 2.11 (the CUDA machines' torch, older than this package's >= 2.13)
# crashed on every exception a stable-ABI kernel raised, CPU kernels included.
OLD_TORCH = tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 13)
needs_213 = pytest.mark.skipif(OLD_TORCH, reason="kernel exceptions crash torch < 2.13's stable-ABI dispatch")


DIMS = [8, [4, 33, 64, 300]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("mode, weighted", [("sum", False), ("sum", True), ("mean", False)])
@pytest.mark.parametrize("dims", DIMS)
def test_embedding_bag_forward_and_gradients(dtype, index_dtype, mode, weighted, dims):
    ebc = collection(dims, dtype, mode)
    idx, off = bags(index_dtype=index_dtype)
    psw = torch.rand(idx.numel()) if weighted else None
    B = (off.numel() - 1) // len(ROWS)
    grad = torch.randn(B, ebc.total_dim).to(dtype)
    w = ebc.weight.detach()
    args = (*meta(ebc), idx, off)
    pool = dlrm_ops.ops.POOLING[mode]
    ops = torch.ops.dlrm_ops
    results = []
    for dev in ("cpu", cuda):
        w_d, g_d, psw_d = (t if t is None else t.to(dev) for t in (w, grad, psw))
        a = [t.to(dev) for t in args]
        results.append((
            ops.embedding_bag_forward(w_d, *a, pool, psw_d, ebc.total_dim, False),
            ops.embedding_bag_backward_dense(g_d, w_d, *a, pool, psw_d),
            ops.embedding_bag_backward_sparse(g_d, w_d, *a, pool, psw_d),
            ops.embedding_bag_per_sample_weights_grad(g_d, w_d, *a, pool) if weighted else None,
        ))
    for c, g in zip(*results):
        if c is not None:
            close(g, c, dtype)


def test_forward_matches_reference_and_empty_batch():
    ebc = collection([4, 33, 64, 300]).to(cuda)
    idx, off = to_cuda(*bags(B=50, max_len=12))
    ref = reference.table_batched_embedding_bag(
        [ebc.weight_of(t) for t in range(len(ROWS))], idx, off)
    close(ebc(idx, off), ref)
    empty = ebc(torch.zeros(0, dtype=torch.int64, device=cuda),
                torch.zeros(1, dtype=torch.int64, device=cuda))
    assert empty.shape == (0, ebc.total_dim)


def test_autograd_dense_and_sparse_gradients():
    for sparse in (False, True):
        cpu = collection([4, 33, 64, 300], sparse=sparse)
        gpu = collection([4, 33, 64, 300], sparse=sparse, device=cuda)
        idx, off = bags()
        for m, dev in ((cpu, "cpu"), (gpu, cuda)):
            m(idx.to(dev), off.to(dev)).pow(2).sum().backward()
        g = gpu.weight.grad
        close(g.to_dense() if sparse else g, cpu.weight.grad.to_dense())


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("mode, weighted", [("sum", False), ("sum", True), ("mean", False)])
def test_fused_optimizer_matches_cpu(optimizer, dims, mode, weighted):
    kw = dict(optimizer=optimizer, lr=0.05, weight_decay=0.01)
    cpu = collection(dims, mode=mode, **kw)
    gpu = collection(dims, mode=mode, device=cuda, **kw)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        idx, off = bags(seed=step)
        psw = torch.rand(idx.numel(), generator=g) if weighted else None
        grad = torch.randn(33, cpu.total_dim, generator=g)
        for m, dev in ((cpu, "cpu"), (gpu, cuda)):
            m(idx.to(dev), off.to(dev), None if psw is None else psw.to(dev)).backward(grad.to(dev))
    close(gpu.weight, cpu.weight)
    for name in ("momentum1", "momentum2"):
        close(getattr(gpu, name), getattr(cpu, name))
    assert int(gpu.step) == int(cpu.step) == 3


@pytest.mark.parametrize("optimizer", [None, *OPTIMIZERS])
@pytest.mark.parametrize("dims", [[300, 16], [40, 16]])
def test_hot_rows_match_cpu_and_repeat_bit_for_bit(optimizer, dims):
    """Rows looked up over 128 times in a batch (table 0: about 230 lookups a
    row), which a block of warps sums, beside rows a group of 32 or 16 lanes
    sums."""
    rows, B = [3, 50], 200
    kw = dict(optimizer=optimizer, lr=0.05, weight_decay=0.01) if optimizer else {}
    idx, off = make_bags(rows, B, 7, generator=torch.Generator().manual_seed(3))
    assert torch.bincount(idx[:int(off[B])]).min() > 128
    grad = torch.randn(B, sum(dims), generator=torch.Generator().manual_seed(4))
    results = []
    for dev in ("cpu", cuda, cuda):
        m = collection(dims, rows=rows, device=dev, **kw)
        for _ in range(2):
            m(idx.to(dev), off.to(dev)).backward(grad.to(dev))
        results.append(m.weight.detach() if optimizer else m.weight.grad)
    close(results[1], results[0])
    assert torch.equal(results[1], results[2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stochastic_rounding_matches_cpu(dtype):
    kw = dict(optimizer="sgd", lr=0.01, stochastic_rounding=True)
    cpu = collection(64, dtype, **kw)
    gpu = collection(64, dtype, device=cuda, **kw)
    idx, off = bags()
    grad = torch.randn(33, cpu.total_dim).to(dtype)
    for m, dev in ((cpu, "cpu"), (gpu, cuda)):
        m(idx.to(dev), off.to(dev)).backward(grad.to(dev))
    # Same random bits on both devices: all but rows whose fp32 update differs
    # in its last bit round alike.
    same = (gpu.weight.cpu() == cpu.weight).float().mean()
    assert same > 0.999, same


@needs_213
def test_bad_lookups_raise_the_cpu_errors():
    ebc = collection(8, device=cuda)
    idx, off = to_cuda(*bags())
    bad = idx.clone()
    bad[5] = 10_000
    with pytest.raises(RuntimeError, match=r"indices\[5\] = 10000 is out of range for table 0"):
        ebc(bad, off)
    bad[5] = -1
    with pytest.raises(RuntimeError, match=r"indices\[5\] = -1 is out of range"):
        ebc(bad, off)
    bad = idx.clone()  # in range for table 0 (40 rows), not for its own table 1 (7 rows)
    p = int(off[33])
    bad[p] = 10
    with pytest.raises(RuntimeError, match=rf"indices\[{p}\] = 10 is out of range for table 1"):
        ebc(bad, off)
    bad_off = off.clone()
    bad_off[3] = bad_off[4] + 1
    with pytest.raises(RuntimeError, match=r"offsets must be non-decreasing"):
        ebc(idx, bad_off)
    with pytest.raises(RuntimeError, match=r"offsets\[-1\] must equal the number of indices"):
        ebc(idx[:-1], off)
    with pytest.raises(RuntimeError, match=r"indices must be on the same device as weights"):
        ebc(idx.cpu(), off)
    with pytest.raises(RuntimeError, match=r"does not fit in weights"):
        dlrm_ops.table_batched_embedding_bag(ebc.weight, ebc.weights_offsets, ebc.dim_offsets,
                                             ebc.rows + 1, idx, off)
    fused = collection(8, device=cuda, optimizer="sgd")
    w0 = fused.weight.detach().clone()
    out = fused(idx, off)
    with pytest.raises(RuntimeError, match=r"grad_output must have shape"):
        torch.ops.dlrm_ops.embedding_bag_update_(
            torch.zeros(2, 2, device=cuda), fused.weight.detach(), fused.momentum1, fused.momentum2,
            fused.step, *meta(fused), idx, off, 0, None, fused.hparams, 1, False)
    assert torch.equal(fused.weight, w0) and out.shape == (33, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("self_interaction", [False, True])
@pytest.mark.parametrize("order", ["tril", "triu"])
@pytest.mark.parametrize("T, D, flat", [(26, 64, True), (3, 5, False), (26, 128, False)])
def test_interaction_matches_cpu(dtype, self_interaction, order, T, D, flat):
    B = 37
    dense = torch.randn(B, D).to(dtype)
    sparse = torch.randn(B, T, D).to(dtype)
    if flat:
        sparse = sparse.reshape(B, T * D)
    kw = dict(self_interaction=self_interaction, order=order)
    outs = {}
    for dev in ("cpu", cuda):
        d = dense.detach().clone().to(dev).requires_grad_()
        s = sparse.detach().clone().to(dev).requires_grad_()
        out = dlrm_ops.dot_interaction(d, s, **kw)
        grad = torch.ones_like(out).normal_(generator=None) if dev == "cpu" else outs["g"].to(dev)
        outs["g"] = grad
        out.backward(grad)
        outs[dev] = (out, d.grad, s.grad)
    for g, c in zip(outs[cuda], outs["cpu"]):  # sums of T+1 products of D terms
        torch.testing.assert_close(g.cpu().float(), c.float(), atol=1e-4, rtol=1e-4) \
            if dtype == torch.float32 else close(g, c, dtype)


def test_interaction_reads_strided_sparse_and_leaves_inputs_alone():
    ebc_out = torch.randn(16, 3 * 32 + 8, device=cuda)
    sparse = ebc_out[:, 8:]  # a column slice: strided samples
    dense = torch.randn(16, 32, device=cuda)
    keep = ebc_out.clone()
    out = dlrm_ops.dot_interaction(dense, sparse)
    close(out, reference.dot_interaction(dense, sparse))
    assert torch.equal(ebc_out, keep)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_bytes_equal_cpu(bits, dtype):
    w = (torch.randn(300, 66) * torch.rand(300, 1) * 5).to(dtype)
    w[3] = 1.5  # constant row
    w[7, 2] = float("inf")
    packed = dlrm_ops.quantize_rowwise(w, bits)
    packed_gpu = dlrm_ops.quantize_rowwise(w.to(cuda), bits)
    assert torch.equal(packed_gpu.cpu(), packed)
    for out_dtype in (torch.float32, torch.float16):
        close(dlrm_ops.dequantize_rowwise(packed_gpu, bits, out_dtype),
              dlrm_ops.dequantize_rowwise(packed, bits, out_dtype))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("mode, weighted", [("sum", False), ("sum", True), ("mean", False)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_quantized_lookup_matches_cpu(bits, index_dtype, mode, weighted, out_dtype):
    dims = [4, 34, 64, 300]
    q = QuantizedEmbeddingBagCollection.from_float(collection(dims, mode=mode), bits=bits)
    q.output_dtype = out_dtype
    idx, off = bags(index_dtype=index_dtype)
    psw = torch.rand(idx.numel()) if weighted else None
    ref = q(idx, off, psw)
    qg = q.to(cuda)
    close(qg(*to_cuda(idx, off, psw)), ref, out_dtype)


# Under torch < 2.13 the exception a kernel raises ends the process: a bad
# input the GPU validation misses would run and exit cleanly instead.
BAD_INPUTS = {
    "index past its table": "idx[5] = 10_000",
    "negative index": "idx[5] = -1",
    "index in range for table 0, not for its own table 1": "idx[int(off[33])] = 10",
    "decreasing offsets": "off[3] = off[4] + 1",
}


@pytest.mark.skipif(not OLD_TORCH, reason="test_bad_lookups_raise_the_cpu_errors checks the messages")
@pytest.mark.parametrize("corrupt", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_lookups_stop_the_call_on_old_torch(corrupt):
    code = f"""
import torch
from test_cuda import bags, collection, cuda
ebc = collection(8, device=cuda)
idx, off = bags()
assert off[66] > off[33]  # table 1 has lookups
ebc(idx.to(cuda), off.to(cuda)).sum().item()
print("clean input ran", flush=True)
{corrupt}
ebc(idx.to(cuda), off.to(cuda)).sum().item()
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent,
                       capture_output=True, text=True, timeout=300)
    assert "clean input ran" in r.stdout, r.stderr[-2000:]
    assert r.returncode != 0, "the bad input ran"


@needs_213
def test_quantized_bad_index():
    q = QuantizedEmbeddingBagCollection.from_float(collection(8), bits=8).to(cuda)
    idx, off = to_cuda(*bags())
    idx[2] = 41
    with pytest.raises(RuntimeError, match=r"indices\[2\] = 41 is out of range for table 0 with 40 rows"):
        q(idx, off)


def test_opcheck_cuda():
    ebc = collection([4, 33], device=cuda, rows=[40, 7])
    idx, off = make_bags([40, 7], 9, 5)
    idx, off = idx.to(cuda), off.to(cuda)
    w = ebc.weight.detach().requires_grad_()
    rows = torch.tensor([40, 7], device=cuda)
    woff = torch.tensor([0, 160], device=cuda)
    doff = torch.tensor([0, 4, 37], device=cuda)
    args = (w, woff, doff, rows, idx, off, 0, None, 37, False)
    torch.library.opcheck(torch.ops.dlrm_ops.embedding_bag_forward.default, args)
    dense = torch.randn(6, 16, device=cuda, requires_grad=True)
    sparse = torch.randn(6, 5, 16, device=cuda, requires_grad=True)
    torch.library.opcheck(torch.ops.dlrm_ops.dot_interaction.default, (dense, sparse, True, 1))
    wq = torch.randn(20, 16, device=cuda)
    torch.library.opcheck(torch.ops.dlrm_ops.quantize_rowwise.default, (wq, 8))
    packed = dlrm_ops.quantize_rowwise(wq, 4)
    torch.library.opcheck(torch.ops.dlrm_ops.dequantize_rowwise.default, (packed, 4, None))


def test_opcheck_cuda_backward_fused_and_quantized_ops():
    ops = torch.ops.dlrm_ops
    ebc = collection([4, 8], device=cuda, rows=[12, 9])
    idx, off = to_cuda(*make_bags([12, 9], B=5, max_len=4))
    psw = torch.rand(idx.numel(), device=cuda)
    w = ebc.weight.detach().clone()
    meta = (ebc.weights_offsets, ebc.dim_offsets, ebc.rows, idx, off)
    grad = torch.randn(5, 12, device=cuda)
    torch.library.opcheck(ops.embedding_bag_backward_dense, (grad, w, *meta, 0, psw))
    torch.library.opcheck(ops.embedding_bag_per_sample_weights_grad, (grad, w, *meta, 0))
    torch.library.opcheck(ops.embedding_bag_backward_sparse, (grad, w, *meta, 0, None),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))
    fused = collection(8, device=cuda, rows=[12, 9], optimizer="rowwise_adagrad", lr=0.1)
    state = (fused.momentum1, fused.momentum2, fused.step, fused.hparams)
    fmeta = (fused.weights_offsets, fused.dim_offsets, fused.rows, idx, off)
    torch.library.opcheck(ops.embedding_bag_forward_with_optimizer,
                          (fused.weight.detach().clone().requires_grad_(), *fmeta, 0, psw, 16,
                           *state, 3, False),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    torch.library.opcheck(ops.embedding_bag_update_,
                          (torch.randn(5, 16, device=cuda), fused.weight.detach().clone(),
                           fused.momentum1.clone(), fused.momentum2, fused.step.clone(), *fmeta, 0,
                           psw, fused.hparams, 3, False))
    q = QuantizedEmbeddingBagCollection.from_float(collection([4, 8], rows=[12, 9]), bits=8).to(cuda)
    torch.library.opcheck(ops.quantized_embedding_bag_forward,
                          (q.packed, q.weights_offsets, q.dim_offsets, q.rows, idx, off, 0, psw,
                           12, 8, None))


def dlrm_steps(model, dev, compile=False, steps=3):
    tables = [50, 30, 20]
    dense = torch.randn(64, 13, generator=torch.Generator().manual_seed(0))
    idx, off = make_bags(tables, 64, 3)
    y = (dense[:, 0] > 0).float()
    opt = torch.optim.SGD(list(model.dense_parameters()), lr=0.1)
    step = torch.compile(model) if compile else model
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            step(dense.to(dev), idx.to(dev), off.to(dev)), y.to(dev))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def dlrm():
    from dlrm_ops.models import DLRM
    torch.manual_seed(0)
    return DLRM([50, 30, 20], 16, [13, 32, 16], [32, 1], embedding_optimizer="adagrad",
                embedding_lr=0.1)


def test_dlrm_train_steps_match_cpu():
    cpu = dlrm_steps(dlrm(), "cpu")
    gpu = dlrm_steps(dlrm().to(cuda), cuda)
    torch.testing.assert_close(gpu.embeddings.weight.cpu(), cpu.embeddings.weight, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu.top[0].weight.cpu(), cpu.top[0].weight, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(OLD_TORCH, reason="torch < 2.13 refuses the in-place update of the leaf weight under compile")
def test_dlrm_train_steps_under_compile():
    eager = dlrm_steps(dlrm().to(cuda), cuda)
    compiled = dlrm_steps(dlrm().to(cuda), cuda, compile=True)
    torch.testing.assert_close(compiled.embeddings.weight, eager.embeddings.weight, atol=1e-4, rtol=1e-4)


def test_forward_and_interaction_under_compile():
    ebc = collection(16, device=cuda)
    idx, off = to_cuda(*bags())
    dense = torch.randn(33, 16, device=cuda)
    f = lambda d, i, o: dlrm_ops.dot_interaction(d, ebc(i, o)).sum()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(dense, idx, off), f(dense, idx, off))
