"""Hybrid-parallel DLRM on torch.distributed (the DLRM paper's scheme): the
embedding tables sharded over ranks (model parallel), the MLPs replicated
under DistributedDataParallel (data parallel), the two joined by an
all-to-all of pooled vectors forward and of their gradients backward.

- ``plan_sharding``: which rank holds which tables (whole, or cut by rows).
- ``ShardedEmbeddingBagCollection``: a rank's shards, the fused optimizer,
  the asynchronous all-to-all.
- ``DistributedDLRM``: the model, equal to ``models.DLRM(init_seed=...)``.
- ``ShardedData``: what a rank reads of each global batch.
- ``checkpoint``: sharded checkpoints that load on any number of ranks.
- ``train``: ``torchrun -m dlrm_ops train --dist-backend gloo|nccl``.
"""

from .data import ShardedBatch, ShardedData, slice_batch
from .embedding import ShardedEmbeddingBagCollection
from .model import DistributedDLRM
from .plan import (
    Shard,
    ShardingPlan,
    all_to_all_bytes,
    bytes_per_row,
    even_bounds,
    plan_sharding,
)

__all__ = [
    "all_to_all_bytes",
    "DistributedDLRM",
    "Shard",
    "ShardedBatch",
    "ShardedData",
    "ShardedEmbeddingBagCollection",
    "ShardingPlan",
    "bytes_per_row",
    "even_bounds",
    "plan_sharding",
    "slice_batch",
]
