"""Criteo vocabularies larger than memory: the same ids as the in-memory
``_C.Vocabulary`` (by first appearance, or by count with ``min_count``) in a
byte budget, through the disk.

1. Keys: every day is parsed into its dense and label arrays and a keys
   array (``day_<d>.keys.bin``: each category as the Vocabulary's key; a
   day's keys depend on that day alone, so this resumes per day). The first
   scan (2) is fed on the way.
2. Scans: ``_C.KeyRange`` reads the keys of every day and keeps, per column,
   the keys of a range of hash values with the row each first appears at
   and its count, within the budget (a column that would outgrow it halves
   its range). Each scan writes a run per column (``spill/c<c>.<k>.npz``)
   and the next one starts where its range ended, until every column's
   range is covered.
3. Ids: by first appearance, a key's id is 1 + the number of keys of its
   column first seen before it; by count, 1 + the number ordered before it
   by (count descending, first-appearance id). Both are sums over the
   column's runs of a binary search, two runs in memory at a time.
4. Apply: the runs' keys and ids are loaded into ``_C.IdMap`` as many runs
   at a time as the budget holds, and each such group is one pass over the
   keys writing its ids into ``day_<d>.sparse.bin``.

Memory: the scans' and the maps' tables stay within the budget; a scan's run
is sorted and written one column at a time (that column's keys twice more,
16-20 bytes each), and parsing holds a block of lines as the in-memory path
does. Disk: the keys (208 bytes a line) beside the output until the end. The
state of every step is in ``meta.json`` under ``"spill"``, so an interrupted
run goes on from the last finished day, scan or group.
"""

import os
import shutil
from pathlib import Path

import numpy as np

from .criteo import NUM_SPARSE, _day_done, _DayWriter, _fingerprint, _Keys, _parse_file, _write_meta

TOP = (1 << 64) - 1  # the last hash value
BLOCK_ROWS = 1 << 18  # rows of keys read at a time (54 MB)


def preprocess_spilled(
    by_file, out: Path, meta: dict, skip_malformed, threads, progress, vocabulary, min_count, budget
) -> dict:
    """The days of ``by_file`` ({raw file: [(day, first line, last line)]},
    in day order) with vocabularies in ``budget`` bytes; returns the meta."""
    from .. import _C

    if all(_day_done(meta, d, path) for path, days in by_file.items() for d, _, _ in days):
        return meta
    state = meta.setdefault("spill", {"days": {}, "day_files": {}, "odd": None})
    if "lo" not in state:
        _fresh_scans(state)
    (out / "spill").mkdir(exist_ok=True)
    keys = _Keys()
    if state["odd"]:
        keys.odd = [dict(odd) for odd in state["odd"]]
    days = [d for ds in by_file.values() for d, _, _ in ds]

    # 1. Keys, and the first scan on the way when every file is read.
    todo = {
        path: ds
        for path, ds in by_file.items()
        if not all(_day_done(state, d, path) for d, _, _ in ds)
    }
    if todo:
        _fresh_scans(state)
        every_file = len(todo) == len(by_file)
        scan = _C.KeyRange(state["lo"], [True] * NUM_SPARSE, budget) if every_file else None
        feed = _Feed(scan, threads) if every_file else None
        for path, ds in todo.items():
            writers = {
                d: _DayWriter(out, d, "keys") for d, _, _ in ds if not _day_done(state, d, path)
            }
            fingerprint = _fingerprint([path])

            def close(d):
                state["days"][str(d)] = writers.pop(d).close()
                state["day_files"][str(d)] = fingerprint
                state["odd"] = [dict(odd) for odd in keys.odd]
                _write_meta(out, meta)

            on_done = lambda d: d in writers and close(d)  # noqa: E731
            _parse_file(
                path,
                ds,
                writers,
                meta,
                "keys: ",
                0,
                skip_malformed,
                threads,
                progress,
                feed,
                keys,
                on_done,
            )
            for d in list(writers):
                close(d)
        state["skipped"] = meta["skipped"]
        if feed is not None:
            _take_runs(out, state, scan)
        _write_meta(out, meta)
        del scan, feed
    else:  # a rerun that reads no raw file: the count of the run that did
        meta["skipped"] = state.get("skipped", 0)

    return spilled_ids(out, meta, days, threads, progress, vocabulary, min_count, budget)


