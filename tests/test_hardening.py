"""Regressions of inputs that once crashed the process or gave a silent wrong
answer. Calls that once crashed run in a child process: a signal fails the
test instead of the run."""

import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from dlrm_ops import checkpoint, ops
from dlrm_ops.data import criteo
from dlrm_ops.nn import EmbeddingBag, EmbeddingBagCollection


def L(*a):
    return torch.tensor(a)


def run_isolated(code: str) -> subprocess.CompletedProcess:
    """Runs `code` (with torch, ops and L imported) in a child process."""
    prelude = "import torch\nfrom dlrm_ops import ops\nL = lambda *a: torch.tensor(a)\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def raises_in_child(code: str, match: str) -> None:
    r = run_isolated(
        f"try:\n{textwrap.indent(textwrap.dedent(code), '    ')}\n"
        f"except RuntimeError as e:\n    print('RAISED', e)\n"
    )
    assert r.returncode == 0, f"child died (rc {r.returncode}): {r.stderr[-2000:]}"
    assert "RAISED" in r.stdout and match in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------- overflow


@pytest.mark.parametrize(
    "call,match",
    [
        (
            "ops.table_batched_embedding_bag(torch.zeros(257), L(2**63-2**40), L(0,257), "
            "L(2**32-1), L(0), L(0,1))",
            "does not fit in weights of 257 elements",
        ),
        (
            "ops.table_batched_embedding_bag(torch.zeros(64), L(0,0,0,0,0), "
            "L(0,2**62,-2**63,-2**62,0,8), L(0,0,0,0,1), L(0), L(0,0,0,0,0,1))",
            "must have dim >= 1",
        ),
        (
            "ops.quantized_table_batched_embedding_bag(torch.zeros(265, dtype=torch.uint8), "
            "L(2**63-2**40), L(0,257), L(2**32-1), L(0), L(0,1), bits=8)",
            "does not fit in packed of 265 bytes",
        ),
        (
            "ops.table_batched_embedding_bag(torch.zeros(80), L(2**63-50), L(0,8), L(10), L(0), "
            "L(0,1))",
            "does not fit in weights of 80 elements",
        ),
        (
            "ops.quantized_table_batched_embedding_bag(torch.zeros(64, dtype=torch.uint8), L(0), "
            "L(0,2**63-4), L(1), L(0), L(0,1), bits=8)",
            "does not fit in packed",
        ),
        (
            "ops.dot_interaction(torch.zeros(0, 1), torch.zeros(0, 1, 1).expand(0, 2**40, 1))",
            "too many features",
        ),
        (
            "ops.dot_interaction(torch.zeros(0, 1), torch.zeros(0, 1, 1).expand(0, 2**62 - 1, 1))",
            "too many features",
        ),
    ],
)
def test_metadata_overflow_raises(call, match):
    raises_in_child(call, match)


# ---------------------------------------------------------- wrong answers


@pytest.mark.parametrize("where", ["indices", "offsets", "per_sample_weights", "weights_offsets"])
def test_meta_tensor_mixed_with_cpu_raises(where):
    args = dict(
        weights=torch.randn(40),
        weights_offsets=L(0),
        dim_offsets=L(0, 4),
        rows=L(10),
        indices=L(1, 2),
        offsets=L(0, 2),
        per_sample_weights=torch.rand(2),
    )
    args[where] = args[where].to("meta")
    with pytest.raises(RuntimeError, match=f"{where} must be on the same device as weights"):
        ops.table_batched_embedding_bag(
            args["weights"],
            args["weights_offsets"],
            args["dim_offsets"],
            args["rows"],
            args["indices"],
            args["offsets"],
            per_sample_weights=args["per_sample_weights"],
            total_dim=4,
        )


def test_meta_tensor_mixed_in_interaction_and_quantized_raises():
    with pytest.raises(RuntimeError, match="sparse must be on the same device as dense"):
        ops.dot_interaction(torch.zeros(2, 4), torch.zeros(2, 3, 4, device="meta"))
    packed = ops.quantize_rowwise(torch.randn(10, 4))
    with pytest.raises(RuntimeError, match="indices must be on the same device as packed"):
        ops.quantized_table_batched_embedding_bag(
            packed.view(-1), L(0), L(0, 4), L(10), L(1).to("meta"), L(0, 1), total_dim=4
        )
    # All on meta is fine: shapes only.
    out = ops.dot_interaction(torch.zeros(2, 4, device="meta"), torch.zeros(2, 3, 4, device="meta"))
    assert out.shape == (2, 4 + 6) and out.device.type == "meta"


