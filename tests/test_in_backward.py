"""dlrm_ops.apply_optimizer_in_backward on a user's own model: the fused
update equals torch.optim's unfused training step by step, follows the param
group's hyperparameters, and round-trips through state_dicts."""

import copy

import pytest
import torch

import dlrm_ops
from dlrm_ops import benchmark_dropin

TABLES = [50, 30, 20]


class Model(torch.nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.emb = torch.nn.ModuleList(
            [torch.nn.EmbeddingBag(n, 8, mode="sum", sparse=True, dtype=dtype) for n in TABLES]
        )
        self.lin = torch.nn.Linear(24, 1, dtype=dtype)

    def forward(self, idx, off):
        return self.lin(torch.cat([e(i, o) for e, i, o in zip(self.emb, idx, off)], 1)).sum()


def data(steps=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = [torch.randint(0, n, (12,), generator=g) for n in TABLES]  # repeated rows
        yield idx, [torch.tensor([0, 3, 7, 7]) for _ in TABLES]


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, initial_accumulator_value=0.1),
    "sparse_adam": lambda p: torch.optim.SparseAdam(p, lr=0.05, betas=(0.8, 0.99)),
}


def pair(make_opt, **kw):
    torch.manual_seed(0)
    stock = Model()
    ours = copy.deepcopy(stock)
    dlrm_ops.convert(ours)
    opt_stock = make_opt(list(stock.emb.parameters()))
    opt_ours = make_opt(list(ours.emb.parameters()))
    names = dlrm_ops.apply_optimizer_in_backward(opt_ours, ours, **kw)
    assert names == ["emb.0", "emb.1", "emb.2"]
    return stock, opt_stock, ours, opt_ours


def train(model, opt, steps, scheduler=None):
    for idx, off in steps:
        opt.zero_grad()
        model(idx, off).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def assert_same_tables(a, b, **tol):
    for x, y in zip(a.emb, b.emb):
        torch.testing.assert_close(y.weight, x.weight, **(tol or dict(atol=1e-5, rtol=1e-4)))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_equals_unfused_training_with_a_scheduler(name):
    stock, opt_stock, ours, opt_ours = pair(OPTIMIZERS[name])
    sched = [torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5) for o in (opt_stock, opt_ours)]
    for step in data():
        train(stock, opt_stock, [step], sched[0])
        train(ours, opt_ours, [step], sched[1])
        assert_same_tables(stock, ours)
        assert all(e.weight.grad is None for e in ours.emb)


def test_adam_is_lazy_as_sparse_adam():
    """torch.optim.Adam refuses sparse gradients; fused, it behaves as SparseAdam."""
    torch.manual_seed(0)
    stock = Model()
    ours = copy.deepcopy(stock)
    dlrm_ops.convert(ours)
    opt_stock = torch.optim.SparseAdam(list(stock.emb.parameters()), lr=0.05)
    opt_ours = torch.optim.Adam(list(ours.emb.parameters()), lr=0.05)
    dlrm_ops.apply_optimizer_in_backward(opt_ours, ours)
    steps = list(data())
    train(stock, opt_stock, steps)
    train(ours, opt_ours, steps)
    assert_same_tables(stock, ours)


def test_lr_edits_take_effect_and_state_dicts_round_trip(tmp_path):
    _, _, ours, opt = pair(OPTIMIZERS["adagrad"])
    steps = list(data(6))
    train(ours, opt, steps[:2])
    opt.param_groups[0]["lr"] = 0.0  # no change at lr 0
    w = [e.weight.detach().clone() for e in ours.emb]
    train(ours, opt, steps[2:3])
    assert all(torch.equal(a, e.weight) for a, e in zip(w, ours.emb))
    opt.param_groups[0]["lr"] = 0.1
    torch.save({"model": ours.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    train(ours, opt, steps[3:])
    # A fresh model and optimizer from the checkpoint make the same steps.
    torch.manual_seed(0)
    again = Model()
    dlrm_ops.convert(again)
    opt2 = OPTIMIZERS["adagrad"](list(again.emb.parameters()))
    dlrm_ops.apply_optimizer_in_backward(opt2, again)
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    again.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    train(again, opt2, steps[3:])
    assert_same_tables(ours, again, atol=0, rtol=0)
    assert sorted(opt.state[ours.emb[0].weight]) == ["step", "sum"]  # torch's keys


def test_rowwise_adagrad_on_request():
    _, _, ours, opt = pair(OPTIMIZERS["adagrad"], rowwise_adagrad=True)
    train(ours, opt, list(data(2)))
    st = opt.state[ours.emb[0].weight]
    assert st["sum"].shape == (TABLES[0],) and int(st["step"]) == 2


def test_collection_and_no_grad_paths():
    ebc = dlrm_ops.nn.EmbeddingBagCollection(TABLES, 8)
    opt = torch.optim.SGD(ebc.parameters(), lr=0.1)
    dlrm_ops.apply_optimizer_in_backward(opt, ebc)
    idx = torch.tensor([1, 2, 3])
    off = torch.tensor([0, 1, 2, 3])
    w0 = ebc.weight.detach().clone()
    with torch.no_grad():
        ebc(idx, off)  # no update without grad
    assert torch.equal(ebc.weight, w0)
    ebc(idx, off).sum().backward()
    assert ebc.weight.grad is None and not torch.equal(ebc.weight, w0)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "momentum=0.9"),
        (lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.1), "weight_decay"),
        (lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.1), "lr_decay"),
        (lambda p: torch.optim.Adam(p, lr=0.1, amsgrad=True), "amsgrad"),
        (lambda p: torch.optim.RMSprop(p, lr=0.1), "not RMSprop"),
    ],
)
def test_refused_optimizers(make, match):
    model = dlrm_ops.convert(Model())
    with pytest.raises(ValueError, match=match):
        dlrm_ops.apply_optimizer_in_backward(make(list(model.parameters())), model)