def spilled_ids(out: Path, meta: dict, days, threads, progress, vocabulary, min_count, budget):
    """Steps 2 to 5 over the keys of ``days`` (in ``meta["spill"]``): the
    ids written to each day's sparse array; returns the meta."""
    from tqdm import tqdm

    from .. import _C

    state = meta["spill"]
    # 2. Scans until every column's hash range is covered.
    rows = {int(d): n for d, n in state["days"].items()}
    while not all(state["done"]):
        scan = _C.KeyRange(state["lo"], [not d for d in state["done"]], budget)
        desc = f"vocabulary scan {len(max(state['runs'], key=len)) + 1}"
        with tqdm(total=sum(rows.values()), unit=" rows", desc=desc, disable=not progress) as bar:
            for row, block in _key_blocks(out, days, rows):
                scan.add(block, row, threads)
                bar.update(len(block))
        _take_runs(out, state, scan)
        del scan
        _write_meta(out, meta)

    # 3. Ids.
    if not state["ranked"]:
        state["sizes"] = _ids(out, state, vocabulary, min_count)
        state["ranked"] = True
        _write_meta(out, meta)

    # 4. Apply, as many runs at a time as the budget holds.
    if state["groups"] is None:
        state["groups"] = _groups(state["runs"], budget, _C.IdMap.bytes_for)
        _write_meta(out, meta)
    groups = state["groups"]
    for g in range(state["applied"], len(groups)):
        ids = _C.IdMap(NUM_SPARSE)
        for c in {c for c, _ in groups[g]}:
            ids.reserve(c, sum(state["runs"][c][k] for cc, k in groups[g] if cc == c))
        for c, k in groups[g]:
            found = np.load(_run_path(out, c, k, "ids"))
            kept = found > 0  # 0: below min_count, as the output already is
            ids.add(c, np.load(_run_path(out, c, k, "keys"))[kept], found[kept])
        desc = f"ids {g + 1}/{len(groups)}"
        with tqdm(total=sum(rows.values()), unit=" rows", desc=desc, disable=not progress) as bar:
            for d in days:
                with open(out / f"day_{d}.sparse.bin.tmp", "wb" if g == 0 else "r+b") as f:
                    for row, block in _key_blocks(out, [d], rows):
                        if g == 0:
                            written = np.zeros_like(block)
                        else:
                            written = np.fromfile(f, np.int64, block.size).reshape(block.shape)
                            f.seek(-written.nbytes, os.SEEK_CUR)
                        ids.apply(block, written, threads)
                        written.tofile(f)
                        bar.update(len(block))
        state["applied"] = g + 1
        _write_meta(out, meta)

    # 5. The days are done.
    for d in days:
        tmp = out / f"day_{d}.sparse.bin.tmp"
        if tmp.exists():
            os.replace(tmp, out / f"day_{d}.sparse.bin")
        meta["days"][str(d)] = rows[d]
        meta["day_files"][str(d)] = state["day_files"][str(d)]
    for d in days:  # before the meta says done: a rerun finds nothing left over
        (out / f"day_{d}.keys.bin").unlink(missing_ok=True)
    shutil.rmtree(out / "spill", ignore_errors=True)
    meta["table_sizes"] = state["sizes"]
    meta["vocabulary_passes"] = {
        "scans": max(len(runs) for runs in state["runs"]),
        "id_passes": len(groups),
    }
    del meta["spill"]
    _write_meta(out, meta)
    return meta


class _Feed:
    """The parser's blocks of keys, lines skipped as malformed left out, to a
    scan: rows numbered as they are written."""

    def __init__(self, scan, threads):
        self.scan, self.threads, self.row = scan, threads, 0

    def __call__(self, sparse, keep):
        block = sparse if keep.all() else np.ascontiguousarray(sparse[keep])
        self.scan.add(block, self.row, self.threads)
        self.row += len(block)


