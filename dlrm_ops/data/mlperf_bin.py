"""facebookresearch/dlrm's MLPerf binary format (``--mlperf-bin-loader``):
``<name>_train.bin`` and ``<name>_test.bin`` hold records of 40 int32 (label,
13 integer features, 26 categories) and ``<raw file>_fea_count.npz`` the rows
per table (``counts``). Read through a memory map; dense features are given as
log(x+1) (negatives as 0), categories modulo ``max_ind_range`` when it is
positive, as dlrm's loader does."""

from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np

from .batch import Batch, batch_from_arrays

FIELDS = 40


def bin_files(processed_data_file: str, raw_data_file: str) -> List[Path]:
    """(train, test, counts) paths as dlrm derives them from its flags."""
    p = Path(processed_data_file)
    stem = p.parent / p.name.split(".")[0]
    return [
        Path(f"{stem}_train.bin"),
        Path(f"{stem}_test.bin"),
        Path(f"{raw_data_file}_fea_count.npz"),
    ]


class MLPerfBinDataset:
    """Batches of one MLPerf binary file; the last one may be short.
    ``shuffle`` visits the batches in a random order (drawn from ``seed``),
    as dlrm's ``--mlperf-bin-shuffle``."""

    def __init__(
        self,
        data_file,
        counts_file,
        batch_size: int,
        num_batches: Optional[int] = None,
        max_ind_range: int = -1,
        shuffle: bool = False,
        seed: int = 0,
    ):
        size = Path(data_file).stat().st_size
        if size % (4 * FIELDS):
            raise ValueError(
                f"{data_file}: {size} bytes is not a whole number of {4 * FIELDS}-byte records"
            )
        self.records = np.memmap(data_file, dtype=np.int32, mode="r", shape=(size // 160, FIELDS))
        with np.load(counts_file) as f:
            self.table_sizes = [int(n) for n in f["counts"]]
        if len(self.table_sizes) != FIELDS - 14:
            raise ValueError(f"{counts_file}: counts lists {len(self.table_sizes)} tables, not 26")
        if max_ind_range > 0:
            self.table_sizes = [min(n, max_ind_range) for n in self.table_sizes]
        self.batch_size, self.max_ind_range = batch_size, max_ind_range
        n = -(-len(self.records) // batch_size)
        self.num_batches = n if num_batches is None else min(n, num_batches)
        self.order = (
            np.random.default_rng((seed, 0xB1)).permutation(n)[: self.num_batches]
            if shuffle
            else None
        )

    def __len__(self) -> int:
        return self.num_batches

    def batch(self, i: int) -> Batch:
        if not 0 <= i < self.num_batches:
            raise IndexError(f"batch {i} of {self.num_batches}")
        j = i if self.order is None else int(self.order[i])
        r = np.asarray(self.records[j * self.batch_size : (j + 1) * self.batch_size])
        dense = np.log1p(np.maximum(r[:, 1:14], 0).astype(np.float32))
        cats = r[:, 14:].astype(np.int64)
        if self.max_ind_range > 0:
            cats %= self.max_ind_range
        return batch_from_arrays(dense, cats, r[:, 0].astype(np.float32))

    def __iter__(self) -> Iterator[Batch]:
        return (self.batch(i) for i in range(self.num_batches))
