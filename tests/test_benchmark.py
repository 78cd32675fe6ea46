"""The benchmark's contenders compute what they claim: each returns the same
pooled result as dlrm_ops (a fast wrong contender would make a ratio lie)."""

import numpy as np
import pytest
import torch

from dlrm_ops.benchmark import (
    _fbgemm_training_tbe,
    _load_probe,
    embedding_bag_contenders,
    make_tbe_inputs,
    quantized_contenders,
    training_contenders,
    zipf_indices,
)

from utils import anon_huge_kib, thp_available


def test_forward_contenders_agree():
    """On every batch in turn, and each contender moves on to the next batch."""
    inp = make_tbe_inputs(3, 500, 32, 8, 4, batches=3)
    fns = embedding_bag_contenders(inp, threads=1)
    ours = fns.pop("dlrm_ops")
    fns.pop("C gather probe", None)  # writes into its own buffer: test_c_probe_pools
    seen = []
    for _ in range(4):
        expect = ours()
        seen.append(expect)
        for name, f in fns.items():
            torch.testing.assert_close(f(), expect, msg=name)
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    assert torch.equal(seen[3], seen[0])  # the cycle starts over


def test_batches_share_hot_rows():
    """A table's batches are fresh draws over the same popular rows, so a
    cycle of them is cold in cache except where training's would be hot."""
    a, b = zipf_indices(100_000, 20_000, seed=3, draws=2)
    assert not np.array_equal(a, b)
    assert np.array_equal(a, zipf_indices(100_000, 20_000, seed=3)[0])  # draw 0: as ever
    top = lambda x: set(np.argsort(np.bincount(x, minlength=100_000))[-20:])  # noqa: E731
    assert len(top(a) & top(b)) >= 15
    other = zipf_indices(100_000, 20_000, seed=4)[0]
    assert len(top(a) & top(other)) <= 2
    inp = make_tbe_inputs(2, 1000, 8, 16, 2, batches=2)
    assert len(inp.batches) == 2 and not torch.equal(inp.batches[0], inp.batches[1])
    assert torch.equal(inp.indices, inp.batches[0])
    with pytest.raises(ValueError, match="batches must be at least 1, got 0"):
        make_tbe_inputs(2, 1000, 8, 16, 2, batches=0)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_contenders_agree(bits):
    inp = make_tbe_inputs(3, 500, 32, 8, 4)
    fns = quantized_contenders(inp, bits)
    expect = fns[f"dlrm_ops int{bits}"]()
    torch.testing.assert_close(fns[f"torch int{bits} loop"](), expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [32, 8])
def test_c_probe_pools(bits):
    if _load_probe() is None:
        pytest.skip("no C compiler")
    inp = make_tbe_inputs(3, 500, 32, 8, 4)
    ebc = inp.ebc
    if bits == 8:
        from dlrm_ops.nn import QuantizedEmbeddingBagCollection

        q = QuantizedEmbeddingBagCollection.from_float(ebc, 8)
        w = torch.cat([q.packed_of(t) for t in range(3)])
        expect = q(inp.indices, inp.offsets)
        probe = _load_probe("pool_int8")
    else:
        w = ebc.weight.detach()
        expect = ebc(inp.indices, inp.offsets).detach()
        probe = _load_probe("pool")
    out = torch.empty(8, 3 * 32)
    probe(
        w.data_ptr(),
        500,
        32,
        3,
        8,
        inp.indices.data_ptr(),
        inp.offsets.data_ptr(),
        out.data_ptr(),
        1,
    )
    torch.testing.assert_close(out, expect, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "optimizer,L", [("sgd", 4), ("sgd", 1), ("rowwise_adagrad", 4), ("adagrad", 4)]
)
def test_training_contenders_update_alike(optimizer, L):
    """One step of every training contender from the same weights makes the
    same weights (ours and torch's share one buffer, FBGEMM has its own)."""
    inp = make_tbe_inputs(3, 500, 32, 8, L)
    fns = training_contenders(inp, optimizer, lr=0.1)
    weight = inp.ebc.weight.detach()
    before = weight.clone()
    fns.pop("dlrm_ops fused")()
    expect = weight.clone()
    assert not torch.equal(expect, before)
    tbe = fns.pop("fbgemm TBE", None)
    for name, step in fns.items():
        weight.copy_(before)
        step()
        torch.testing.assert_close(weight, expect, atol=1e-6, rtol=1e-5, msg=name)
    if tbe is not None:
        tbe()
        torch.testing.assert_close(
            tbe.tbe.weights_host.view_as(expect), expect, atol=1e-6, rtol=1e-5, msg="fbgemm TBE"
        )


