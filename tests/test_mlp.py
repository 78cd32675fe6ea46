import pytest
import torch

from dlrm_ops.nn.mlp import FusedMLP, mlp


def pair(sizes, final_relu):
    torch.manual_seed(0)
    ref = mlp(sizes, final_relu)
    fused = mlp(sizes, final_relu, fused=True)
    fused.load_state_dict(ref.state_dict())
    assert isinstance(fused, FusedMLP) and type(ref) is torch.nn.Sequential
    return ref, fused


@pytest.mark.parametrize("sizes, final_relu", [([13, 64, 32, 8], True), ([40, 16, 1], False)])
def test_training_matches_sequential(sizes, final_relu):
    ref, fused = pair(sizes, final_relu)
    x = torch.randn(33, sizes[0])
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_f = ref(x1), fused(x2)
    torch.testing.assert_close(out_f, out_r)
    g = torch.randn_like(out_r)
    out_r.backward(g)
    out_f.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad)
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_inference_uses_current_weights():
    ref, fused = pair([13, 64, 1], False)
    x = torch.randn(50, 13)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x))
        torch.testing.assert_close(fused(x[:7]), ref(x[:7]))  # another batch size, same packing
    for m in (ref, fused):  # a training step changes the weights: the packed copy must follow
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m(x).sum().backward()
        opt.step()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x))
        fused[0].weight.mul_(2)
        ref[0].weight.mul_(2)
        torch.testing.assert_close(fused(x), ref(x))


def test_other_dtypes_fall_back():
    ref, fused = pair([8, 16, 4], True)
    ref, fused = ref.to(torch.bfloat16), fused.to(torch.bfloat16)
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    torch.testing.assert_close(fused(x), ref(x))


def test_compiled_training_step_matches_eager():
    ref, fused = pair([13, 32, 16], True)
    x = torch.randn(9, 13, requires_grad=True)
    compiled = torch.compile(fused, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    gx, gw = x.grad.clone(), fused[0].weight.grad.clone()
    x.grad = None
    fused.zero_grad()
    torch.testing.assert_close(out, fused(x))
    fused(x).sum().backward()
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(fused[0].weight.grad, gw)
