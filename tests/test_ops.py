"""Every op on every device (the CPU, and CUDA where there is a GPU) against the
pure-PyTorch references: one sample_inputs(device) per op family feeds the
correctness, gradient and opcheck tests, as pytorch/extension-cpp does. Other
instruction sets: test_every_cpu_path_agrees reruns this file under them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dlrm_ops
from dlrm_ops import ops, reference
from dlrm_ops.models import DLRM
from dlrm_ops.nn import EmbeddingBagCollection, QuantizedEmbeddingBagCollection
from dlrm_ops.optimizers import OPTIMIZERS

from utils import TOL, make_bags, offsets_dropping_at

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# torch 2.11 (the CUDA machines' torch, older than this package's >= 2.13)
# crashed on every exception a stable-ABI kernel raised, CPU kernels included.
OLD_TORCH = tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 13)
needs_213 = pytest.mark.skipif(OLD_TORCH, reason="kernel exceptions crash torch < 2.13")
ROWS = [40, 7, 25, 300]
DIMS = [8, [4, 33, 64, 300]]  # whole vectors and the any-D paths; mixed dims: a flat buffer
MODES = [("sum", False), ("sum", True), ("mean", False)]  # (mode, per-sample weights)


def collection(dims, dtype=torch.float32, mode="sum", device="cpu", rows=ROWS, **kw):
    """Initialised on the CPU (the same weights on every device), then moved."""
    torch.manual_seed(0)
    return EmbeddingBagCollection(rows, dims, mode=mode, dtype=dtype, **kw).to(device)


def bags(B=33, max_len=7, index_dtype=torch.int64, seed=0, rows=ROWS):
    return make_bags(rows, B, max_len, index_dtype, generator=torch.Generator().manual_seed(seed))


def close(a, b, dtype=torch.float32):
    torch.testing.assert_close(a.cpu().float(), b.cpu().float(), equal_nan=True, **TOL[dtype])


def tables_of(ebc):
    return [ebc.weight_of(t) for t in range(ebc.num_tables)]


# ------------------------------------------------------------ sample inputs


def embedding_bag_samples(device):
    """Keyword arguments of embedding_bag_forward (and its backward ops)."""
    out = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for index_dtype in (torch.int32, torch.int64):
            for mode, weighted in MODES:
                for dims in DIMS:
                    ebc = collection(dims, dtype, mode, device)
                    idx, off = bags(index_dtype=index_dtype)
                    psw = torch.rand(idx.numel()) if weighted else None
                    out.append(
                        dict(
                            weights=ebc.weight.detach(),
                            weights_offsets=ebc.weights_offsets,
                            dim_offsets=ebc.dim_offsets,
                            rows=ebc.rows,
                            indices=idx.to(device),
                            offsets=off.to(device),
                            pooling=ops.POOLING[mode],
                            per_sample_weights=None if psw is None else psw.to(device),
                            total_dim=ebc.total_dim,
                            sparse=False,
                            tables=tables_of(ebc),
                        )
                    )
    ebc = collection([8, 8, 512], device=device, rows=[30, 40, 50])  # streamed, past the caches
    idx, off = make_bags([30, 40, 50], 4096, 3)
    out.append(
        dict(
            weights=ebc.weight.detach(),
            weights_offsets=ebc.weights_offsets,
            dim_offsets=ebc.dim_offsets,
            rows=ebc.rows,
            indices=idx.to(device),
            offsets=off.to(device),
            pooling=0,
            per_sample_weights=None,
            total_dim=ebc.total_dim,
            sparse=False,
            tables=tables_of(ebc),
        )
    )
    return out


def interaction_samples(device):
    out = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for self_interaction in (False, True):
            for order in ops.ORDERS.values():
                for T, D, flat in ((26, 64, True), (3, 5, False), (26, 128, False), (4, 32, False)):
                    sparse = torch.randn(37, T, D).to(dtype)
                    out.append(
                        dict(
                            dense=torch.randn(37, D).to(dtype).to(device),
                            sparse=(sparse.reshape(37, T * D) if flat else sparse).to(device),
                            self_interaction=self_interaction,
                            order=order,
                        )
                    )
    return out


def quantize_samples(device):
    out, g = [], torch.Generator().manual_seed(0)
    for bits in (8, 4):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            w = (torch.randn(300, 66, generator=g) * torch.rand(300, 1, generator=g) * 5).to(dtype)
            w[3] = 1.5  # a constant row
            w[7, 2] = float("inf")
            out.append(dict(weight=w.to(device), bits=bits))
    return out


def quantized_lookup_samples(device):
    out = []
    for bits in (8, 4):
        for index_dtype in (torch.int32, torch.int64):
            for mode, weighted in MODES:
                q = QuantizedEmbeddingBagCollection.from_float(
                    collection([4, 34, 64, 300], mode=mode), bits=bits
                ).to(device)
                idx, off = bags(index_dtype=index_dtype)
                psw = torch.rand(idx.numel()) if weighted else None
                out.append(
                    (q, idx.to(device), off.to(device), None if psw is None else psw.to(device))
                )
    return out


def fwd_args(s):
    """The op's own arguments of an embedding-bag sample (by name)."""
    return {k: v for k, v in s.items() if k != "tables"}


