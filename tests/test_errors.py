"""When bad lookups are reported (dlrm_ops.errors): the modes, their API and
flags, the CPU raising at the call in every mode, the device record's
messages against the CPU op's; on a GPU, deferred/warn/off/immediate, what a
bad lookup does to outputs and weights, and the CUDA-graph captured step."""

import os
import subprocess
import sys

import pytest
import torch

import dlrm_ops
from dlrm_ops import errors, ops
from dlrm_ops.graphs import CapturedStep
from dlrm_ops.models import DLRM
from dlrm_ops.nn import EmbeddingBagCollection, QuantizedEmbeddingBagCollection

from utils import make_bags

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
OLD_TORCH = tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 13)
# torch < 2.13 ends the process on an exception a stable-ABI kernel raises.
needs_213 = pytest.mark.skipif(OLD_TORCH, reason="kernel exceptions crash torch < 2.13")
ROWS = [40, 7, 25]
B = 16


def collection(device="cpu", **kw):
    torch.manual_seed(0)
    return EmbeddingBagCollection(ROWS, 8, **kw).to(device)


def batch(device="cpu"):
    idx, off = make_bags(ROWS, B, 4, generator=torch.Generator().manual_seed(1), empty_frac=0)
    return idx.to(device), off.to(device)


def without(idx, off, pos):
    """The batch with lookup `pos` removed (what a bad lookup adds to a sum: nothing)."""
    keep = torch.ones(idx.numel(), dtype=torch.bool, device=idx.device)
    keep[pos] = False
    return idx[keep], off - (off > pos).to(off.dtype)


@pytest.fixture(autouse=True)
def _fresh():
    """The global mode restored, and on a GPU no error left from elsewhere."""
    mode = dlrm_ops.get_check_mode()
    if torch.cuda.is_available():
        torch.ops.dlrm_ops.take_lookup_error(torch.empty(0, device="cuda"))
    yield
    dlrm_ops.set_check_mode(mode)


# ------------------------------------------------------------ the modes


def test_mode_api():
    assert dlrm_ops.get_check_mode() == "deferred"
    dlrm_ops.set_check_mode("warn")
    assert dlrm_ops.get_check_mode() == "warn"
    with pytest.raises(RuntimeError, match="inside"):
        with dlrm_ops.check_mode("immediate"):
            assert dlrm_ops.get_check_mode() == "immediate"
            raise RuntimeError("inside")
    assert dlrm_ops.get_check_mode() == "warn"
    assert errors.resolve(None) == errors.Check.WARN
    assert errors.resolve("off") == errors.Check.OFF
    with pytest.raises(ValueError, match=r"mode must be one of .*'loud'"):
        dlrm_ops.set_check_mode("loud")
    with pytest.raises(ValueError, match=r"mode must be one of"):
        with dlrm_ops.check_mode("loud"):
            pass
    assert dlrm_ops.get_check_mode() == "warn"


@needs_213
def test_bad_check_arguments_name_themselves():
    ebc = collection()
    idx, off = batch()
    with pytest.raises(ValueError, match=r"check must be one of .*got 'loud'"):
        ops.table_batched_embedding_bag(
            ebc.weight, ebc.weights_offsets, ebc.dim_offsets, ebc.rows, idx, off, check="loud"
        )
    with pytest.raises(ValueError, match=r"check must be one of"):
        EmbeddingBagCollection(ROWS, 8, check="loud")
    with pytest.raises(ValueError, match=r"check must be one of"):
        QuantizedEmbeddingBagCollection(ROWS, [8] * 3, check="loud")
    with pytest.raises(RuntimeError, match=r"check must be 0 \(deferred\), 1 \(immediate\)"):
        torch.ops.dlrm_ops.embedding_bag_forward(
            ebc.weight,
            ebc.weights_offsets,
            ebc.dim_offsets,
            ebc.rows,
            idx,
            off,
            0,
            None,
            24,
            check=7,
        )


def test_environment_sets_the_starting_mode():
    code = "import dlrm_ops; print(dlrm_ops.get_check_mode())"
    env = dict(os.environ, DLRM_OPS_CHECK="warn")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "warn", r.stderr
    env["DLRM_OPS_CHECK"] = "loud"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "DLRM_OPS_CHECK must be one of" in r.stderr