def _fresh_scans(state: dict) -> None:
    state.update(lo=[0] * NUM_SPARSE, done=[False] * NUM_SPARSE)
    state.update(runs=[[] for _ in range(NUM_SPARSE)], ranked=False, groups=None, applied=0)


def _run_path(out: Path, c: int, k: int, what: str) -> Path:
    return out / "spill" / f"c{c}.{k}.{what}.npy"


def _take_runs(out: Path, state: dict, scan) -> None:
    """A finished scan's keys, first rows and counts as each column's next
    run; where its next scan starts."""
    for c in range(NUM_SPARSE):
        if state["done"][c]:
            continue
        keys, first, counts = scan.take(c)
        k = len(state["runs"][c])
        for what, a in (("keys", keys.view(np.int64)), ("first", first), ("counts", counts)):
            np.save(_run_path(out, c, k, what), a)
        state["runs"][c].append(len(keys))
        del keys, first, counts  # before the next column's
        hi = scan.hi(c)
        state["done"][c] = hi == TOP
        state["lo"][c] = hi if hi == TOP else hi + 1


def _key_blocks(out: Path, days, rows):
    """(first row, keys [n, 26]) of the days in order, a block at a time;
    rows are numbered from the first of ``days``."""
    row = 0
    for d in days:
        with open(out / f"day_{d}.keys.bin", "rb") as f:
            for lo in range(0, rows[d], BLOCK_ROWS):
                n = min(BLOCK_ROWS, rows[d] - lo)
                yield row + lo, np.fromfile(f, np.int64, n * NUM_SPARSE).reshape(n, NUM_SPARSE)
        row += rows[d]


def _rank(out: Path, c: int, runs: int, values) -> None:
    """Run k's ids: 1 + how many of the column's values (``values(q)`` of
    each run q, unique over the column) are below each of its own."""
    for k in range(runs):
        v = values(k)
        ids = np.ones(len(v), np.int64)
        for q in range(runs):
            ids += np.searchsorted(np.sort(values(q)), v)
        np.save(_run_path(out, c, k, "ids"), ids)


def _ids(out: Path, state: dict, vocabulary: str, min_count: int) -> list:
    """Every run's ids (saved beside it); returns the table sizes."""

    def load(c, k, what):
        return np.load(_run_path(out, c, k, what))

    sizes = []
    for c, runs in enumerate(state["runs"]):
        _rank(out, c, len(runs), lambda k: load(c, k, "first"))
        if vocabulary == "first":
            sizes.append(1 + sum(runs))
            continue
        for k in range(len(runs)):
            os.replace(_run_path(out, c, k, "ids"), _run_path(out, c, k, "first_ids"))

        def by_count(k):  # count descending, then first appearance, as one uint64
            fewer = np.uint64(0xFFFFFFFF) - load(c, k, "counts").astype(np.uint64)
            return fewer << np.uint64(32) | (
                load(c, k, "first_ids").astype(np.uint64) - np.uint64(1)
            )

        _rank(out, c, len(runs), by_count)
        kept = 0
        for k in range(len(runs)):
            ids = load(c, k, "ids")
            ids[load(c, k, "counts") < min_count] = 0
            kept += int(np.count_nonzero(ids))
            np.save(_run_path(out, c, k, "ids"), ids)
        sizes.append(1 + kept)
    return sizes


def _groups(runs, budget: int, bytes_for) -> list:
    """The runs [column, run] in groups whose maps (one per column, sized
    for its runs in the group) fit the budget together."""
    groups, held = [[]], {}
    for c, sizes in enumerate(runs):
        for k, n in enumerate(sizes):
            more = {**held, c: held.get(c, 0) + n}
            if groups[-1] and sum(bytes_for(m) for m in more.values()) > budget:
                groups.append([])
                more = {c: n}
            groups[-1].append([c, k])
            held = more
    return groups