def test_tables_sharing_rows():
    """Shared rows: the forward and the sparse gradient are right; the dense
    gradient and the fused update refuse them rather than lose a part."""
    w = torch.randn(40, requires_grad=True)
    meta = (L(0, 0), L(0, 4, 8), L(10, 10), L(1, 1), L(0, 1, 2))
    out = ops.table_batched_embedding_bag(w, *meta)
    torch.testing.assert_close(out, torch.cat([w[4:8], w[4:8]]).unsqueeze(0))
    with pytest.raises(RuntimeError, match="tables 0 and 1 share elements of weights"):
        out.sum().backward()
    ws = w.detach().view(10, 4).clone().requires_grad_()
    ops.table_batched_embedding_bag(ws, *meta, sparse=True).sum().backward()
    assert ws.grad.to_dense()[1].tolist() == [2.0] * 4
    before = w.detach().clone()
    with pytest.raises(RuntimeError, match="share elements"):
        ops.table_batched_embedding_bag_with_optimizer(
            w.detach(),
            *meta,
            optimizer="sgd",
            momentum1=torch.zeros(0),
            momentum2=torch.zeros(0),
            step=L(0),
            hparams=torch.tensor([0.1, 0, 0, 0, 0.0]).double(),
        )
    assert torch.equal(w.detach(), before)
    # Partial overlap too, and tables of zero rows may sit anywhere.
    with pytest.raises(RuntimeError, match="share elements"):
        torch.ops.dlrm_ops.embedding_bag_backward_dense(
            torch.ones(1, 8),
            w.detach(),
            L(0, 36),
            L(0, 4, 8),
            L(10, 1),
            L(1, 0),
            L(0, 1, 2),
            pooling=ops.Pooling.SUM,
            per_sample_weights=None,
        )
    g = torch.ops.dlrm_ops.embedding_bag_backward_dense(
        torch.ones(1, 8),
        w.detach(),
        L(0, 0),
        L(0, 4, 8),
        L(10, 0),
        L(1),
        L(0, 1, 1),
        pooling=ops.Pooling.SUM,
        per_sample_weights=None,
    )
    assert g.sum() == 4


def test_fused_update_bumps_the_weight_version():
    e = EmbeddingBagCollection([10], 4, optimizer="sgd", lr=0.1)
    v = e.weight._version
    e(L(1, 2), L(0, 1, 2)).sum().backward()
    assert e.weight._version > v


def test_second_backward_through_stale_weights_raises():
    """Two fused forwards with per-sample weights in one graph: the second
    backward would read the weights after the first's update."""
    e = EmbeddingBagCollection([10], 4, optimizer="sgd", lr=0.1)
    psw = torch.rand(2, requires_grad=True)
    out = e(L(1, 2), L(0, 1, 2), psw).sum() + e(L(1, 2), L(0, 1, 2), psw).sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_two_fused_forwards_without_weight_reads_update_twice():
    """Without per-sample-weight gradients the backward reads no saved weights:
    two forwards of one module in a graph are two SGD steps, as torch's."""
    e = EmbeddingBagCollection([10], 4, optimizer="sgd", lr=0.1)
    w0 = e.weight.detach().clone()
    (e(L(1), L(0, 1)).sum() + e(L(1), L(0, 1)).sum()).backward()
    torch.testing.assert_close(e.weight[1], w0[1] - 0.2)


def test_drop_in_offsets_are_never_narrowed():
    bag = EmbeddingBag(10, 4)
    with pytest.raises(RuntimeError):  # torch raises too: offsets[-1] is past the input
        bag(L(1, 2).int(), L(0, 2**32 + 1))
    with pytest.raises(RuntimeError, match="offsets must have dtype int32 or int64"):
        bag(L(1, 2), L(0, 1.0))
    ref = torch.nn.EmbeddingBag(10, 4)
    ref.weight = bag.weight
    torch.testing.assert_close(bag(L(1, 2).int(), L(0, 1)), ref(L(1, 2).int(), L(0, 1)))


