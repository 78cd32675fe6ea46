"""torchrec's Criteo layout: per day ``day_<d>_dense.npy`` (float32
[n, 13]), ``day_<d>_sparse.npy`` (int32 [n, 26]) and ``day_<d>_labels.npy``
(int32 [n, 1]), as torchrec's ``BinaryCriteoUtils.tsv_to_npys`` writes them
(its dense features are log(x + 3), its categories the raw 32-bit hex values,
hashed when read). Read through memory maps, and written from a folder that
``preprocess_criteo`` made, so data goes both ways."""

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .criteo import NUM_SPARSE, CriteoDataset

CHUNK_ROWS = 1 << 20


def _days(folder: Path) -> int:
    n = 0
    while (folder / f"day_{n}_labels.npy").exists():
        n += 1
    if n < 2:
        raise FileNotFoundError(f"{folder}: no day_0_labels.npy and day_1_labels.npy")
    return n


class TorchrecNpyDataset(CriteoDataset):
    """Batches of torchrec's per-day ``.npy`` files: days 0 to n-2 train, the
    last day halved into test and validation (as ``CriteoDataset``), every
    option of ``CriteoDataset`` too. Categories are taken modulo
    ``max_ind_range`` (torchrec's ``hashes``; required for raw files, whose
    values are 32-bit hashes; a negative int32 becomes its floor modulo),
    else used as ids (files this library wrote)."""

    def __init__(self, folder: str, split: str = "train", batch_size: int = 128,
                 num_batches: Optional[int] = None, max_ind_range: Optional[int] = None,
                 **kw):  # fmt: skip
        self.max_ind_range = max_ind_range
        self.modulo = max_ind_range or 0
        super().__init__(folder, split, batch_size, num_batches, **kw)

    def _layout(self):
        days = _days(self.dir)
        rows = {d: int(np.load(self.dir / f"day_{d}_labels.npy", mmap_mode="r").shape[0])
                for d in range(days)}  # fmt: skip
        if self.max_ind_range:
            sizes = [self.max_ind_range] * NUM_SPARSE
        else:
            top = np.zeros(NUM_SPARSE, dtype=np.int64)
            for d in range(days):
                s = np.load(self.dir / f"day_{d}_sparse.npy", mmap_mode="r")
                if len(s):
                    top = np.maximum(top, s.max(0))
                    if (s.min(0) < 0).any():
                        raise ValueError(
                            f"{self.dir}: negative categories (raw hashes?): give max_ind_range"
                        )
            sizes = [int(t) + 1 for t in top]
        return sizes, days, rows

    def _open(self, day: int):
        p = self.dir / f"day_{day}"
        dense = np.load(f"{p}_dense.npy", mmap_mode="r")
        sparse = np.load(f"{p}_sparse.npy", mmap_mode="r")
        labels = np.load(f"{p}_labels.npy", mmap_mode="r").reshape(-1)
        return dense, sparse, labels


def write_torchrec_npy(processed_dir: str, out_dir: str, days: Optional[Sequence[int]] = None):
    """The days of a ``preprocess_criteo`` folder as torchrec's per-day
    ``.npy`` files (its dense features stay log(x + 1), its categories the
    ids already made, which must fit int32). Returns the days written."""
    import json

    src, out = Path(processed_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((src / "meta.json").read_text())
    if max(meta["table_sizes"]) > 2**31:
        raise ValueError(f"{processed_dir}: table sizes over 2**31 do not fit torchrec's int32")
    todo = sorted(int(d) for d in meta["days"]) if days is None else list(days)
    for d in todo:
        n = meta["days"][str(d)]
        p = src / f"day_{d}"
        dense = np.memmap(f"{p}.dense.bin", dtype=np.float32, mode="r", shape=(n, 13))
        sparse = np.memmap(f"{p}.sparse.bin", dtype=np.int64, mode="r", shape=(n, NUM_SPARSE))
        labels = np.memmap(f"{p}.labels.bin", dtype=np.float32, mode="r", shape=(n,))
        for name, a, dtype, shape in (
            ("dense", dense, np.float32, (n, 13)),
            ("sparse", sparse, np.int32, (n, NUM_SPARSE)),
            ("labels", labels, np.int32, (n, 1)),
        ):
            tmp = out / f"day_{d}_{name}.tmp.npy"
            dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            for lo in range(0, n, CHUNK_ROWS):  # bounded memory: a chunk at a time
                dst[lo : lo + CHUNK_ROWS] = a[lo : lo + CHUNK_ROWS].reshape(-1, *shape[1:])
            dst.flush()
            del dst
            tmp.replace(out / f"day_{d}_{name}.npy")
    return todo
