"""The Criteo Kaggle and Terabyte click logs.

Raw lines are ``label \\t I1..I13 \\t C1..C26``. ``preprocess_criteo`` streams
them (never the whole file in memory) into per-day binary arrays read back
through ``np.memmap``: empty fields become 0, negative integers 0, dense
features log(x+1); categories (hex) are hashed modulo ``max_ind_range`` or
numbered per column (0 = empty; natively by ``_C.Vocabulary``, in Python by
dictionaries, the reference). A malformed line raises
``MalformedLineError`` naming file and line, or is counted and skipped with
``skip_malformed=True``. Kaggle's train.txt is cut into 7 pseudo-days by line
count (days 0-5 train; day 6 halved into test and validation), Terabyte comes
as day_0..day_23 (days 0-22 train, day 23 halved). A day whose arrays are
complete is not written again on a rerun, so an interrupted run resumes
(Terabyte skips those days' files: with first-appearance vocabularies as far
as the vocabulary saved after each day reaches), unless its raw file (name,
size, modification time) or the options changed: ``meta.json`` records what
every day was made from.
"""

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from .batch import Batch

NUM_DENSE, NUM_SPARSE = 13, 26
NUM_FIELDS = 1 + NUM_DENSE + NUM_SPARSE
DAYS = {"kaggle": 7, "terabyte": 24}


class MalformedLineError(ValueError):
    pass


def parse_line(
    line: str,
    where: str,
    max_ind_range: Optional[int],
    number: Optional[Callable[[int, str], int]],
):
    """(label, dense[13] as log(x+1), sparse[26]) of one raw line; category f
    of column j is ``number(j, f)`` (a vocabulary), or without ``number``
    its hex value modulo ``max_ind_range``."""
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) != NUM_FIELDS:
        raise MalformedLineError(
            f"{where}: expected {NUM_FIELDS} tab-separated fields, got {len(fields)}"
        )
    if fields[0] not in ("0", "1"):
        raise MalformedLineError(f"{where}: label must be 0 or 1, got {fields[0]!r}")
    dense = np.zeros(NUM_DENSE, dtype=np.float32)
    for j, f in enumerate(fields[1 : 1 + NUM_DENSE]):
        if f:
            try:
                v = int(f)
            except ValueError:
                raise MalformedLineError(
                    f"{where}: I{j + 1} must be an integer, got {f!r}"
                ) from None
            # math.log takes integers of any size (log1p overflows past 1e308).
            dense[j] = 0.0 if v <= 0 else math.log1p(v) if v < 2**53 else math.log(v)
    sparse = np.zeros(NUM_SPARSE, dtype=np.int64)
    for j, f in enumerate(fields[1 + NUM_DENSE :]):
        if not f:
            continue
        if number is not None:
            sparse[j] = number(j, f)
            continue
        try:
            v = int(f, 16)
        except ValueError:
            raise MalformedLineError(f"{where}: C{j + 1} must be hexadecimal, got {f!r}") from None
        sparse[j] = v % max_ind_range
    return int(fields[0]), dense, sparse


_HEX = frozenset("0123456789abcdef")


class _Keys:
    """Category strings as the native Vocabulary's keys, for the lines
    Python reads: 1 to 15 lowercase hex digits as the parser makes them
    (value << 4 | digits), any other string numbered here per column (low
    four bits 0, so the two never meet)."""

    def __init__(self):
        self.odd: List[Dict[str, int]] = [{} for _ in range(NUM_SPARSE)]

    def __call__(self, j: int, f: str) -> int:
        if len(f) <= 15 and _HEX.issuperset(f):
            k = int(f, 16) << 4 | len(f)
            return k - (1 << 64) if k >= 1 << 63 else k
        return self.odd[j].setdefault(f, (len(self.odd[j]) + 1) << 4)


class _FirstSeen:
    """The reference vocabularies: per column, ids 1.. by first appearance."""

    def __init__(self):
        self.ids: List[Dict[str, int]] = [{} for _ in range(NUM_SPARSE)]

    def __call__(self, j: int, f: str) -> int:
        return self.ids[j].setdefault(f, len(self.ids[j]) + 1)

    def sizes(self) -> List[int]:
        return [len(ids) + 1 for ids in self.ids]