def test_drop_in_2d_per_sample_weights_shape():
    bag = EmbeddingBag(10, 4, mode="sum")
    inp = torch.randint(0, 10, (2, 3))
    for bad in (torch.rand(3, 2), torch.rand(6)):
        with pytest.raises(ValueError, match="must have the same shape as the input"):
            bag(inp, per_sample_weights=bad)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(optimizer="sgd", lr=-1.0), "learning rate"),
        (dict(optimizer="sgd", lr=float("nan")), "learning rate"),
        (dict(optimizer="adagrad", eps=-1e-8), "epsilon"),
        (dict(optimizer="adam", betas=(1.0, 0.999)), "beta parameter at index 0"),
        (dict(optimizer="adam", betas=(0.9, -0.1)), "beta parameter at index 1"),
        (dict(optimizer="rowwise_adagrad", weight_decay=-1.0), "weight_decay"),
        (dict(optimizer="adagrad", lr=float("inf")), "learning rate"),
    ],
)
def test_bad_hyperparameters_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        EmbeddingBagCollection([10], 4, **kw)


def test_bad_hyperparameters_raise_in_the_op_and_setter():
    e = EmbeddingBagCollection([10], 4, optimizer="adam", lr=0.1)
    with pytest.raises(ValueError, match="learning rate"):
        e.lr = -0.5
    w0 = e.weight.detach().clone()
    with torch.no_grad():
        e.hparams[2] = 1.0  # beta1, e.g. from a state_dict
    out = e(L(1), L(0, 1)).sum()
    with pytest.raises(RuntimeError, match=r"invalid beta1 \(must be in \[0, 1\)\)"):
        out.backward()
    assert torch.equal(e.weight.detach(), w0) and int(e.step) == 0


def test_backward_sparse_and_psw_grad_check_indices():
    g, w = torch.randn(1, 4), torch.randn(10, 4)
    for op in (
        torch.ops.dlrm_ops.embedding_bag_backward_sparse,
        torch.ops.dlrm_ops.embedding_bag_per_sample_weights_grad,
    ):
        for bad in (10**9, -1, 10):
            args = (g, w, L(0), L(0, 4), L(10), L(bad), L(0, 1))
            kwargs = dict(pooling=ops.Pooling.SUM)
            if op is torch.ops.dlrm_ops.embedding_bag_backward_sparse:
                kwargs["per_sample_weights"] = None
            with pytest.raises(RuntimeError, match=f"indices\\[0\\] = {bad} is out of range"):
                op(*args, **kwargs)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_empty_batch(sparse, index_dtype):
    w = torch.randn(10, 4, requires_grad=True)
    idx, off = torch.zeros(0, dtype=index_dtype), torch.zeros(1, dtype=index_dtype)
    out = ops.table_batched_embedding_bag(w, L(0), L(0, 4), L(10), idx, off, sparse=sparse)
    assert out.shape == (0, 4)
    out.sum().backward()
    assert w.grad.is_sparse == sparse and torch.count_nonzero(w.grad.to_dense()) == 0
    bag = EmbeddingBag(10, 4, sparse=sparse)
    bag(torch.zeros(0, 3, dtype=torch.long)).sum().backward()
    assert bag.weight.grad.shape == (10, 4)


# ------------------------------------------------------------ checkpoints


def _save(path, model=None):
    model = model or torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoint.save(str(path), model.state_dict(), opt.state_dict(), 7, {"seed": 1, "x": [1, 2]})
    return model


def test_checkpoint_round_trip(tmp_path):
    model = _save(tmp_path / "m.pt")
    ck = checkpoint.load(str(tmp_path / "m.pt"))
    assert ck["step"] == 7 and ck["args"] == {"seed": 1, "x": [1, 2]}
    torch.testing.assert_close(ck["model"]["weight"], model.weight.detach())


def test_checkpoint_refuses_pickled_code(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Boom(), "optimizer": {}, "step": 0, "args": {}, "sha256": ""}, path)
    with pytest.raises(checkpoint.CheckpointError, match="objects other than tensors"):
        checkpoint.load(str(path))
    assert not (tmp_path / "pwned").exists()


def test_checkpoint_detects_a_flipped_byte(tmp_path):
    path = tmp_path / "m.pt"
    _save(path, torch.nn.Linear(64, 64))
    data = bytearray(path.read_bytes())
    w = torch.load(path, weights_only=True)["model"]["weight"]
    pos = bytes(data).find(w.view(-1)[:4].numpy().tobytes())  # the tensor's stored bytes
    assert pos > 0
    data[pos + 1] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="corrupted"):
        checkpoint.load(str(path))


