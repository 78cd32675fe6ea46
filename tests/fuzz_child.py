"""Generated bad and edge inputs for every public op and module, run in a
child process by tests/test_fuzz.py (so that a crash fails that test, not the
run):  python tests/fuzz_child.py FAMILY EXAMPLES

Every call must either raise an exception of the library's kinds or, when its
inputs are valid by this file's own rules, give the pure-PyTorch reference's
answer and leave the inputs as they were. Success on invalid input fails. Each
case is printed before it runs: after a crash the last line names it."""

import sys

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dlrm_ops
from dlrm_ops import ops, optimizers, reference

ERRORS = (RuntimeError, ValueError, TypeError, NotImplementedError, IndexError)
EDGE = [
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**62,
    2**63 - 1,
    -1,
    -(2**31),
    -(2**63),
    2**63 - 2**40,
    2**63 - 50,
]
INT32 = (-(2**31), 2**31 - 1)


def edge_or(lo, hi):
    return st.one_of(st.integers(lo, hi), st.sampled_from(EDGE))


@st.composite
def lookups(draw, bits=0):
    """Table batch metadata and lookups, valid, then corrupted 0-2 times."""
    T, B = draw(st.integers(1, 3)), draw(st.integers(0, 3))
    dims = [draw(st.integers(1, 3)) * 2 for _ in range(T)]
    rows = [draw(st.integers(0, 5)) for _ in range(T)]
    unit = [d if bits == 0 else d + 8 if bits == 8 else d // 2 + 4 for d in dims]
    woff = [sum(r * u for r, u in zip(rows[:t], unit[:t])) for t in range(T)]
    doff = [sum(dims[:t]) for t in range(T + 1)]
    lengths = [draw(st.integers(0, 3)) if rows[t] else 0 for t in range(T) for _ in range(B)]
    offsets = [sum(lengths[:i]) for i in range(T * B + 1)]
    indices = [
        draw(st.integers(0, rows[i // max(B, 1)] - 1))
        for i in range(T * B)
        for _ in range(lengths[i])
    ]
    size = sum(r * u for r, u in zip(rows, unit)) + draw(st.integers(0, 3))
    c = dict(
        woff=woff,
        doff=doff,
        rows=rows,
        indices=indices,
        offsets=offsets,
        size=size,
        int32=draw(st.booleans()),
        mode=draw(st.sampled_from(["sum", "mean"])),
        psw=draw(st.sampled_from([None, "ok", "short"])),
        bits=bits,
        seed=draw(st.integers(0, 2**16)),
    )
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(["woff", "doff", "rows", "indices", "offsets", "size"]))
        if key == "size":
            c["size"] = draw(st.integers(0, max(size, 1)))
        elif c[key]:
            c[key] = list(c[key])
            c[key][draw(st.integers(0, len(c[key]) - 1))] = draw(edge_or(-3, 8))
        elif key in ("indices", "offsets"):
            c[key] = [draw(edge_or(-3, 8))]
    return c


def layout_valid(c, disjoint=False):
    """The library's rules for the metadata and lookups, in Python integers."""
    woff, doff, rows, idx, off = c["woff"], c["doff"], c["rows"], c["indices"], c["offsets"]
    T = len(rows)
    if doff[0] != 0 or any(doff[t + 1] <= doff[t] for t in range(T)):
        return False
    dims = [doff[t + 1] - doff[t] for t in range(T)]
    unit = [d if c["bits"] == 0 else d + 8 if c["bits"] == 8 else d // 2 + 4 for d in dims]
    if c["bits"] == 4 and any(d % 2 for d in dims):
        return False
    if any(not 0 <= r < 2**32 for r in rows) or any(w < 0 for w in woff):
        return False
    if any(w + r * u > c["size"] for w, r, u in zip(woff, rows, unit)):
        return False
    if disjoint:
        spans = sorted((w, w + r * u) for w, r, u in zip(woff, rows, unit) if r)
        if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
            return False
    if (len(off) - 1) % T or off[0] != 0 or off[-1] != len(idx):
        return False
    if any(b < a for a, b in zip(off, off[1:])):
        return False
    if c["int32"] and any(not INT32[0] <= v <= INT32[1] for v in idx + off):
        return False
    B = (len(off) - 1) // T
    for t in range(T):
        if any(not 0 <= i < rows[t] for i in idx[off[t * B] : off[(t + 1) * B]]):
            return False
    return c["psw"] != "short" and (c["psw"] is None or c["mode"] == "sum")


def tensors(c, dtype=torch.float32):
    """(weights_offsets, dim_offsets, rows, indices, offsets, psw) of case c;
    None when a value does not fit the index dtype (nothing to call)."""
    idt = torch.int32 if c["int32"] else torch.int64
    try:
        idx = torch.tensor(c["indices"], dtype=torch.int64)
        off = torch.tensor(c["offsets"], dtype=torch.int64)
        if c["int32"] and any(not INT32[0] <= v <= INT32[1] for v in c["indices"] + c["offsets"]):
            return None
        meta = tuple(torch.tensor(c[k], dtype=torch.int64) for k in ("woff", "doff", "rows"))
    except (OverflowError, RuntimeError):
        return None
    n = len(c["indices"])
    psw = None if c["psw"] is None else torch.rand(n if c["psw"] == "ok" else n + 1)
    return meta + (idx.to(idt), off.to(idt), psw)


def ref_tables(c, flat):
    """Each table of a valid case as a [rows, D] view of the flat buffer."""
    out = []
    for t, (w, r) in enumerate(zip(c["woff"], c["rows"])):
        D = c["doff"][t + 1] - c["doff"][t]
        out.append(flat[w : w + r * D].view(r, D))
    return out


def call(fn):
    """(result, None) or (None, exception of the library's kinds)."""
    try:
        return fn(), None
    except ERRORS as e:
        return None, e


def report(c, what):
    print(f"{what}: {c}", flush=True)


@given(lookups())
def fuzz_embedding_bag(c):
    report(c, "embedding_bag")
    torch.manual_seed(c["seed"])
    t = tensors(c)
    if t is None:
        return
    woff, doff, rows, idx, off, psw = t
    weights = torch.randn(c["size"])
    saved = [x.clone() for x in (weights, woff, doff, rows, idx, off)]
    valid = layout_valid(c)
    total_dim = c["doff"][-1] if -(2**63) <= c["doff"][-1] < 2**63 else 0
    for sparse in (False, True):
        w = weights.clone().requires_grad_()
        out, err = call(
            lambda: ops.table_batched_embedding_bag(
                w,
                woff,
                doff,
                rows,
                idx,
                off,
                mode=c["mode"],
                per_sample_weights=psw,
                sparse=sparse,
                total_dim=total_dim,
            )
        )
        assert (err is None) == valid, f"valid={valid} but {err!r}"
        if err is not None:
            continue
        wr = weights.clone().requires_grad_()
        expect = reference.table_batched_embedding_bag(ref_tables(c, wr), idx, off, c["mode"], psw)
        torch.testing.assert_close(out, expect)
        grad = torch.randn_like(out)
        _, err = call(lambda: out.backward(grad))
        assert (err is None) == (sparse or layout_valid(c, disjoint=True)), repr(err)
        if err is None:
            expect.backward(grad)
            got = w.grad.to_dense() if w.grad is not None else torch.zeros_like(weights)
            want = wr.grad if wr.grad is not None else torch.zeros_like(weights)
            torch.testing.assert_close(got, want)
    for before, x in zip(saved, (weights, woff, doff, rows, idx, off)):
        assert torch.equal(before, x), "an input was modified"


@given(lookups(), st.sampled_from(list(ops.OPTIMIZERS)))
def fuzz_fused_update(c, optimizer):
    report(c, f"fused {optimizer}")
    torch.manual_seed(c["seed"])
    t = tensors(c)
    if t is None:
        return
    woff, doff, rows, idx, off, psw = t
    w = torch.randn(c["size"])
    spec = optimizers.spec(optimizer)
    n_rows = sum(r for r in c["rows"] if 0 <= r < 2**32)
    # Huge row counts are invalid anyway: no 16 GiB state.
    m1, m2 = (torch.zeros(min(spec.state_numel(i, w.numel(), n_rows), 4096)) for i in (1, 2))
    step, hp = (
        torch.zeros(1, dtype=torch.int64),
        torch.tensor([0.1, 1e-8, 0.9, 0.999, 0.0]).double(),
    )
    total_dim = c["doff"][-1] if -(2**63) <= c["doff"][-1] < 2**63 else 0
    w0 = w.clone()
    out, err = call(
        lambda: ops.table_batched_embedding_bag_with_optimizer(
            w,
            woff,
            doff,
            rows,
            idx,
            off,
            optimizer=optimizer,
            momentum1=m1,
            momentum2=m2,
            step=step,
            hparams=hp,
            mode=c["mode"],
            per_sample_weights=psw,
            total_dim=total_dim,
        )
    )
    valid = layout_valid(c, disjoint=True)
    assert (err is None) == valid, f"valid={valid} but {err!r}"
    if err is None and optimizer == "sgd":
        wr = w0.clone().requires_grad_()
        ref = reference.table_batched_embedding_bag(ref_tables(c, wr), idx, off, c["mode"], psw)
        g = torch.randn_like(ref)
        ref.backward(g)
        # The op's own autograd is bypassed here: call its update directly.
        torch.ops.dlrm_ops.embedding_bag_update_(
            g,
            w,
            m1,
            m2,
            step,
            woff,
            doff,
            rows,
            idx,
            off,
            pooling=ops.POOLING[c["mode"]],
            per_sample_weights=psw,
            hparams=hp,
            optimizer=ops.OPTIMIZERS["sgd"],
            stochastic_rounding=False,
        )
        torch.testing.assert_close(w, w0 - 0.1 * (wr.grad if wr.grad is not None else 0))
    assert torch.equal(w, w0) or (err is None and optimizer == "sgd")


@given(lookups(bits=8) | lookups(bits=4))
def fuzz_quantized_embedding_bag(c):
    report(c, "quantized")
    t = tensors(c)
    if t is None:
        return
    woff, doff, rows, idx, off, psw = t
    g = torch.Generator().manual_seed(c["seed"])
    packed = torch.randint(0, 256, (c["size"],), dtype=torch.uint8, generator=g)
    total_dim = c["doff"][-1] if -(2**63) <= c["doff"][-1] < 2**63 else 0
    out, err = call(
        lambda: ops.quantized_table_batched_embedding_bag(
            packed,
            woff,
            doff,
            rows,
            idx,
            off,
            bits=c["bits"],
            mode=c["mode"],
            per_sample_weights=psw,
            total_dim=total_dim,
        )
    )
    valid = layout_valid(c)
    assert (err is None) == valid, f"valid={valid} but {err!r}"
    if valid:
        tables = []
        for t_, (w, r) in enumerate(zip(c["woff"], c["rows"])):
            D = c["doff"][t_ + 1] - c["doff"][t_]
            row = D + 8 if c["bits"] == 8 else D // 2 + 4
            tables.append(ops.dequantize_rowwise(packed[w : w + r * row].view(r, row), c["bits"]))
        expect = reference.table_batched_embedding_bag(tables, idx, off, c["mode"], psw)
        # Random bytes make any scale and bias: where the sums reach 1e30 and
        # beyond, their order decides between finite and inf.
        tame = expect.isfinite() & (expect.abs() < 1e30)
        torch.testing.assert_close(out[tame], expect[tame], atol=1e-4, rtol=1e-4)


@st.composite
def interaction_case(draw):
    B, T, D = draw(st.integers(0, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    shape_s = draw(st.sampled_from(["3d", "2d", "bad_d", "bad_b", "1d", "empty_t"]))
    dtype_s = draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.int64]))
    return dict(
        B=B,
        T=T,
        D=D,
        shape=shape_s,
        dtype=dtype_s,
        self_=draw(st.booleans()),
        order=draw(st.sampled_from(["tril", "triu", "diag"])),
        strided=draw(st.booleans()),
    )


@given(interaction_case())
def fuzz_dot_interaction(c):
    report(c, "interaction")
    B, T, D = c["B"], c["T"], c["D"]
    dense = torch.randn(B, D)
    shapes = {
        "3d": (B, T, D),
        "2d": (B, T * D),
        "bad_d": (B, T, D + 1),
        "bad_b": (B + 1, T, D),
        "1d": (T * D,),
        "empty_t": (B, 0, D),
    }
    shape = shapes[c["shape"]]
    sparse = (
        torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2] if c["strided"] else torch.randn(*shape)
    )
    sparse = sparse.to(c["dtype"])
    saved = (dense.clone(), sparse.clone())
    d, s = dense.clone().requires_grad_(), sparse.clone()
    if s.is_floating_point():
        s.requires_grad_()
    out, err = call(
        lambda: ops.dot_interaction(d, s, self_interaction=c["self_"], order=c["order"])
    )
    valid = c["shape"] in ("3d", "2d") and c["dtype"] == torch.float32 and c["order"] != "diag"
    assert (err is None) == valid, f"valid={valid} but {err!r}"
    if valid:
        expect = reference.dot_interaction(dense, sparse.reshape(B, T, D), c["self_"], c["order"])
        torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
        out.sum().backward()
    assert torch.equal(dense, saved[0]) and torch.equal(sparse, saved[1])


@given(
    st.integers(0, 3),
    st.integers(0, 5),
    st.sampled_from([8, 4, 3]),
    st.sampled_from([torch.float32, torch.float16, torch.float64, torch.uint8]),
    st.integers(0, 12),
)
def fuzz_quantize(R, D, bits, dtype, packed_cols):
    print(f"quantize: {R} {D} {bits} {dtype} {packed_cols}", flush=True)
    w = torch.randn(R, D).to(dtype) if dtype != torch.uint8 else torch.zeros(R, D, dtype=dtype)
    q, err = call(lambda: ops.quantize_rowwise(w, bits))
    valid = (
        bits in (8, 4)
        and D >= 1
        and (bits == 8 or D % 2 == 0)
        and dtype in (torch.float32, torch.float16)
    )
    assert (err is None) == valid, f"valid={valid} but {err!r}"
    if valid:
        torch.testing.assert_close(q, reference.quantize_rowwise(w, bits))
    packed = torch.randint(0, 256, (R, packed_cols), dtype=torch.uint8)
    deq, err = call(lambda: ops.dequantize_rowwise(packed, bits))
    valid = bits == 8 and packed_cols > 8 or bits == 4 and packed_cols > 4
    assert (err is None) == valid, f"valid={valid} but {err!r}"
    if valid:
        torch.testing.assert_close(deq, reference.dequantize_rowwise(packed, bits), equal_nan=True)


@st.composite
def drop_in_case(draw):
    n = draw(st.integers(0, 6))
    return dict(
        num=draw(st.integers(1, 5)),
        mode=draw(st.sampled_from(["sum", "mean"])),
        input=[draw(edge_or(-2, 6)) for _ in range(n)],
        offsets=[0] + sorted(draw(st.integers(0, n)) for _ in range(draw(st.integers(0, 3)))),
        bad_offsets=draw(st.sampled_from([None, "first", "drop", "past", "float"])),
        int32=draw(st.booleans()),
        psw=draw(st.sampled_from([None, "ok", "short"])),
        two_d=draw(st.booleans()),
    )


@given(drop_in_case())
def fuzz_embedding_bag_module(c):
    """dlrm_ops.nn.EmbeddingBag against torch.nn.EmbeddingBag: where torch
    raises, it raises; where torch answers, it answers the same (it may refuse
    options torch takes)."""
    report(c, "module")
    ours = dlrm_ops.nn.EmbeddingBag(c["num"], 4, mode=c["mode"])
    theirs = torch.nn.EmbeddingBag(c["num"], 4, mode=c["mode"])
    theirs.weight = ours.weight
    off = list(c["offsets"])
    if c["bad_offsets"] == "first":
        off[0] = 1
    elif c["bad_offsets"] == "drop" and len(off) > 1:
        off[-1], off[0] = 0, 0
        off = [0, len(c["input"]), 0] if c["input"] else off
    elif c["bad_offsets"] == "past":
        off.append(len(c["input"]) + 2)
    idt = torch.int32 if c["int32"] else torch.int64
    try:
        inp = torch.tensor(c["input"], dtype=idt)
    except RuntimeError:
        return
    offsets = torch.tensor(off, dtype=torch.float32 if c["bad_offsets"] == "float" else torch.int64)
    psw = None if c["psw"] is None else torch.rand(len(c["input"]) + (c["psw"] == "short"))
    args = (inp, offsets)
    if c["two_d"] and len(c["input"]) % 2 == 0:
        args = (inp.view(2, -1) if c["input"] else inp.view(0, 2),)
        psw = psw.view(args[0].shape) if psw is not None and c["psw"] == "ok" else psw
    want, werr = call(lambda: theirs(*args, per_sample_weights=psw))
    got, gerr = call(lambda: ours(*args, per_sample_weights=psw))
    assert not (gerr is None and werr is not None), f"torch raised {werr!r}, we returned {got}"
    if gerr is None:
        torch.testing.assert_close(got, want)


FAMILIES = {
    f.__name__[len("fuzz_") :]: f
    for f in (
        fuzz_embedding_bag,
        fuzz_fused_update,
        fuzz_quantized_embedding_bag,
        fuzz_dot_interaction,
        fuzz_quantize,
        fuzz_embedding_bag_module,
    )
}


if __name__ == "__main__":
    family, examples = sys.argv[1], int(sys.argv[2])
    test = settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )(FAMILIES[family])
    test()
    print(f"{family}: {examples} examples passed")