class _Counting:
    """Counts each column's categories (in first-appearance order)."""

    def __init__(self):
        self.counts: List[Dict[str, int]] = [{} for _ in range(NUM_SPARSE)]

    def __call__(self, j: int, f: str) -> int:
        self.counts[j][f] = self.counts[j].get(f, 0) + 1
        return 0

    def ranked(self, min_count: int) -> "_Ranked":
        """Ids 1.. by descending count, ties in first-appearance order;
        below min_count: none (0)."""
        ranked = _Ranked()
        for ids, counts in zip(ranked.ids, self.counts):
            order = sorted(counts, key=lambda f: -counts[f])
            ids.update((f, i + 1) for i, f in enumerate(f for f in order if counts[f] >= min_count))
        return ranked


class _Ranked(_FirstSeen):
    """Frozen vocabularies: a category not in them is 0."""

    def __call__(self, j: int, f: str) -> int:
        return self.ids[j].get(f, 0)


class _DayWriter:
    """A day's arrays, written under ``.tmp`` names and renamed on close;
    ``sparse="keys"``: the categories are a vocabulary's keys
    (``day_<d>.keys.bin``, for ``criteo_spill``)."""

    def __init__(self, out_dir: Path, day: int, sparse: str = "sparse"):
        self.prefix = out_dir / f"day_{day}"
        self.names = {"dense": "dense", "sparse": sparse, "labels": "labels"}
        self.files = {k: open(f"{self.prefix}.{n}.bin.tmp", "wb") for k, n in self.names.items()}
        self.rows = 0
        self.buf = ([], [], [])

    def add_many(self, labels, dense, sparse):
        """Rows as arrays, after the buffered ones."""
        self.flush()
        dense.astype(np.float32, copy=False).tofile(self.files["dense"])
        sparse.astype(np.int64, copy=False).tofile(self.files["sparse"])
        labels.astype(np.float32, copy=False).tofile(self.files["labels"])
        self.rows += len(labels)

    def add(self, label, dense, sparse):
        self.buf[0].append(dense)
        self.buf[1].append(sparse)
        self.buf[2].append(label)
        if len(self.buf[2]) >= 65536:
            self.flush()

    def flush(self):
        if not self.buf[2]:
            return
        np.stack(self.buf[0]).astype(np.float32).tofile(self.files["dense"])
        np.stack(self.buf[1]).astype(np.int64).tofile(self.files["sparse"])
        np.asarray(self.buf[2], dtype=np.float32).tofile(self.files["labels"])
        self.rows += len(self.buf[2])
        self.buf = ([], [], [])

    def close(self) -> int:
        self.flush()
        for k, f in self.files.items():
            f.close()
            os.replace(
                f"{self.prefix}.{self.names[k]}.bin.tmp", f"{self.prefix}.{self.names[k]}.bin"
            )
        return self.rows


def _count_lines(path: Path) -> int:
    """Lines of the file, a last one without a newline included."""
    from .. import _C

    n = 0
    with _mapped(path) as mm:
        for lo in range(0, len(mm), BLOCK_BYTES):
            with memoryview(mm)[lo : lo + BLOCK_BYTES] as part:
                n += _C.count_newlines(part)
            _unmap(mm, lo, lo + BLOCK_BYTES)
        return n + (len(mm) > 0 and mm[-1:] != b"\n")


