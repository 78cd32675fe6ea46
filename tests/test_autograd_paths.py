"""The public functions' fast autograd path (a plain autograd.Function) and
the autograd registered on the ops (direct op calls, torch.compile) give the
same results."""

import torch

import dlrm_ops
from dlrm_ops import ops
from dlrm_ops.nn import EmbeddingBagCollection

from utils import make_bags


def test_embedding_bag_paths_agree():
    ebc = EmbeddingBagCollection([30, 12], [4, 8])
    idx, off = make_bags([30, 12], 9, 5)
    psw = torch.rand(idx.numel(), requires_grad=True)
    meta = (ebc.weights_offsets, ebc.dim_offsets, ebc.rows, idx, off)
    grads = []
    for direct in (False, True):
        w = ebc.weight.detach().clone().requires_grad_()
        p = psw.detach().clone().requires_grad_()
        if direct:
            out = torch.ops.dlrm_ops.embedding_bag_forward(
                w, *meta, pooling=ops.Pooling.SUM, per_sample_weights=p, total_dim=12
            )
        else:
            out = dlrm_ops.table_batched_embedding_bag(w, *meta, per_sample_weights=p)
        out.pow(2).sum().backward()
        grads.append((out, w.grad, p.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_fused_optimizer_paths_agree():
    idx, off = make_bags([30, 12], 9, 5)
    grad = torch.randn(9, 16)
    models = []
    for direct in (False, True):
        torch.manual_seed(0)
        m = EmbeddingBagCollection([30, 12], 8, optimizer="adagrad", lr=0.1)
        if direct:
            out = torch.ops.dlrm_ops.embedding_bag_forward_with_optimizer(
                m.weight,
                m.weights_offsets,
                m.dim_offsets,
                m.rows,
                idx,
                off,
                pooling=ops.Pooling.SUM,
                per_sample_weights=None,
                total_dim=16,
                momentum1=m.momentum1,
                momentum2=m.momentum2,
                step=m.step,
                hparams=m.hparams,
                optimizer=ops.OPTIMIZERS["adagrad"],
                stochastic_rounding=False,
            )
        else:
            out = m(idx, off)
        out.backward(grad)
        models.append(m)
    torch.testing.assert_close(models[0].weight, models[1].weight)
    torch.testing.assert_close(models[0].momentum1, models[1].momentum1)
    assert int(models[0].step) == int(models[1].step) == 1


def test_interaction_paths_agree():
    dense = torch.randn(5, 8)
    sparse = torch.randn(5, 3, 8)
    grads = []
    for direct in (False, True):
        d, s = dense.clone().requires_grad_(), sparse.clone().requires_grad_()
        out = (
            torch.ops.dlrm_ops.dot_interaction(
                d, s, self_interaction=True, order=ops.InteractionOrder.TRIU
            )
            if direct
            else dlrm_ops.dot_interaction(d, s, self_interaction=True, order="triu")
        )
        out.pow(2).sum().backward()
        grads.append((out, d.grad, s.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_no_grad_calls_give_the_same_values_and_no_graph():
    """Without grad the public functions call the kernels below autograd."""
    ebc = EmbeddingBagCollection([30, 12], 8)
    idx, off = make_bags([30, 12], 9, 5)
    dense = torch.randn(9, 8, requires_grad=True)
    pooled = ebc(idx, off)
    expect = (pooled, dlrm_ops.dot_interaction(dense, pooled))
    assert all(t.grad_fn is not None for t in expect)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            pooled = ebc(idx, off)
            got = (pooled, dlrm_ops.dot_interaction(dense, pooled))
        for a, b in zip(got, expect):
            assert not a.requires_grad and a.grad_fn is None
            torch.testing.assert_close(a, b, atol=0, rtol=0)
