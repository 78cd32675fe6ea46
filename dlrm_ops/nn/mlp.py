"""The DLRM multilayer perceptrons."""
import math
from typing import Sequence

import torch
from torch import nn


def mlp(sizes: Sequence[int], final_relu: bool) -> nn.Sequential:
    """Linear layers between consecutive `sizes`, ReLU after each (after the
    last only if `final_relu`), initialised as facebookresearch/dlrm does:
    weights N(0, sqrt(2/(fan_in+fan_out))), biases N(0, sqrt(1/fan_out))."""
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
    return nn.Sequential(*layers)