# ------------------------------------------------- the CPU, every mode


@needs_213
@pytest.mark.parametrize("mode", sorted(errors.CHECKS))
def test_the_cpu_raises_at_the_call_in_every_mode(mode):
    idx, off = batch()
    bad = idx.clone()
    bad[3] = 1000
    with dlrm_ops.check_mode(mode):
        with pytest.raises(RuntimeError, match=r"indices\[3\] = 1000 is out of range"):
            collection()(bad, off)
        fused = collection(optimizer="sgd", lr=0.1, check=mode)
        w0 = fused.weight.detach().clone()
        with pytest.raises(RuntimeError, match=r"indices\[3\] = 1000 is out of range"):
            fused(bad, off).sum().backward()
        assert torch.equal(fused.weight, w0)
        q = QuantizedEmbeddingBagCollection.from_float(collection())
        q.check = mode
        with pytest.raises(RuntimeError, match=r"indices\[3\] = 1000 is out of range"):
            q(bad, off)
    dlrm_ops.check_errors()  # nothing recorded: a no-op here
    dlrm_ops.check_errors("cpu")


BACKWARD_OPS = (
    "embedding_bag_backward_dense",
    "embedding_bag_backward_sparse",
    "embedding_bag_per_sample_weights_grad",
    "embedding_bag_update_",
)


def test_a_backward_uses_its_forwards_mode(monkeypatch):
    """The mode reaches every backward op as the forward saw it (a mode set
    between the forward and the backward does not apply)."""
    seen = []
    for name in BACKWARD_OPS:
        op = getattr(ops._ops, name)
        spy = lambda *a, _op=op, _n=name, **k: (seen.append((_n, a[-1])), _op(*a, **k))[1]  # noqa: E731
        monkeypatch.setattr(ops._ops, name, spy)
    idx, off = batch()
    psw = torch.rand(idx.numel(), requires_grad=True)
    for kw in (dict(sparse=False), dict(sparse=True), dict(optimizer="sgd")):
        m = collection(**kw)
        with dlrm_ops.check_mode("warn"):
            out = m(idx, off, psw)
        with dlrm_ops.check_mode("off"):
            out.sum().backward()
    assert sorted(set(seen)) == sorted((n, int(errors.Check.WARN)) for n in BACKWARD_OPS)
    seen.clear()
    for sparse in (False, True):  # a converted list of nn.EmbeddingBag: one lookup
        holder = torch.nn.Module()
        holder.emb = torch.nn.ModuleList(
            [torch.nn.EmbeddingBag(n, 8, mode="sum", sparse=sparse) for n in ROWS]
        )
        dlrm_ops.convert(holder)
        offs = [torch.arange(4)] * len(ROWS)
        idxs = [torch.randint(0, n, (4,)) for n in ROWS]
        with dlrm_ops.check_mode("warn"):
            outs = holder.emb(offs, idxs)
        with dlrm_ops.check_mode("off"):
            sum(o.sum() for o in outs).backward()
    assert sorted(set(seen)) == [(n, int(errors.Check.WARN)) for n in BACKWARD_OPS[:2]]


def test_take_lookup_error_on_the_cpu():
    rec = torch.ops.dlrm_ops.take_lookup_error(torch.empty(0))
    assert rec.dtype == torch.long and rec.tolist() == [0] * 9
    torch.library.opcheck(torch.ops.dlrm_ops.take_lookup_error, (torch.empty(0),))


def cpu_error(fn) -> str:
    with pytest.raises(RuntimeError) as e:
        fn()
    return str(e.value)