@pytest.mark.parametrize(
    "optimizer, name", [("sgd", "C SGD floor probe"), ("rowwise_adagrad", "C row-wise floor probe")]
)
def test_c_floor_probes_step_one_lookup_per_bag(optimizer, name):
    """The floor probes take each batch's lookups sorted up front and make
    our step's weights (and row-wise state) and forward output; only at one
    lookup per bag."""
    if _load_probe("floor_step") is None:
        pytest.skip("no C compiler")
    inp = make_tbe_inputs(3, 500, 32, 8, 1, batches=2)
    weight = inp.ebc.weight.detach()
    before = weight.clone()
    fns = training_contenders(inp, optimizer, lr=0.1)
    expect_out = inp.ebc(inp.batches[0], inp.offsets).detach()
    fns["dlrm_ops fused"]()
    expect = weight.clone()
    weight.copy_(before)
    floor = fns[name]
    floor()
    torch.testing.assert_close(weight, expect, atol=1e-6, rtol=1e-5)
    assert torch.equal(floor.out, expect_out)  # a row copied is its one-lookup bag's sum
    if optimizer != "sgd":
        state = fns["dlrm_ops fused"].module.momentum1
        assert state.abs().sum() > 0
        torch.testing.assert_close(floor.state, state, atol=1e-6, rtol=1e-5)
    assert name not in training_contenders(make_tbe_inputs(2, 50, 32, 4, 2), optimizer)
    assert name not in training_contenders(make_tbe_inputs(2, 50, 36, 4, 1), optimizer)


def test_c_sgd_step_probe_only_where_its_rows_fit():
    """The probe sums a row on its stack (D <= 1024): wider rows get no probe
    rather than an overflow."""
    if _load_probe("sgd_step") is None:
        pytest.skip("no C compiler")
    assert "C SGD step probe" in training_contenders(make_tbe_inputs(2, 50, 1024, 4, 1), "sgd")
    assert "C SGD step probe" not in training_contenders(make_tbe_inputs(2, 50, 1040, 4, 1), "sgd")


@pytest.mark.skipif(not thp_available(), reason="needs Linux with transparent huge pages")
def test_fbgemm_buffers_move_onto_huge_pages():
    """FBGEMM's contender gets huge pages as ours does (its constructor touches
    its buffers first), with our weights and its own initial state."""
    pytest.importorskip("fbgemm_gpu")
    inp = make_tbe_inputs(2, 300_000, 32, 8, 1)  # 2 x 38 MB of weights, as much Adagrad state
    before = anon_huge_kib()
    tbe = _fbgemm_training_tbe(inp, "adagrad", lr=0.1, eps=1e-10)
    assert anon_huge_kib() - before >= 100 * 1024
    assert torch.equal(tbe.weights_host, inp.ebc.weight.detach().view(-1))
    assert tbe.momentum1_host.numel() == tbe.weights_host.numel()
    assert tbe.momentum1_host.abs().sum() == 0
    out = tbe(inp.indices, inp.offsets)
    torch.testing.assert_close(out, inp.ebc(inp.indices, inp.offsets))
    out.sum().backward()
    assert tbe.momentum1_host.abs().sum() > 0  # the step updated the moved state