def test_checkpoint_without_expected_keys(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(checkpoint.CheckpointError, match="lacks 'model', 'optimizer'"):
        checkpoint.load(str(path))
    torch.save([1, 2], path)
    with pytest.raises(checkpoint.CheckpointError, match="not a dlrm_ops checkpoint"):
        checkpoint.load(str(path))
    path.write_bytes(b"not a zip")
    with pytest.raises(checkpoint.CheckpointError, match="not a readable checkpoint"):
        checkpoint.load(str(path))


def test_evaluate_refuses_a_crafted_checkpoint(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump(Boom(), f)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dlrm_ops",
            "evaluate",
            "--load-model",
            str(path),
            "--num-test-batches",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode != 0 and "--load-model" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "pwned").exists()


def test_save_removes_stale_temporaries(tmp_path):
    path = tmp_path / "m.pt"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    stale = tmp_path / f"m.pt.tmp.{dead}"
    stale.write_bytes(b"x" * 100)
    live = tmp_path / f"m.pt.tmp.{os.getppid()}"  # a running process's save is left alone
    live.write_bytes(b"y")
    _save(path)
    assert not stale.exists() and live.exists()
    assert checkpoint.load(str(path))["step"] == 7


# ---------------------------------------------------------------- Criteo


def _criteo_line(label, i):
    return "\t".join([str(label)] + [str(i)] * 13 + [f"{i:08x}"] * 26)


def test_criteo_keeps_a_last_line_without_newline(tmp_path):
    raw = tmp_path / "train.txt"
    raw.write_text("\n".join(_criteo_line(i % 2, i) for i in range(70)))  # no final newline
    meta = criteo.preprocess_criteo([str(raw)], str(tmp_path / "p"), "kaggle", 1000)
    assert sum(meta["days"].values()) == 70


def test_criteo_huge_integer_field(tmp_path):
    line = _criteo_line(1, 3).split("\t")
    line[1] = "9" * 400
    _, dense, _ = criteo.parse_line("\t".join(line), "f:1", 1000, None)
    assert dense[0] == pytest.approx(400 * np.log(10), rel=1e-6)
    line[1] = "9" * 5000  # past Python's int parsing limit: a malformed line, with its place
    with pytest.raises(criteo.MalformedLineError, match="f:1: I1"):
        criteo.parse_line("\t".join(line), "f:1", 1000, None)


def test_criteo_processed_folder_follows_its_raw_file(tmp_path):
    raw, out = tmp_path / "train.txt", str(tmp_path / "p")
    raw.write_text("".join(_criteo_line(0, i) + "\n" for i in range(70)))
    criteo.preprocess_criteo([str(raw)], out, "kaggle", 1000)
    raw.write_text("".join(_criteo_line(1, i) + "\n" for i in range(140)))  # another file
    meta = criteo.preprocess_criteo([str(raw)], out, "kaggle", 1000)
    assert sum(meta["days"].values()) == 140
    labels = np.fromfile(os.path.join(out, "day_0.labels.bin"), dtype=np.float32)
    assert labels.min() == 1.0
    recorded = json.loads((tmp_path / "p" / "meta.json").read_text())["source"]
    assert recorded["raw_files"][0]["size"] == raw.stat().st_size
    # Other options redo it too.
    meta = criteo.preprocess_criteo([str(raw)], out, "kaggle", 500)
    assert meta["table_sizes"] == [500] * 26


# ---------------------------------------------------------------- threads


def test_concurrent_fused_training_loses_no_update():
    """Python threads training one module: every step's update lands (without
    the lock, this lost about 1 in 4000 of them)."""
    import threading

    e = EmbeddingBagCollection([1000], 64, optimizer="sgd", lr=1.0)
    with torch.no_grad():
        e.weight.zero_()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 8, (20000,), generator=g)  # 8 hot rows
    off, grad = torch.arange(20001), torch.ones(20000, 64)

    def work():
        for _ in range(60):
            e(idx, off).backward(grad)

    threads = [threading.Thread(target=work) for _ in range(8)]
    intra = torch.get_num_threads()
    torch.set_num_threads(1)  # the calls overlap more so
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(intra)
    assert float(e.weight.detach().sum()) == -8 * 60 * 20000 * 64
    assert int(e.step) == 480


def test_fused_updates_run_one_at_a_time(monkeypatch):
    """The deterministic form of the test above: updates called from several
    threads never overlap."""
    import threading
    import time

    real, active, seen = ops._ops, [0], []

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def embedding_bag_update_(self, *args):
            active[0] += 1
            seen.append(active[0])
            time.sleep(0.002)
            real.embedding_bag_update_(*args)
            active[0] -= 1

    monkeypatch.setattr(ops, "_ops", Spy())
    e = EmbeddingBagCollection([10], 4, optimizer="adagrad", lr=0.1)
    threads = [
        threading.Thread(target=lambda: [e(L(1), L(0, 1)).sum().backward() for _ in range(5)])
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 20 and max(seen) == 1
