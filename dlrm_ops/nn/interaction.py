"""The DLRM feature interaction as a module."""

import torch
from torch import nn

from .. import ops


class DotInteraction(nn.Module):
    """``dlrm_ops.dot_interaction`` as a module: ``forward(dense [B, D],
    sparse [B, T, D] | [B, T*D]) -> [B, D + P]``."""

    def __init__(self, self_interaction: bool = False, order: str = "tril"):
        super().__init__()
        if order not in ops.ORDERS:
            raise ValueError(f"order must be one of {sorted(ops.ORDERS)}, got {order!r}")
        self.self_interaction = self_interaction
        self.order = order

    @staticmethod
    def output_dim(num_sparse: int, dim: int, self_interaction: bool = False) -> int:
        F = num_sparse + 1
        return dim + (F * (F + 1) // 2 if self_interaction else F * (F - 1) // 2)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return ops.dot_interaction(
            dense, sparse, self_interaction=self.self_interaction, order=self.order
        )

    def extra_repr(self) -> str:
        return f"self_interaction={self.self_interaction}, order={self.order!r}"
