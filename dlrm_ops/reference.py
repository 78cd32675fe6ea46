"""Pure-PyTorch references of every dlrm_ops op.

Written for clarity with plain tensor ops and autograd, never calling the native
library: the tests check kernels against these, and they are the fallback where
a kernel does not exist.
"""
from typing import Optional, Sequence

import torch


def bag_ids(offsets: torch.Tensor, num_indices: int) -> torch.Tensor:
    """Bag number of every index, from offsets with the final end offset."""
    lengths = (offsets[1:] - offsets[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths,
                                   output_size=num_indices)


def table_batched_embedding_bag(
    tables: Sequence[torch.Tensor],
    indices: torch.Tensor,
    offsets: torch.Tensor,
    mode: str = "sum",
    per_sample_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pooled lookups over T tables; bag b of table t is
    indices[offsets[t*B+b]:offsets[t*B+b+1]]. Returns [B, sum(D_t)] in the
    tables' dtype, accumulated in fp32."""
    T = len(tables)
    B = (offsets.numel() - 1) // T
    outs = []
    for t, w in enumerate(tables):
        lo, hi = int(offsets[t * B]), int(offsets[(t + 1) * B])
        idx = indices[lo:hi].long()
        bag_off = offsets[t * B:(t + 1) * B + 1] - lo
        rows = w.float().index_select(0, idx)
        if per_sample_weights is not None:
            rows = rows * per_sample_weights[lo:hi].float().unsqueeze(1)
        pooled = torch.zeros(B, w.shape[1], dtype=torch.float32, device=w.device)
        pooled = pooled.index_add(0, bag_ids(bag_off, idx.numel()), rows)
        if mode == "mean":
            lengths = (bag_off[1:] - bag_off[:-1]).clamp(min=1).float().unsqueeze(1)
            pooled = pooled / lengths
        outs.append(pooled.to(w.dtype))
    return torch.cat(outs, dim=1)