@needs_213
def test_recorded_errors_read_as_the_cpu_ops_errors():
    """A device record [kind, source, table, bag, pos, value, limit, count,
    check] (csrc/cuda/lookups.cu) formats as the CPU op's message."""
    ebc = collection()
    idx, off = batch()
    bad = idx.clone()
    p = int(off[B]) + 2  # table 1 (7 rows), bag 0 or later
    bag = int(torch.searchsorted(off, p, right=True)) - 1
    bad[p] = 9
    want = cpu_error(lambda: ebc(bad, off))
    rec = [3, 0, bag // B, bag % B, p, 9, 7, 0, 0]
    assert want.endswith(errors.message(rec)), (want, errors.message(rec))
    drop = off.clone()
    drop[20] = drop[19] - 1
    want = cpu_error(lambda: ebc(idx, drop))
    rec = [2, 0, 19 // B, 19 % B, 20, int(drop[20]), int(drop[19]), idx.numel(), 0]
    assert want.endswith(errors.message(rec)), (want, errors.message(rec))
    first = off.clone()
    first[0] = 1
    want = cpu_error(lambda: ebc(idx, first))
    assert want.endswith(errors.message([2, 0, 0, 0, 0, 1, 0, idx.numel(), 0]))
    want = cpu_error(lambda: ebc(idx[:-1], off))
    rec = [2, 0, 2, B - 1, 3 * B, idx.numel(), int(off[-2]), idx.numel() - 1, 0]
    assert want.endswith(errors.message(rec)), (want, errors.message(rec))
    empty = torch.zeros(1, dtype=torch.int64)  # B = 0 with two indices
    want = cpu_error(lambda: ebc(idx[:2], empty))
    assert want.endswith(errors.message([2, 0, 0, 0, 0, 0, 0, 2, 0])), want
    fused = collection(optimizer="rowwise_adagrad")
    fused.momentum1 = fused.momentum1[:-1].clone()
    want = cpu_error(lambda: fused(idx, off).sum().backward())
    rec = [4, 2, 0, 0, 0, sum(ROWS) - 1, sum(ROWS), 0, 0]
    assert want.endswith(errors.message(rec)), (want, errors.message(rec))
    assert "table 1 does not fit in weights" in errors.message([1, 0, 1, 0, 0, 0, 0, 0, 0])


def test_captured_step_takes_cuda_tensors_only():
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        CapturedStep(lambda x: x, warmup=0)
    with pytest.raises(ValueError, match=r"inputs\[0\] must be a CUDA tensor"):
        CapturedStep(lambda x: x)(torch.ones(2))


# ------------------------------------------------------------- on a GPU


@cuda_only
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_deferred_bad_index_adds_nothing_and_is_raised_later(index_dtype):
    ebc = collection("cuda")
    idx, off = (t.to(index_dtype) for t in batch("cuda"))
    bad = idx.clone()
    bad[3] = 1000
    out = ebc(bad, off)  # no wait, no exception
    torch.testing.assert_close(out, ebc(*without(idx, off, 3)))
    bad2 = idx.clone()
    bad2[5] = -1
    ebc(bad2, off)  # a later error: the first one is kept
    with pytest.raises(RuntimeError, match=r"^indices\[3\] = 1000 is out of range for table 0"):
        dlrm_ops.check_errors()
    dlrm_ops.check_errors()  # cleared


@cuda_only
def test_warn_and_off():
    idx, off = batch("cuda")
    bad = idx.clone()
    bad[3] = 1000
    collection("cuda", check="warn")(bad, off)
    with pytest.warns(RuntimeWarning, match=r"indices\[3\] = 1000"):
        dlrm_ops.check_errors()
    out = collection("cuda", check="off")(bad, off)
    dlrm_ops.check_errors()  # nothing recorded
    torch.testing.assert_close(out, collection("cuda")(*without(idx, off, 3)))


@needs_213
@cuda_only
def test_immediate_raises_at_the_call():
    """(On torch < 2.13: tests/test_ops.py's test_bad_lookups_stop_the_call_on_old_torch.)"""
    idx, off = batch("cuda")
    bad = idx.clone()
    bad[3] = 1000
    with pytest.raises(RuntimeError, match=r"indices\[3\] = 1000 is out of range"):
        collection("cuda", check="immediate")(bad, off)
    dlrm_ops.check_errors()  # nothing recorded


@cuda_only
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad", "adam"])
def test_a_bad_lookup_updates_no_row(optimizer):
    idx, off = batch("cuda")
    bad = idx.clone()
    bad[3] = 1000
    kw = dict(optimizer=optimizer, lr=0.1, weight_decay=0.01)
    gpu, cpu = collection("cuda", **kw), collection(**kw)
    grad = torch.randn(B, 24)
    gpu(bad, off).backward(grad.cuda())
    cpu(*without(idx.cpu(), off.cpu(), 3)).backward(grad)
    torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match=r"indices\[3\] = 1000"):
        dlrm_ops.check_errors()
    # Bad offsets: zeros out, no row updated, the error raised later.
    w0 = gpu.weight.detach().clone()
    drop = off.clone()
    drop[7] = drop[6] - 1
    out = gpu(idx, drop)
    assert torch.equal(out, torch.zeros_like(out))
    out.backward(grad.cuda())
    assert torch.equal(gpu.weight, w0)
    with pytest.raises(RuntimeError, match=r"offsets must be non-decreasing, but offsets\[7\]"):
        dlrm_ops.check_errors()


@cuda_only
def test_quantized_deferred():
    q = QuantizedEmbeddingBagCollection.from_float(collection()).cuda()
    idx, off = batch("cuda")
    bad = idx.clone()
    bad[3] = 1000
    torch.testing.assert_close(q(bad, off), q(*without(idx, off, 3)))
    with pytest.raises(RuntimeError, match=r"indices\[3\] = 1000"):
        dlrm_ops.check_errors()


@cuda_only
def test_ops_capture_in_a_cuda_graph_and_record_errors_there():
    ebc = collection("cuda")
    idx, off = batch("cuda")
    static_idx = idx.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ebc(static_idx, off)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ebc(static_idx, off)
    g.replay()
    torch.testing.assert_close(out, ebc(idx, off))
    static_idx[3] = 1000
    g.replay()
    torch.testing.assert_close(out, ebc(*without(idx, off, 3)))
    with pytest.raises(RuntimeError, match=r"indices\[3\] = 1000"):
        dlrm_ops.check_errors()


def dlrm_model(device):
    torch.manual_seed(0)
    return DLRM(
        [50, 30, 20], 16, [13, 32, 16], [32, 1], embedding_optimizer="adagrad", embedding_lr=0.1
    ).to(device)


def dlrm_batches(n, B=64):
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        dense = torch.randn(B, 13, generator=g)
        idx, off = make_bags([50, 30, 20], B, 1, generator=g, empty_frac=0)
        out.append((dense, idx, off, (dense[:, 0] > 0).float()))
    return out


def train_steps(model, step_fn, batches):
    return [float(step_fn(*(x.cuda() for x in b))) for b in batches]


@cuda_only
def test_captured_dlrm_step_trains_as_eager():
    batches = dlrm_batches(7) + dlrm_batches(1, B=40)  # a smaller last batch runs eagerly
    runs = []
    for captured in (False, True):
        model = dlrm_model("cuda")
        opt = torch.optim.SGD(list(model.dense_parameters()), lr=0.1)

        def step(dense, idx, off, y):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, idx, off), y)
            loss.backward()
            opt.step()
            return loss.detach()

        fn = CapturedStep(step) if captured else step
        losses = train_steps(model, fn, batches)
        runs.append((losses, model.embeddings.weight.detach().cpu(), model.top[0].weight.cpu()))
        if captured:
            assert (fn.replays, fn.eager) == (4, 1)
    (l0, e0, t0), (l1, e1, t1) = runs
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e1, e0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t1, t0, atol=1e-5, rtol=1e-5)


@cuda_only
@pytest.mark.skipif(
    OLD_TORCH, reason="torch < 2.13 refuses the in-place update of the leaf weight under compile"
)
def test_dlrm_step_under_reduce_overhead_compile():
    batches = dlrm_batches(6)
    runs = []
    for compiled in (False, True):
        model = dlrm_model("cuda")
        opt = torch.optim.SGD(list(model.dense_parameters()), lr=0.1)
        fwd = torch.compile(model, mode="reduce-overhead") if compiled else model

        def step(dense, idx, off, y):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(fwd(dense, idx, off), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss.detach().clone()

        runs.append((train_steps(model, step, batches), model.embeddings.weight.detach().cpu()))
    torch.testing.assert_close(runs[1][0], runs[0][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(runs[1][1], runs[0][1], atol=1e-4, rtol=1e-4)
