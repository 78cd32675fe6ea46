"""One mini-batch in the layout the DLRM model takes."""

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    dense: torch.Tensor  # [B, num_dense] float32
    indices: torch.Tensor  # table-major indices of all T tables, int64
    offsets: torch.Tensor  # [T*B + 1]
    labels: torch.Tensor  # [B] float32 in {0, 1}

    @property
    def size(self) -> int:
        return self.dense.shape[0]


def batch_from_arrays(dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray) -> Batch:
    """One index per (sample, table): ``sparse [B, T]`` becomes table-major
    indices with offsets 0, 1, ..., T*B."""
    B, T = sparse.shape
    indices = torch.from_numpy(np.ascontiguousarray(sparse.T).reshape(-1).astype(np.int64))
    return Batch(
        torch.from_numpy(np.array(dense, dtype=np.float32)),
        indices,
        torch.arange(T * B + 1, dtype=torch.int64),
        torch.from_numpy(np.array(labels, dtype=np.float32)),
    )
