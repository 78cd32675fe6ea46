"""Multi-hot data in the style of MLPerf's DLRM-DCNv2 benchmark, which turns
the one-hot Criteo logs into multi-hot ones: in table t every index i becomes
a bag of ``sizes[t]`` indices, i itself and ``sizes[t] - 1`` others that are a
fixed function of (seed, t, i, k), uniform over the table. The same i always
gives the same bag, so what a model learns from i it learns from its bag."""

from typing import Sequence

import numpy as np
import torch

from .batch import Batch

# MLPerf Training's DLRM-DCNv2 multi-hot sizes of C1..C26.
MLPERF_SIZES = [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class MultiHot:
    """``data`` (anything with ``batch(i)`` and ``len``) with every index of
    table t expanded to a bag of ``sizes[t]`` indices of its ``rows[t]``."""

    def __init__(self, data, sizes: Sequence[int], rows: Sequence[int], seed: int = 0):
        sizes, rows = [int(m) for m in sizes], [int(n) for n in rows]
        if len(sizes) != len(rows) or any(m < 1 for m in sizes):
            raise ValueError(
                f"sizes must give each of the {len(rows)} tables a bag size >= 1, got {sizes}"
            )
        self.data, self.sizes, self.rows, self.seed = data, sizes, rows, seed
        self.table_sizes = rows

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, i: int) -> Batch:
        b = self.data.batch(i)
        T = len(self.rows)
        B = (b.offsets.numel() - 1) // T
        idx, offs = b.indices.numpy(), b.offsets.numpy()
        lengths = np.diff(offs).reshape(T, B)
        out_idx, out_len = [], []
        with np.errstate(over="ignore"):
            for t, (m, n) in enumerate(zip(self.sizes, self.rows)):
                own = idx[offs[t * B] : offs[(t + 1) * B]].astype(np.uint64)
                bag = np.empty((len(own), m), dtype=np.int64)
                bag[:, 0] = own.astype(np.int64)
                if m > 1:
                    k = np.arange(1, m, dtype=np.uint64)
                    base = np.uint64((self.seed & (2**32 - 1)) << 32 | t)
                    h = _mix(_mix(own[:, None] ^ _mix(base)) + k)
                    bag[:, 1:] = (h % np.uint64(max(n, 1))).astype(np.int64)
                out_idx.append(bag.reshape(-1))
                out_len.append(lengths[t] * m)
        lens = np.concatenate(out_len)
        return Batch(
            b.dense,
            torch.from_numpy(np.concatenate(out_idx)),
            torch.from_numpy(np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)),
            b.labels,
        )

    def __iter__(self):
        return (self.batch(i) for i in range(len(self)))
