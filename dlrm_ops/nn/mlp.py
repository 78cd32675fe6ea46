"""The DLRM multilayer perceptrons."""
import math
from typing import Sequence

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary


def _linear_pointwise():
    """oneDNN's linear with the bias and an optional ReLU fused into the GEMM
    (the kernel Inductor's CPU backend uses), or None where torch lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_FUSED = _linear_pointwise()
# Inference copies of weights in oneDNN's blocked layout, by weight; each is
# repacked when its weight changes (its version counter moves).
_PACKED = WeakIdKeyDictionary()


def _packed(w: torch.Tensor, batch: int) -> torch.Tensor:
    hit = _PACKED.get(w)
    if hit is None or hit[0] != w._version or hit[1] != w.data_ptr():
        hit = (w._version, w.data_ptr(), torch.ops.mkldnn._reorder_linear_weight(w.detach(), batch))
        _PACKED[w] = hit
    return hit[2]


class _LinearAct(torch.autograd.Function):
    """relu(x @ w.T + b) (or without the ReLU) in one oneDNN call; the backward
    is the one autograd gives Linear + ReLU."""

    @staticmethod
    def forward(x, w, b, relu):
        return _FUSED(x, w, b, "relu" if relu else "none", [], "")

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, _, relu = inputs
        ctx.relu = relu
        ctx.save_for_backward(x, w, output if relu else None)

    @staticmethod
    def backward(ctx, grad):
        x, w, out = ctx.saved_tensors
        if ctx.relu:
            grad = torch.ops.aten.threshold_backward(grad, out, 0)
        gx = grad.mm(w) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:  # of the two GEMM layouts, the faster one here
            gw = x.t().mm(grad).t() if w.shape[1] < w.shape[0] else grad.t().mm(x)
        gb = grad.sum(0) if ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


class FusedMLP(nn.Sequential):
    """`nn.Sequential` of Linear (+ ReLU) layers, same parameters and
    state_dict, whose fp32 CPU forward runs each Linear with its bias and ReLU
    fused into one oneDNN GEMM: no bias broadcast copy, no separate ReLU pass.
    Without autograd (inference) the weights are used pre-packed for oneDNN.
    Under torch.compile it is the plain Sequential, which Inductor fuses."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # Inductor fuses Linear + ReLU itself
            return super().forward(x)
        layers = list(self)
        pack = not torch.is_grad_enabled()
        i = 0
        while i < len(layers):
            lin = layers[i]
            relu = i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU)
            if _FUSED is not None and x.device.type == "cpu" and x.dim() == 2 and \
                    x.dtype == lin.weight.dtype == torch.float32:
                if pack:
                    x = _FUSED(x, _packed(lin.weight, x.shape[0]), lin.bias,
                               "relu" if relu else "none", [], "")
                else:
                    x = _LinearAct.apply(x, lin.weight, lin.bias, relu)
            else:
                x = lin(x)
                if relu:
                    x = layers[i + 1](x)
            i += 2 if relu else 1
        return x


def mlp(sizes: Sequence[int], final_relu: bool, fused: bool = False) -> nn.Sequential:
    """Linear layers between consecutive `sizes`, ReLU after each (after the
    last only if `final_relu`), initialised as facebookresearch/dlrm does:
    weights N(0, sqrt(2/(fan_in+fan_out))), biases N(0, sqrt(1/fan_out)).
    `fused` gives a `FusedMLP` (the same module, faster on the CPU)."""
    if len(sizes) < 2:
        raise ValueError(f"an MLP needs at least an input and an output size, got {list(sizes)}")
    layers = []
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(int(m), int(n))
        with torch.no_grad():
            lin.weight.normal_(0.0, math.sqrt(2.0 / (m + n)))
            lin.bias.normal_(0.0, math.sqrt(1.0 / n))
        layers.append(lin)
        if final_relu or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return (FusedMLP if fused else nn.Sequential)(*layers)