def _fingerprint(files: Sequence[Path]) -> list:
    """What the processed data was made from: each raw file's name, size and
    modification time (a changed or replaced file changes it)."""
    out = []
    for f in files:
        st = f.stat()
        out.append({"file": str(f.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _day_done(meta: dict, day: int, path: Path) -> bool:
    """Whether the day's arrays were made from this very file."""
    return str(day) in meta["days"] and meta["day_files"].get(str(day)) == _fingerprint([path])


def _write_meta(out_dir: Path, meta: dict) -> None:
    tmp = out_dir / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out_dir / "meta.json")


BLOCK_BYTES = 64 << 20


class _NotNative(Exception):
    """A file the native parser does not read line for line as Python does."""


def _native_file(
    path: Path,
    writers: Dict[int, "_DayWriter"],
    day_ids,
    bounds,
    max_ind_range,
    skip_malformed,
    meta,
    threads,
    bar,
    number=None,
    keys=None,
    on_done=None,
) -> None:
    """Every line of ``path`` parsed natively in blocks, row k (0-based) to
    the writer of day day_ids[j] where bounds[j] <= k < bounds[j+1]; the
    lines the native parser leaves (``deferred``) go through ``parse_line``.
    With max_ind_range 0 the categories are keys (``keys``: the Python
    side's), and ``number(sparse, keep)`` is called on each block in line
    order before it is written (a Vocabulary numbering them in place);
    without ``writers`` nothing is written (a counting pass). ``on_done(day)`` is
    called once a day whose lines end inside the file is written."""
    from .. import _C

    lineno = 0  # lines before the block
    pending = None
    with _mapped(path) as mm, ThreadPoolExecutor(1) as pool:
        size, start = len(mm), 0
        while start < size:
            # A block of whole lines, read in place from the page cache.
            stop = min(start + BLOCK_BYTES, size)
            cut = mm.rfind(b"\n", start, stop) + 1 if stop < size else size
            if cut <= start:  # a line longer than a block
                nl = mm.find(b"\n", stop)
                cut = size if nl < 0 else nl + 1
            with memoryview(mm)[start:cut] as block:
                if _C.has_lone_cr(block):
                    raise _NotNative  # Python's text mode splits lines at a lone CR
                dense, sparse, labels, deferred = _C.parse_criteo(block, max_ind_range, threads)
            keep = np.ones(len(labels), dtype=bool)
            if len(deferred):
                lines = mm[start:cut].split(b"\n")
                for i in deferred.tolist():
                    text = lines[i].decode("utf-8", errors="replace")
                    try:
                        lab, d, sp = parse_line(
                            text, f"{path}:{lineno + i + 1}", max_ind_range or None, keys
                        )
                    except MalformedLineError:
                        if not skip_malformed:
                            raise
                        meta["skipped"] += 1
                        keep[i] = False
                        continue
                    labels[i], dense[i], sparse[i] = lab, d, sp
            # Days are ranges of lines: cut the block where one ends. Numbering
            # (block after block, in order) and writing a block overlap the
            # parse of the next (one in flight).
            cuts = np.clip(bounds - lineno, 0, len(labels))
            if pending is not None:
                pending.result()
            ends = bounds[1:]
            finished = day_ids[(ends > lineno) & (ends <= lineno + len(labels))].tolist()
            pending = pool.submit(
                _finish_block, number, writers, day_ids, cuts, keep, labels, dense, sparse
            )
            if on_done is not None and finished:
                pending = _then(pool, pending, on_done, finished)
            lineno += len(labels)
            bar.update(cut - start)
            bar.set_postfix(lines=f"{lineno:,}")
            _unmap(mm, start, cut)
            start = cut
        if pending is not None:
            pending.result()


def _unmap(mm, lo: int, hi: int) -> None:
    """Drops the pages of [lo, hi) read so far from this process (they stay
    in the page cache): its RSS stays about one block, not the file."""
    import mmap

    page = mmap.PAGESIZE
    lo, hi = -(-lo // page) * page, min(hi, len(mm)) // page * page
    if hi > lo and hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class _mapped:
    """A file's bytes, memory-mapped read-only (an empty file: b"")."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        import mmap

        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        return self.mm

    def __exit__(self, *exc):
        if not isinstance(self.mm, bytes):
            self.mm.close()


def _then(pool, first, on_done, days):
    """After ``first``, on the same worker: on_done(day) for each day."""

    def run():
        first.result()
        for day in days:
            on_done(day)

    return pool.submit(run)


def _finish_block(number, writers, day_ids, cuts, keep, labels, dense, sparse) -> None:
    if number is not None:  # skipped lines hold no keys (0 stays 0)
        number(sparse, keep)
    if writers is not None:
        _write_block(writers, day_ids, cuts, keep, labels, dense, sparse)


def _write_block(writers, day_ids, cuts, keep, labels, dense, sparse) -> None:
    for j, day in enumerate(day_ids.tolist()):
        lo, hi = int(cuts[j]), int(cuts[j + 1])
        if hi > lo and day in writers:
            k = keep[lo:hi]
            if k.all():
                writers[day].add_many(labels[lo:hi], dense[lo:hi], sparse[lo:hi])
            else:
                writers[day].add_many(labels[lo:hi][k], dense[lo:hi][k], sparse[lo:hi][k])


def preprocess_criteo(
    raw_files: Sequence[str],
    out_dir: str,
    dataset: str = "kaggle",
    max_ind_range: Optional[int] = None,
    skip_malformed: bool = False,
    native: bool = True,
    threads: Optional[int] = None,
    progress: bool = False,
    vocabulary: str = "first",
    min_count: int = 1,
    vocabulary_memory: Optional[int] = None,
) -> dict:
    """Preprocesses raw Criteo files into ``out_dir``; returns the metadata
    (rows per day, table sizes, lines skipped). Categories are hashed
    modulo ``max_ind_range``, or without it numbered per column: by first
    appearance (``vocabulary="first"``) or by descending count
    (``"frequency"``, ties by first appearance, a second pass over the
    files), categories seen fewer than ``min_count`` times sharing id 0 with
    empty fields. The lines are parsed by the native multi-threaded parser
    (``threads``, default all cores) and numbered by native hash tables, the
    same bytes as the Python reference (``native=False``) gives. With
    ``vocabulary_memory`` (bytes) the vocabularies are built through the
    disk within that many bytes, however many categories there are
    (``criteo_spill``; the same ids)."""
    if dataset not in DAYS:
        raise ValueError(f"dataset must be one of {sorted(DAYS)}, got {dataset!r}")
    if vocabulary not in ("first", "frequency"):
        raise ValueError(f"vocabulary must be 'first' or 'frequency', got {vocabulary!r}")
    if min_count < 1 or (min_count > 1 and vocabulary != "frequency"):
        raise ValueError(
            f"min_count must be 1, or >= 1 with vocabulary='frequency', got {min_count}"
        )
    if vocabulary_memory is not None:
        if max_ind_range:
            raise ValueError("vocabulary_memory is for vocabularies: leave out max_ind_range")
        if not native:
            raise ValueError("vocabulary_memory needs the native parser (native=True)")
        if vocabulary_memory < 1 << 16:
            raise ValueError(
                f"vocabulary_memory must be at least 65536 bytes, got {vocabulary_memory}"
            )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    files = [Path(p) for p in raw_files]
    # What the days were made from: the options, and each day's raw file (Kaggle's
    # days are cut from one file by its line count, so all of it). A day made
    # from another file or with other options is made again.
    source = {"dataset": dataset, "max_ind_range": max_ind_range, "skip_malformed": skip_malformed}
    if not max_ind_range:
        source.update(vocabulary=vocabulary, min_count=min_count)
        if vocabulary_memory:  # the same ids, other files on the way
            source["spill"] = True
    if dataset == "kaggle":
        source["raw_files"] = _fingerprint(files)
    if meta.get("source") != source:
        if meta:
            print(f"{out_dir} holds data processed from other files or options: processing again")
        meta = {
            "dataset": dataset,
            "max_ind_range": max_ind_range,
            "source": source,
            "days": {},
            "day_files": {},
            "skipped": 0,
        }
    if dataset == "kaggle":
        if len(files) != 1:
            raise ValueError("the Kaggle data is one file (train.txt)")
        total = _count_lines(files[0])
        bounds = [total * d // 7 for d in range(8)]
        plan = [(files[0], d, bounds[d], bounds[d + 1]) for d in range(7)]
    else:
        plan = [(f, d, 0, None) for d, f in enumerate(files)]
    if all(_day_done(meta, day, path) for path, day, _, _ in plan):
        return meta
    if dataset == "kaggle":  # its one file is read again whole: lines skipped counted again
        meta["skipped"] = 0
    if native:
        threads = threads or os.cpu_count() or 1
        try:
            if vocabulary_memory:
                from .criteo_spill import preprocess_spilled

                return preprocess_spilled(
                    _by_file(plan),
                    out,
                    meta,
                    skip_malformed,
                    threads,
                    progress,
                    vocabulary,
                    min_count,
                    vocabulary_memory,
                )
            return _preprocess_native(
                plan,
                out,
                meta,
                max_ind_range,
                skip_malformed,
                threads,
                progress,
                dataset,
                vocabulary,
                min_count,
            )
        except _NotNative:
            meta.pop("spill", None)
    if max_ind_range:
        number = None
    elif vocabulary == "first":
        number = _FirstSeen()
    else:  # a counting pass, then ids by count
        counts = _Counting()
        _python_pass(plan, out, meta, None, skip_malformed, counts, dataset, write=False)
        number = counts.ranked(min_count)
    _python_pass(plan, out, meta, max_ind_range, skip_malformed, number, dataset, write=True)
    return meta


def _python_pass(plan, out, meta, max_ind_range, skip_malformed, number, dataset, write) -> None:
    """The Python reference over every day: parses each line (and writes it
    unless ``write`` is False: a counting pass)."""
    hashed = number is None
    writer: Optional[_DayWriter] = None
    current_file, handle, lineno = None, None, 0
    for path, day, first, last in plan:
        done = _day_done(meta, day, path)
        if done and hashed and dataset == "terabyte":
            continue
        if path != current_file:
            if handle:
                handle.close()
            handle, current_file, lineno = (
                open(path, "r", encoding="utf-8", errors="replace"),
                path,
                0,
            )
        make = write and not (done and hashed)
        writer = _DayWriter(out, day) if make else None
        for line in handle:
            lineno += 1
            if make or not write:
                try:
                    parsed = parse_line(line, f"{path}:{lineno}", max_ind_range, number)
                    if writer is not None:
                        writer.add(*parsed)
                except MalformedLineError:
                    if not skip_malformed:
                        raise
                    if write:
                        meta["skipped"] += 1
            if last is not None and lineno >= last:
                break
        if writer is not None:
            meta["days"][str(day)] = writer.close()
            meta["day_files"][str(day)] = _fingerprint([path])
            meta["table_sizes"] = [max_ind_range] * NUM_SPARSE if hashed else number.sizes()
            _write_meta(out, meta)
    if handle:
        handle.close()


class CriteoDataset:
    """Batches of a preprocessed split ("train", "test" or "val") read through
    memory maps; ``batch(i)`` is batch i, so a run can resume anywhere.

    As facebookresearch/dlrm's loader: ``randomize`` "total" shuffles the
    training rows across days once, "day" within each day, "window" within
    each run of ``window`` rows (reads stay local), "none" keeps file
    order (test and validation rows are never shuffled); ``sub_sample_rate``
    drops each negative row with that probability (every split); both are
    drawn from ``seed``. ``drop_last`` drops a last partial batch (otherwise
    it is a short batch: a split smaller than one batch is one batch)."""

    modulo = 0  # categories taken modulo this where positive (TorchrecNpyDataset)

    def __init__(
        self,
        processed_dir: str,
        split: str = "train",
        batch_size: int = 128,
        num_batches: Optional[int] = None,
        randomize: str = "none",
        sub_sample_rate: float = 0.0,
        seed: int = 0,
        drop_last: bool = True,
        window: int = 1 << 20,
    ):
        if randomize not in ("none", "day", "total", "window"):
            raise ValueError(f"randomize must be none, day, total or window, got {randomize!r}")
        if window < 1:
            raise ValueError(f"window must be at least 1 row, got {window}")
        if not 0.0 <= sub_sample_rate < 1.0:
            raise ValueError(f"sub_sample_rate must be in [0, 1), got {sub_sample_rate}")
        self.dir = Path(processed_dir)
        self.table_sizes, days, rows = self._layout()
        missing = [d for d in range(days) if d not in rows]
        if missing:
            raise FileNotFoundError(f"{processed_dir}: days {missing} are not preprocessed")
        last = days - 1
        if split == "train":
            parts = [(d, 0, rows[d]) for d in range(last)]
        elif split in ("test", "val"):
            half = rows[last] // 2
            parts = [(last, 0, half)] if split == "test" else [(last, half, rows[last])]
        else:
            raise ValueError(f"split must be train, test or val, got {split!r}")
        parts = [(d, lo, hi) for d, lo, hi in parts if hi > lo]
        self.arrays = [self._open(d) for d, _, _ in parts]
        # Rows as (part, row) pairs in reading order: one array of global row
        # numbers when shuffled or sub-sampled, else plain ranges.
        self.starts = np.cumsum([0] + [hi - lo for _, lo, hi in parts], dtype=np.int64)
        self.lows = np.asarray([lo for _, lo, _ in parts], dtype=np.int64)
        rng = np.random.default_rng((seed, 0xC817))
        self.order = None
        if sub_sample_rate > 0 or (randomize != "none" and split == "train"):
            per_part = []
            for k, (day, lo, hi) in enumerate(parts):
                idx = np.arange(self.starts[k], self.starts[k + 1])
                if sub_sample_rate > 0:
                    labels = self.arrays[k][2][lo:hi]
                    idx = idx[(labels != 0) | (rng.random(hi - lo) >= sub_sample_rate)]
                if randomize == "day" and split == "train":
                    idx = rng.permutation(idx)
                per_part.append(idx)
            self.order = np.concatenate(per_part) if per_part else np.zeros(0, np.int64)
            if randomize == "total" and split == "train":
                self.order = rng.permutation(self.order)
            if randomize == "window" and split == "train":  # reads stay near each other
                for w in range(0, len(self.order), window):
                    self.order[w : w + window] = rng.permutation(self.order[w : w + window])
        self.rows = int(self.starts[-1]) if self.order is None else len(self.order)
        self.batch_size = batch_size
        full = self.rows // batch_size if drop_last else -(-self.rows // batch_size)
        self.num_batches = full if num_batches is None else min(num_batches, full)

    def _layout(self):
        """(table sizes, days, rows per day)."""
        meta = json.loads((self.dir / "meta.json").read_text())
        rows = {int(d): n for d, n in meta["days"].items()}
        return meta["table_sizes"], DAYS[meta["dataset"]], rows

    def _open(self, day: int):
        p = self.dir / f"day_{day}"
        labels = np.memmap(f"{p}.labels.bin", dtype=np.float32, mode="r")
        n = labels.shape[0]
        return (
            np.memmap(f"{p}.dense.bin", dtype=np.float32, mode="r", shape=(n, NUM_DENSE)),
            np.memmap(f"{p}.sparse.bin", dtype=np.int64, mode="r", shape=(n, NUM_SPARSE)),
            labels,
        )

    def __len__(self) -> int:
        return self.num_batches

    def _rows(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_batches:
            raise IndexError(f"batch {i} of {self.num_batches}")
        lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, self.rows)
        return np.arange(lo, hi) if self.order is None else self.order[lo:hi]

    def _gather(self, rows: np.ndarray, columns, dense: bool = True, labels: bool = True):
        """(dense [B, 13], table-major indices of ``columns``, labels [B]) of
        global rows ``rows``, cut natively from the memory maps (dense and
        labels None where not asked for)."""
        from .. import _C

        B = len(rows)
        out = (
            torch.empty(B, NUM_DENSE) if dense else None,
            torch.empty(len(columns) * B, dtype=torch.int64),
            torch.empty(B) if labels else None,
        )
        _C.gather_rows(
            self.arrays,
            self.starts,
            self.lows,
            rows,
            list(columns),
            self.modulo,
            *(None if t is None else t.numpy() for t in out),
        )
        return out

    def batch(self, i: int) -> Batch:
        dense, indices, labels = self._gather(self._rows(i), range(NUM_SPARSE))
        return Batch(dense, indices, torch.arange(len(indices) + 1), labels)

    def batch_part(self, i: int, rank: int, world_size: int, tables: Sequence[int]):
        """What rank reads of batch i for hybrid-parallel training
        (``dlrm_ops.distributed``): dense features and labels of its slice
        of the batch, the sparse columns of ``tables`` for the whole batch."""
        from ..distributed.data import ShardedBatch
        from ..distributed.plan import even_bounds

        rows = self._rows(i)
        cuts = even_bounds(len(rows), world_size)
        dense, _, labels = self._gather(rows[cuts[rank] : cuts[rank + 1]], [])
        _, indices, _ = self._gather(rows, tables, dense=False, labels=False)
        return ShardedBatch(dense, indices, torch.arange(len(indices) + 1), labels, len(rows))

    def __iter__(self) -> Iterator[Batch]:
        return (self.batch(i) for i in range(self.num_batches))


def _by_file(plan) -> Dict[Path, list]:
    """The plan's days (day, first line, last line) by raw file, in order."""
    by_file: Dict[Path, list] = {}
    for path, day, first, last in plan:
        by_file.setdefault(path, []).append((day, first, last))
    return by_file


def _parse_file(
    path,
    days,
    writers,
    meta,
    what,
    max_ind_range,
    skip_malformed,
    threads,
    progress,
    number=None,
    keys=None,
    on_done=None,
) -> None:
    """``_native_file`` over the days ``(day, first line, last line)`` of
    ``path`` (Terabyte: all its lines), with a progress bar."""
    from tqdm import tqdm

    bounds = [first for _, first, _ in days] + [np.iinfo(np.int64).max]
    bar = tqdm(
        total=path.stat().st_size,
        unit="B",
        unit_scale=True,
        desc=f"{what}{path.name}",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        _native_file(
            path,
            writers,
            np.asarray([day for day, _, _ in days]),
            np.asarray(bounds),
            max_ind_range or 0,
            skip_malformed,
            meta,
            threads,
            bar,
            number,
            keys,
            on_done,
        )
    finally:
        bar.close()


def _preprocess_native(
    plan,
    out,
    meta,
    max_ind_range,
    skip_malformed,
    threads,
    progress,
    dataset,
    vocabulary,
    min_count,
):
    from .. import _C

    hashed = bool(max_ind_range)
    vocab = None if hashed else _C.Vocabulary(NUM_SPARSE, count=vocabulary == "frequency")
    keys = None if hashed else _Keys()
    by_file = _by_file(plan)

    def run(path, days, writers, scratch, what, on_done=None):
        number = None if vocab is None else (lambda sparse, keep: vocab.map(sparse, threads))
        _parse_file(
            path,
            days,
            writers,
            scratch,
            what,
            max_ind_range,
            skip_malformed,
            threads,
            progress,
            number,
            keys,
            on_done,
        )

    if vocab is not None and vocabulary == "frequency":
        for path, days in by_file.items():  # counting: nothing written
            run(path, days, None, {"skipped": 0}, "counting ")
        vocab.freeze(min_count)
    # Terabyte resumes at its first unfinished day: with hashing any day, with
    # vocabularies by first appearance after the days whose vocabulary was
    # saved (the ids of a day depend on every day before it).
    saved = 0
    if dataset == "terabyte" and not hashed and vocabulary == "first":
        saved = _load_vocabulary(out, meta, vocab, keys, plan)
    for path, days in by_file.items():
        # A finished day is not written again; its lines are still read
        # where the vocabulary needs them, or where it shares a file with an
        # unfinished day (Kaggle).
        todo = [
            (day, first, last)
            for day, first, last in days
            if not ((hashed or day < saved) and _day_done(meta, day, path))
        ]
        if not todo:
            continue
        writers = {
            day: _DayWriter(out, day) for day, _, _ in todo if not _day_done(meta, day, path)
        }
        fingerprint = _fingerprint([path])

        def close(day):
            meta["days"][str(day)] = writers.pop(day).close()
            meta["day_files"][str(day)] = fingerprint
            meta["table_sizes"] = [max_ind_range] * NUM_SPARSE if hashed else vocab.sizes()
            _write_meta(out, meta)

        run(path, days, writers, meta, "", lambda day: day in writers and close(day))
        for day in list(writers):
            close(day)
        if dataset == "terabyte" and not hashed and vocabulary == "first":
            _save_vocabulary(out, meta, vocab, keys, max(d for d, _, _ in todo) + 1)
            _write_meta(out, meta)
    return meta


def _save_vocabulary(out: Path, meta: dict, vocab, keys, days: int) -> None:
    """The vocabulary after days 0..days-1 (keys in id order), so a rerun
    can go on from there."""
    tmp = out / "vocabulary.tmp.npz"
    np.savez(tmp, **{f"c{c}": vocab.keys(c) for c in range(NUM_SPARSE)})
    tmp.replace(out / "vocabulary.npz")
    meta["vocabulary"] = {"days": days, "odd": keys.odd}


def _load_vocabulary(out: Path, meta: dict, vocab, keys, plan) -> int:
    """Loads the saved vocabulary if every day it covers is done as planned
    (returns how many days it covers), else 0 and nothing is loaded."""
    state = meta.get("vocabulary")
    path = out / "vocabulary.npz"
    if not state or not path.exists():
        return 0
    if not all(_day_done(meta, day, f) for f, day, _, _ in plan if day < state["days"]):
        return 0
    with np.load(path) as z:
        cols = [z[f"c{c}"].view(np.int64) for c in range(NUM_SPARSE)]
    m = np.zeros((max(len(k) for k in cols), NUM_SPARSE), dtype=np.int64)
    for c, k in enumerate(cols):  # zeros (empty) pad the shorter columns
        m[: len(k), c] = k
    vocab.map(m, 1)  # the same keys in the same order: the same ids
    keys.odd = [dict(odd) for odd in state["odd"]]
    return state["days"]