def test_unconverted_model_is_converted_and_other_models_refused():
    model = Model()
    names = dlrm_ops.apply_optimizer_in_backward(torch.optim.SGD(model.parameters(), lr=0.1), model)
    assert names == ["emb.0", "emb.1", "emb.2"]
    assert type(model.emb).__name__ == "EmbeddingBagList"
    with pytest.raises(ValueError, match="no dlrm_ops embedding module"):
        lin = torch.nn.Linear(2, 2)
        dlrm_ops.apply_optimizer_in_backward(torch.optim.SGD(lin.parameters(), lr=0.1), lin)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("sparse", [True, False])
def test_one_call_for_a_list_of_tables(name, sparse):
    """A converted ModuleList looks all its tables up in one call, forward,
    gradients and fused update equal to the tables' own calls; the items keep
    their Parameters and state_dict keys."""
    torch.manual_seed(0)
    stock = Model()
    for e in stock.emb:
        e.sparse = sparse
    ours = copy.deepcopy(stock)
    params = [e.weight for e in ours.emb]
    dlrm_ops.convert(ours)
    assert type(ours.emb).__name__ == "EmbeddingBagList"
    assert [e.weight for e in ours.emb] == params and list(ours.state_dict()) == list(
        stock.state_dict()
    )
    for idx, off in data(2):
        out = ours.emb(off, idx)
        expect = [e(i, o) for e, i, o in zip(stock.emb, idx, off)]
        for a, b in zip(out, expect):
            torch.testing.assert_close(a, b)
        sum(o.pow(2).sum() for o in out).backward()
        sum(o.pow(2).sum() for o in expect).backward()
        for a, b in zip(ours.emb, stock.emb):
            torch.testing.assert_close(a.weight.grad.to_dense(), b.weight.grad.to_dense())
    if not sparse and name != "sgd":
        return  # torch's Adagrad and SparseAdam need sparse gradients
    opt_stock = OPTIMIZERS[name](list(stock.emb.parameters()))
    opt_ours = OPTIMIZERS[name](list(ours.emb.parameters()))
    dlrm_ops.apply_optimizer_in_backward(opt_ours, ours)
    for idx, off in data(3, seed=5):
        for model, opt in ((stock, opt_stock), (ours, opt_ours)):
            opt.zero_grad()
            if model is ours:
                outs = model.emb(off, idx)
            else:
                outs = [e(i, o) for e, i, o in zip(model.emb, idx, off)]
            sum(o.pow(2).sum() for o in outs).backward()
            opt.step()
        assert_same_tables(stock, ours)


def test_dlrm_style_model_accelerated_in_three_lines():
    """The benchmark's facebookresearch/dlrm-style model: the accelerated copy
    trains as the stock one does."""
    tables, D = [40, 30, 20], 8
    torch.manual_seed(0)
    stock = benchmark_dropin.UserDLRM(tables, D, [13, 16, 8], [16, 1])
    ours = copy.deepcopy(stock)
    opt_stock = torch.optim.SGD(stock.parameters(), lr=0.05)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.05)
    benchmark_dropin.accelerate(ours, opt_ours)
    for b in benchmark_dropin.batches(tables, 16, 2, 3):
        losses = [
            benchmark_dropin.train_step(m, o)(b) for m, o in ((stock, opt_stock), (ours, opt_ours))
        ]
        torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-5)
    for a, b in zip(stock.emb_l, ours.emb_l):
        torch.testing.assert_close(b.weight, a.weight, atol=1e-6, rtol=1e-5)


def test_list_call_checks_its_arguments():
    model = dlrm_ops.convert(Model())
    idx, off = next(data(1))
    with pytest.raises(ValueError, match=r"one tensor per table \(3\), got 2 and 3"):
        model.emb(off[:2], idx)
    off[1] = torch.tensor([0, 3, 7])  # another batch size
    with pytest.raises(ValueError, match="must hold the batch size"):
        model.emb(off, idx)


def test_list_follows_its_items_through_to_and_half():
    model = dlrm_ops.convert(Model())
    model.half()
    idx, off = next(data(1))
    assert model.emb._flat.dtype == torch.float16
    for a, e, i, o in zip(model.emb(off, idx), model.emb, idx, off):
        torch.testing.assert_close(a, e(i, o))
        assert e.weight.data_ptr() >= model.emb._flat.data_ptr()  # on the shared buffer


def test_list_update_moves_its_items_versions():
    """The one-call fused update changes every item's table in place: a graph
    that saved one of them must fail as after any in-place change."""
    model = dlrm_ops.convert(Model())
    dlrm_ops.apply_optimizer_in_backward(torch.optim.SGD(model.parameters(), lr=0.1), model)
    idx, off = next(data(1))
    before = [e.weight._version for e in model.emb]
    saved = model.emb[1].weight.pow(2).sum()  # pow saves the weight
    sum(o.sum() for o in model.emb(off, idx)).backward()
    assert all(e.weight._version > v for e, v in zip(model.emb, before))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()
