"""What each rank reads of a global batch: the dense features and labels of
its slice, the sparse features of its tables for the whole batch."""

from dataclasses import dataclass
from typing import Sequence

import torch

from ..data.batch import Batch
from .plan import even_bounds


@dataclass
class ShardedBatch(Batch):
    """``dense`` and ``labels`` of this rank's slice of the global batch,
    ``indices``/``offsets`` of this rank's tables (table-major) for all of it."""

    global_size: int = 0

    @property
    def size(self) -> int:
        """Samples in the global batch (every rank counts the same)."""
        return self.global_size


def slice_batch(b: Batch, tables: Sequence[int], lo: int, hi: int):
    """A whole batch cut down to rows [lo, hi) of its dense features and
    labels and to the given tables' bags."""
    B = b.dense.shape[0]
    offs = b.offsets
    idx, lens = [], []
    for t in tables:
        a, z = int(offs[t * B]), int(offs[(t + 1) * B])
        idx.append(b.indices[a:z])
        lens.append(offs[t * B + 1 : (t + 1) * B + 1] - offs[t * B : (t + 1) * B])
    indices = torch.cat(idx) if idx else b.indices.new_zeros(0)
    lengths = torch.cat(lens) if lens else offs.new_zeros(0)
    offsets = torch.cat([offs.new_zeros(1), lengths.cumsum(0)])
    return ShardedBatch(b.dense[lo:hi], indices, offsets, b.labels[lo:hi], B)


class ShardedData:
    """A dataset's batches as this rank reads them. A dataset with
    ``batch_part(i, lo, hi, tables)`` (the Criteo arrays: memory-mapped,
    only this rank's rows of dense features and labels and columns of
    sparse ones are copied out) gives them directly; others (generated
    data, which costs nothing to read) are cut from the whole batch."""

    def __init__(self, data, tables: Sequence[int], rank: int, world_size: int):
        self.data, self.tables = data, list(tables)
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, i: int) -> ShardedBatch:
        if hasattr(self.data, "batch_part"):
            return self.data.batch_part(i, self.rank, self.world_size, self.tables)
        b = self.data.batch(i)
        cuts = even_bounds(b.dense.shape[0], self.world_size)
        return slice_batch(b, self.tables, cuts[self.rank], cuts[self.rank + 1])

    def __iter__(self):
        return (self.batch(i) for i in range(len(self)))