# -------------------------------------------------------------- correctness


@pytest.mark.parametrize("device", DEVICES)
def test_embedding_bag_forward_and_gradients(device):
    o = torch.ops.dlrm_ops
    for s in embedding_bag_samples(device):
        dtype = s["weights"].dtype
        tables = [t.detach().clone().requires_grad_() for t in s["tables"]]
        psw = s["per_sample_weights"]
        psw_ref = None if psw is None else psw.detach().clone().requires_grad_()
        mode = "mean" if s["pooling"] == ops.Pooling.MEAN else "sum"
        ref = reference.table_batched_embedding_bag(
            tables, s["indices"], s["offsets"], mode, psw_ref
        )
        out = o.embedding_bag_forward(**fwd_args(s))
        close(out, ref, dtype)
        grad = torch.randn_like(out)
        ref.backward(grad)
        lookups = {
            k: s[k]
            for k in ("weights_offsets", "dim_offsets", "rows", "indices", "offsets", "pooling")
        }
        dense = o.embedding_bag_backward_dense(
            grad, s["weights"], **lookups, per_sample_weights=psw
        )
        for t, tab in enumerate(tables):
            lo = int(s["weights_offsets"][t])
            close(dense.view(-1)[lo : lo + tab.numel()].view_as(tab), tab.grad, dtype)
        w = s["weights"].clone().requires_grad_()
        ops.table_batched_embedding_bag(
            w, *[s[k] for k in list(lookups)[:5]], mode=mode, per_sample_weights=psw, sparse=True
        ).backward(grad)
        close(w.grad.to_dense(), dense, dtype)
        if psw is not None:
            g_psw = o.embedding_bag_per_sample_weights_grad(grad, s["weights"], **lookups)
            close(g_psw, psw_ref.grad, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_empty_batch_and_empty_bags(device, index_dtype):
    ebc = collection([4, 33, 64, 300], device=device)
    empty = ebc(
        torch.zeros(0, dtype=index_dtype, device=device),
        torch.zeros(1, dtype=index_dtype, device=device),
    )
    assert empty.shape == (0, ebc.total_dim)
    idx, off = bags(index_dtype=index_dtype)  # a fifth of its bags are empty
    out = ebc(idx.to(device), off.to(device))
    close(
        out, reference.table_batched_embedding_bag(tables_of(ebc), idx.to(device), off.to(device))
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("mode, weighted", MODES)
def test_fused_optimizer_matches_reference(device, optimizer, dims, mode, weighted):
    kw = dict(optimizer=optimizer, lr=0.05, weight_decay=0.01)
    ebc = collection(dims, mode=mode, device=device, **kw)
    plain = collection(dims, mode=mode)  # the reference steps: sparse gradients per table
    tables = [torch.nn.Parameter(t.detach().clone()) for t in tables_of(plain)]
    states = [dict() for _ in tables]
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        idx, off = bags(seed=step)
        psw = torch.rand(idx.numel(), generator=g) if weighted else None
        grad = torch.randn(33, ebc.total_dim, generator=g)
        ebc(idx.to(device), off.to(device), None if psw is None else psw.to(device)).backward(
            grad.to(device)
        )
        for t, (tab, st) in enumerate(zip(tables, states)):
            B, lo, hi = 33, int(off[t * 33]), int(off[(t + 1) * 33])
            pooled = torch.nn.functional.embedding_bag(
                idx[lo:hi],
                tab,
                off[t * B : (t + 1) * B + 1] - lo,
                mode=mode,
                sparse=True,
                include_last_offset=True,
                per_sample_weights=None if psw is None else psw[lo:hi],
            )
            tab.grad = None
            pooled.backward(grad[:, int(ebc.dim_offsets[t]) : int(ebc.dim_offsets[t + 1])])
            reference.sparse_optimizer_step(
                optimizer,
                tab,
                tab.grad,
                st,
                lr=0.05,
                eps=float(ebc.hparams[ops.optimizers.HParam.EPS]),
                weight_decay=0.01,
            )
    for t, tab in enumerate(tables):
        close(ebc.weight_of(t), tab.detach())
    assert int(ebc.step) == 3


@pytest.mark.parametrize("device", DEVICES)
def test_interaction_forward_and_gradients(device):
    for s in interaction_samples(device):
        dtype = s["dense"].dtype
        d, sp = (s[k].detach().clone().requires_grad_() for k in ("dense", "sparse"))
        d2, sp2 = (s[k].detach().clone().float().requires_grad_() for k in ("dense", "sparse"))
        order = "tril" if s["order"] == ops.InteractionOrder.TRIL else "triu"
        out = ops.dot_interaction(d, sp, self_interaction=s["self_interaction"], order=order)
        ref = reference.dot_interaction(d2, sp2, s["self_interaction"], order)
        grad = torch.randn_like(ref)
        out.backward(grad.to(dtype))
        ref.backward(grad)
        tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else TOL[dtype]
        for a, b in ((out, ref), (d.grad, d2.grad), (sp.grad, sp2.grad)):
            torch.testing.assert_close(a.cpu().float(), b.cpu().float(), **tol)


@pytest.mark.parametrize("device", DEVICES)
def test_interaction_reads_strided_sparse_and_leaves_inputs_alone(device):
    ebc_out = torch.randn(16, 3 * 32 + 8, device=device)
    sparse = ebc_out[:, 8:]  # a column slice: strided samples
    dense = torch.randn(16, 32, device=device)
    keep = ebc_out.clone()
    close(ops.dot_interaction(dense, sparse), reference.dot_interaction(dense, sparse))
    assert torch.equal(ebc_out, keep)


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_and_dequantize(device):
    for s in quantize_samples(device):
        packed = ops.quantize_rowwise(**s)
        w = s["weight"].cpu()
        assert torch.equal(packed.cpu(), ops.quantize_rowwise(w, s["bits"]))  # across devices
        if w.dtype == torch.float32:  # the reference's NaN bytes of the inf row differ
            finite = w.isfinite().all(1)
            assert torch.equal(
                packed.cpu()[finite], reference.quantize_rowwise(w, s["bits"])[finite]
            )
        for out_dtype in (torch.float32, torch.float16):
            close(
                ops.dequantize_rowwise(packed, s["bits"], out_dtype),
                reference.dequantize_rowwise(packed.cpu(), s["bits"], out_dtype),
                out_dtype,
            )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_quantized_lookup(device, out_dtype):
    for q, idx, off, psw in quantized_lookup_samples(device):
        q.output_dtype = out_dtype
        tables = [q.dequantized_weight_of(t) for t in range(len(q.num_embeddings))]
        ref = reference.table_batched_embedding_bag(tables, idx, off, q.mode, psw)
        close(q(idx, off, psw), ref, out_dtype)


# ------------------------------------------------------------------ opcheck


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    o = torch.ops.dlrm_ops
    s = next(
        s
        for s in embedding_bag_samples(device)
        if s["per_sample_weights"] is not None
        and s["weights"].dtype == torch.float32
        and s["weights"].dim() == 1
    )
    args = fwd_args(s)
    w = args.pop("weights").clone().requires_grad_()
    psw = args.pop("per_sample_weights").clone().requires_grad_()
    torch.library.opcheck(o.embedding_bag_forward, (w,), dict(args, per_sample_weights=psw))
    grad = torch.randn(33, s["total_dim"], device=device)
    lookups = {
        k: s[k] for k in ("weights_offsets", "dim_offsets", "rows", "indices", "offsets", "pooling")
    }
    torch.library.opcheck(
        o.embedding_bag_backward_dense,
        (grad, w.detach()),
        dict(lookups, per_sample_weights=psw.detach()),
    )
    torch.library.opcheck(o.embedding_bag_per_sample_weights_grad, (grad, w.detach()), lookups)
    torch.library.opcheck(
        o.embedding_bag_backward_sparse,
        (grad, w.detach()),
        dict(lookups, per_sample_weights=None),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    fused = collection(8, device=device, optimizer="rowwise_adagrad", lr=0.1)
    state = dict(
        momentum1=fused.momentum1,
        momentum2=fused.momentum2,
        step=fused.step,
        hparams=fused.hparams,
        optimizer=ops.OPTIMIZERS["rowwise_adagrad"],
        stochastic_rounding=False,
    )
    idx, off = bags()
    flookups = dict(
        weights_offsets=fused.weights_offsets,
        dim_offsets=fused.dim_offsets,
        rows=fused.rows,
        indices=idx.to(device),
        offsets=off.to(device),
        pooling=0,
    )
    fpsw = torch.rand(idx.numel(), device=device)
    torch.library.opcheck(
        o.embedding_bag_forward_with_optimizer,
        (fused.weight.detach().clone().requires_grad_(),),
        dict(flookups, per_sample_weights=fpsw, total_dim=32, **state),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )
    state.update(momentum1=fused.momentum1.clone(), step=fused.step.clone())
    torch.library.opcheck(
        o.embedding_bag_update_,
        (torch.randn(33, 32, device=device), fused.weight.detach().clone()),
        dict(flookups, per_sample_weights=fpsw, **state),
    )
    for s in interaction_samples(device)[:4]:
        s = {
            k: v.clone().requires_grad_() if isinstance(v, torch.Tensor) else v
            for k, v in s.items()
        }
        torch.library.opcheck(o.dot_interaction, (), s)
    for s in quantize_samples(device)[::3]:
        s = dict(s, weight=s["weight"].nan_to_num(posinf=0.0))  # opcheck compares NaN as unequal
        torch.library.opcheck(o.quantize_rowwise, (), s)
        torch.library.opcheck(
            o.dequantize_rowwise, (ops.quantize_rowwise(**s), s["bits"]), dict(dtype=None)
        )
    q, idx, off, psw = quantized_lookup_samples(device)[1]
    torch.library.opcheck(
        o.quantized_embedding_bag_forward,
        (q.packed,),
        dict(
            weights_offsets=q.weights_offsets,
            dim_offsets=q.dim_offsets,
            rows=q.rows,
            indices=idx,
            offsets=off,
            pooling=ops.POOLING[q.mode],
            per_sample_weights=psw,
            total_dim=q.total_dim,
            bits=q.bits,
            output_dtype=None,
        ),
    )


# ------------------------------------------------- whole models, compile


def dlrm_steps(model, device, compile=False, steps=3):
    tables = [50, 30, 20]
    dense = torch.randn(64, 13, generator=torch.Generator().manual_seed(0))
    idx, off = make_bags(tables, 64, 3)
    y = (dense[:, 0] > 0).float()
    opt = torch.optim.SGD(list(model.dense_parameters()), lr=0.1)
    step = torch.compile(model) if compile else model
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            step(dense.to(device), idx.to(device), off.to(device)), y.to(device)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def dlrm():
    torch.manual_seed(0)
    return DLRM(
        [50, 30, 20], 16, [13, 32, 16], [32, 1], embedding_optimizer="adagrad", embedding_lr=0.1
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.skipif(
    OLD_TORCH, reason="torch < 2.13 refuses the in-place update of the leaf weight under compile"
)
def test_dlrm_train_steps_under_compile(device):
    eager = dlrm_steps(dlrm().to(device), device)
    compiled = dlrm_steps(dlrm().to(device), device, compile=True)
    torch.testing.assert_close(
        compiled.embeddings.weight, eager.embeddings.weight, atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("device", DEVICES)
def test_forward_and_interaction_under_compile(device):
    ebc = collection(16, device=device)
    idx, off = (t.to(device) for t in bags())
    dense = torch.randn(33, 16, device=device)
    f = lambda d, i, o: ops.dot_interaction(d, ebc(i, o)).sum()  # noqa: E731
    torch.testing.assert_close(
        torch.compile(f, fullgraph=True)(dense, idx, off), f(dense, idx, off)
    )


# -------------------------------------------------------- bad input, devices


@needs_213
@pytest.mark.parametrize("device", DEVICES)
@dlrm_ops.check_mode("immediate")
def test_bad_lookups_raise_the_same_errors(device):
    """CUDA validates on the GPU and, in mode "immediate", raises the CPU op's
    messages at the call (tests/test_errors.py: the deferred mode)."""
    ebc = collection(8, device=device)
    idx, off = (t.to(device) for t in bags())
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
    with pytest.raises(RuntimeError, match=r"does not fit in weights"):
        dlrm_ops.table_batched_embedding_bag(
            ebc.weight, ebc.weights_offsets, ebc.dim_offsets, ebc.rows + 1, idx, off
        )
    fused = collection(8, device=device, optimizer="sgd")
    w0 = fused.weight.detach().clone()
    out = fused(idx, off)
    with pytest.raises(RuntimeError, match=r"grad_output must have shape"):
        torch.ops.dlrm_ops.embedding_bag_update_(
            torch.zeros(2, 2, device=device),
            fused.weight.detach(),
            fused.momentum1,
            fused.momentum2,
            fused.step,
            fused.weights_offsets,
            fused.dim_offsets,
            fused.rows,
            idx,
            off,
            pooling=0,
            per_sample_weights=None,
            hparams=fused.hparams,
            optimizer=ops.OPTIMIZERS["sgd"],
            stochastic_rounding=False,
        )
    assert torch.equal(fused.weight, w0) and out.shape == (33, 32)
    q = QuantizedEmbeddingBagCollection.from_float(collection(8), bits=8).to(device)
    bad = idx.clone()
    bad[2] = 41
    with pytest.raises(
        RuntimeError,
        match=r"indices\[2\] = 41 is out of range for table 0 "
        r"with 40 rows",
    ):
        q(bad, off)


@cuda_only
def test_mixed_devices_raise():
    ebc = collection(8, device="cuda")
    idx, off = bags()
    with pytest.raises(RuntimeError, match=r"indices must be on the same device as weights"):
        ebc(idx, off.cuda())


# Under torch < 2.13 the exception a kernel raises ends the process: a bad
# input the GPU validation misses would run and exit cleanly instead.
BAD_INPUTS = {
    "index past its table": "idx[5] = 10_000",
    "negative index": "idx[5] = -1",
    "index in range for table 0, not for its own table 1": "idx[int(off[33])] = 10",
    "decreasing offsets": "off[3] = off[4] + 1",
}


@cuda_only
@pytest.mark.skipif(not OLD_TORCH, reason="test_bad_lookups_raise_the_same_errors checks them")
@pytest.mark.parametrize("corrupt", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_lookups_stop_the_call_on_old_torch(corrupt):
    code = f"""
import torch
import dlrm_ops
from test_ops import bags, collection
dlrm_ops.set_check_mode("immediate")
ebc = collection(8, device="cuda")
idx, off = bags()
assert off[66] > off[33]  # table 1 has lookups
ebc(idx.cuda(), off.cuda()).sum().item()
print("clean input ran", flush=True)
{corrupt}
ebc(idx.cuda(), off.cuda()).sum().item()
"""
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "clean input ran" in r.stdout, r.stderr[-2000:]
    assert r.returncode != 0, "the bad input ran"


# ----------------------------------------------------- CUDA against the CPU


@cuda_only
@pytest.mark.parametrize("optimizer", [None, *OPTIMIZERS])
@pytest.mark.parametrize("dims", [[300, 16], [40, 16]])
def test_hot_rows_match_cpu_and_repeat_bit_for_bit(optimizer, dims):
    """Rows looked up over 128 times in a batch (table 0: about 230 lookups a
    row), which a block of warps sums, beside rows a group of 32 or 16 lanes
    sums."""
    rows, B = [3, 50], 200
    kw = dict(optimizer=optimizer, lr=0.05, weight_decay=0.01) if optimizer else {}
    idx, off = make_bags(rows, B, 7, generator=torch.Generator().manual_seed(3))
    assert torch.bincount(idx[: int(off[B])]).min() > 128
    grad = torch.randn(B, sum(dims), generator=torch.Generator().manual_seed(4))
    results = []
    for dev in ("cpu", "cuda", "cuda"):
        m = collection(dims, rows=rows, device=dev, **kw)
        for _ in range(2):
            m(idx.to(dev), off.to(dev)).backward(grad.to(dev))
        results.append(m.weight.detach() if optimizer else m.weight.grad)
    close(results[1], results[0])
    assert torch.equal(results[1], results[2])


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stochastic_rounding_matches_cpu(dtype):
    kw = dict(optimizer="sgd", lr=0.01, stochastic_rounding=True)
    cpu = collection(64, dtype, **kw)
    gpu = collection(64, dtype, device="cuda", **kw)
    idx, off = bags()
    grad = torch.randn(33, cpu.total_dim).to(dtype)
    for m, dev in ((cpu, "cpu"), (gpu, "cuda")):
        m(idx.to(dev), off.to(dev)).backward(grad.to(dev))
    # Same random bits on both devices: all but rows whose fp32 update differs
    # in its last bit round alike.
    same = (gpu.weight.cpu() == cpu.weight).float().mean()
    assert same > 0.999, same


@cuda_only
def test_dlrm_train_steps_match_cpu():
    cpu = dlrm_steps(dlrm(), "cpu")
    gpu = dlrm_steps(dlrm().to("cuda"), "cuda")
    torch.testing.assert_close(
        gpu.embeddings.weight.cpu(), cpu.embeddings.weight, atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(gpu.top[0].weight.cpu(), cpu.top[0].weight, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------- instruction sets


def test_cpu_capability_in_use():
    """Under DLRM_OPS_CPU_CAPABILITY (as the test below reruns this file) the
    kernels of that instruction set run."""
    want = os.environ.get("DLRM_OPS_CPU_CAPABILITY")
    if want:
        assert dlrm_ops.build_info()["cpu_capability"] == want


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("pos", [1, 8, 16, 17, 99])
def test_offsets_order_check(index_dtype, pos):
    """The vectorised order check of every build names the first drop."""
    ebc = collection(8, rows=[30])
    with pytest.raises(
        RuntimeError,
        match=rf"offsets\[{pos}\] = {pos - 2} < "
        rf"offsets\[{pos - 1}\]",
    ):
        ebc(*offsets_dropping_at(pos, index_dtype, bags=300))


@pytest.mark.skipif(bool(os.environ.get("DLRM_OPS_CPU_CAPABILITY")), reason="the rerun itself")
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_every_cpu_path_agrees(capability):
    """This file's CPU tests again on the portable and AVX2 builds of the kernels."""
    env = dict(os.environ, DLRM_OPS_CPU_CAPABILITY=capability)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            __file__,
            "-k",
            "(cpu or offsets) and not compile and not opcheck",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=Path(__file__).parent,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
