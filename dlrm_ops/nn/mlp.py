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


def _packed(w: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    hit = _PACKED.get(w)
    key = (w._version, w.data_ptr(), dtype)
    if hit is None or hit[0] != key:
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().to(dtype), batch)
        hit = (key, packed)
        _PACKED[w] = hit
    return hit[1]


class FusedMLP(nn.Sequential):
    """`nn.Sequential` of Linear (+ ReLU) layers, same parameters and
    state_dict, whose fp32 CPU inference (no autograd) runs each Linear with
    its bias and ReLU as one oneDNN GEMM on pre-packed weights: no bias
    broadcast copy, no separate ReLU pass (10-20% faster at batches of 128 to
    2048 here); under CPU autocast to bf16, on pre-packed bf16 weights.
    Training, other dtypes and torch.compile run the plain Sequential: a
    fused training path measured no faster at batch 2048 and 10% slower at
    256 (Python per layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            _FUSED is None
            or torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or x.device.type != "cpu"
            or x.dim() != 2
            or not all(type(m) in (nn.Linear, nn.ReLU) for m in self)  # e.g. quantized
        ):
            return super().forward(x)
        layers = list(self)
        # Under CPU autocast to bf16 the GEMMs run in bf16 on bf16 copies of the weights.
        bf16 = torch.is_autocast_enabled("cpu") and (
            torch.get_autocast_dtype("cpu") == torch.bfloat16
        )
        if bf16:
            x = x.to(torch.bfloat16)
        i = 0
        while i < len(layers):
            lin = layers[i]
            relu = i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU)
            if lin.weight.dtype == torch.float32 and x.dtype in (torch.float32, torch.bfloat16):
                bias = lin.bias if lin.bias is None or not bf16 else lin.bias.to(torch.bfloat16)
                x = _FUSED(
                    x,
                    _packed(lin.weight, x.shape[0], x.dtype),
                    bias,
                    "relu" if relu else "none",
                    [],
                    "",
                )
            else:
                x = lin(x)
                if relu:
                    x = layers[i + 1](x)
            i += 2 if relu else 1
        return x


def mlp(sizes: Sequence[int], final_relu: bool, fused: bool = False) -> nn.Sequential:
    """Linear layers between consecutive `sizes`, ReLU (in place) after each
    (after the last only if `final_relu`), initialised as facebookresearch/dlrm does:
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
            layers.append(nn.ReLU(inplace=True))  # no extra activation buffer per layer
    return (FusedMLP if fused else nn.Sequential)(*layers)
