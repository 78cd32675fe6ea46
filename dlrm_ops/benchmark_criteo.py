"""Criteo preprocessing speed: a generated Criteo-format file (Zipf-like
categories, log-normal counts, a tenth of the fields empty, as in the Kaggle
logs), preprocessed with hashing and with vocabularies by the native parser
(1 and 2 threads; vocabularies also through the disk in 16 MiB) and by the
Python reference (on its first lines); and a native vocabulary filled to
Kaggle's 33.8M distinct categories, in memory or through the disk. Each in a
child process, so that peak RSS is its own."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List

import numpy as np

from .data.batch import batch_from_arrays

DISTINCT = 250_000  # distinct lines generated; the file repeats them
# Distinct values of C1..C26 in Kaggle's train.txt (45,840,617 lines).
KAGGLE_CARDINALITIES = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]  # fmt: skip
KAGGLE_LINES = 45_840_617


def generate(path: Path, lines: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n = min(lines, DISTINCT)
    label = (rng.random(n) < 0.26).astype(int)
    ints = np.floor(rng.lognormal(1.5, 2.0, (n, 13))).astype(np.int64)
    cats = (rng.zipf(1.2, (n, 26)) * 2654435761 % 2**32).astype(np.int64)
    empty_i = rng.random((n, 13)) < 0.1
    empty_c = rng.random((n, 26)) < 0.1
    block = []
    for r in range(n):
        f = [str(label[r])]
        f += ["" if empty_i[r, j] else str(ints[r, j]) for j in range(13)]
        f += ["" if empty_c[r, j] else f"{cats[r, j]:08x}" for j in range(26)]
        block.append("\t".join(f))
    text = ("\n".join(block) + "\n").encode()
    with open(path, "wb") as out:
        for _ in range(lines // n):
            out.write(text)
        rest = lines % n
        if rest:
            out.write(("\n".join(block[:rest]) + "\n").encode())


def peak_rss_mb() -> float:
    """This process's peak RSS in MB since it started (VmHWM). Not
    getrusage's ru_maxrss: on Linux a child keeps the high-water mark of the
    process it was forked from, so a child of a large benchmark process would
    report the parent's."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


CHILD = """
import json, sys, time
from dlrm_ops.benchmark_criteo import peak_rss_mb
from dlrm_ops.data import preprocess_criteo
raw, out, native, threads = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
mode = sys.argv[5]
hashing = 10_000_000 if mode == "hashed" else None
budget = int(mode.split()[1]) << 20 if mode.startswith("vocab ") else None
t0 = time.perf_counter()
meta = preprocess_criteo([raw], out, "kaggle", hashing, native=native, threads=threads,
                         vocabulary_memory=budget)
t = time.perf_counter() - t0
print(json.dumps({"seconds": t, "lines": sum(meta["days"].values()),
                  "peak_rss_mb": peak_rss_mb()}))
"""


VOCAB_CHILD = """
import json, sys, time
import numpy as np
from dlrm_ops import _C
from dlrm_ops.benchmark_criteo import KAGGLE_CARDINALITIES, KAGGLE_LINES, peak_rss_mb
threads = int(sys.argv[1])
card = np.asarray(KAGGLE_CARDINALITIES)
v, rng, seconds = _C.Vocabulary(26), np.random.default_rng(0), 0.0
for start in range(0, KAGGLE_LINES, 1 << 16):
    n = min(1 << 16, KAGGLE_LINES - start)
    keys = ((rng.random((n, 26)) * card).astype(np.int64) + 1) << 4 | 8
    t0 = time.perf_counter()
    v.map(keys, threads)
    seconds += time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "lines": KAGGLE_LINES, "distinct": sum(v.sizes()) - 26,
                  "table_mb": v.memory_bytes() / 2**20,
                  "peak_rss_mb": peak_rss_mb()}))
"""


SPILLED_CHILD = """
import json, sys, time
from pathlib import Path
import numpy as np
from dlrm_ops.benchmark_criteo import KAGGLE_CARDINALITIES, KAGGLE_LINES, peak_rss_mb
from dlrm_ops.data import criteo_spill
out, budget, threads = Path(sys.argv[1]), int(sys.argv[2]) << 20, int(sys.argv[3])
card, rng = np.asarray(KAGGLE_CARDINALITIES), np.random.default_rng(0)
(out / "spill").mkdir(parents=True)
rows = {}
for d in range(7):  # Kaggle's lines of keys in 7 days, as the parse pass writes them
    rows[str(d)] = (d + 1) * KAGGLE_LINES // 7 - d * KAGGLE_LINES // 7
    with open(out / f"day_{d}.keys.bin", "wb") as f:
        for start in range(0, rows[str(d)], 1 << 16):  # small blocks: RSS is the steps' own
            n = min(1 << 16, rows[str(d)] - start)
            (((rng.random((n, 26)) * card).astype(np.int64) + 1) << 4 | 8).tofile(f)
meta = {"days": {}, "day_files": {}, "spill": {"days": rows, "day_files": dict.fromkeys(rows)}}
criteo_spill._fresh_scans(meta["spill"])
t0 = time.perf_counter()
meta = criteo_spill.spilled_ids(out, meta, list(range(7)), threads, False, "first", 1, budget)
print(json.dumps({"seconds": time.perf_counter() - t0, "lines": KAGGLE_LINES,
                  **meta["vocabulary_passes"],
                  "distinct": sum(meta["table_sizes"]) - 26, "budget_mb": budget / 2**20,
                  "peak_rss_mb": peak_rss_mb()}))
"""


def kaggle_vocabulary_spilled(budget_mib: int, threads: int = 2) -> dict:
    """Kaggle's line count of keys (as ``kaggle_vocabulary``) written to disk
    as the parse pass does (9.5 GB, and as much again for the ids), then
    numbered through the disk in ``budget_mib``: the scans, ids and apply
    passes' time and peak RSS (the parse pass's own first scan left out)."""
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run(
            [
                sys.executable,
                "-c",
                SPILLED_CHILD,
                str(Path(tmp) / "k"),
                str(budget_mib),
                str(threads),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    return json.loads(r.stdout.strip().splitlines()[-1])


def kaggle_vocabulary(threads: int = 2) -> dict:
    """A native Vocabulary given Kaggle's line count of keys drawn uniformly
    from its 26 columns' cardinalities: time, table memory, peak RSS."""
    r = subprocess.run(
        [sys.executable, "-c", VOCAB_CHILD, str(threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


def _numpy_batch(data, i: int):
    """Batch i of a CriteoDataset read with numpy alone, the best way without
    native code: each day's rows in one fancy index (sorted, a slice where
    contiguous), put back in batch order, the categories transposed."""
    rows = data._rows(i)
    part = np.searchsorted(data.starts, rows, side="right") - 1
    arrays = [[], [], []]
    for k in np.unique(part):
        local = np.sort(rows[part == k]) - data.starts[k] + data.lows[k]
        run = local[-1] - local[0] == len(local) - 1
        for j in range(3):
            a = data.arrays[k][j]
            arrays[j].append(a[local[0] : local[-1] + 1] if run else a[local])
    back = np.searchsorted(np.sort(rows), rows)
    dense, sparse, labels = (np.concatenate(a)[back] for a in arrays)
    return batch_from_arrays(dense, sparse, labels)


def batch_speed(lines: int = 1_000_000, batch_size: int = 2048, repeats: int = 3) -> List[dict]:
    """Training batches cut from the preprocessed arrays of a generated file
    (hashed): ``CriteoDataset.batch`` (native) against ``_numpy_batch``, in
    file order and shuffled, alternating in this process; ms per batch, best
    of ``repeats``. The two are checked equal first."""
    import time

    import torch

    from .data import CriteoDataset, preprocess_criteo

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "train.txt"
        generate(raw, lines)
        preprocess_criteo([raw], Path(tmp) / "p", "kaggle", 10_000_000)
        for order in ("none", "total"):
            data = CriteoDataset(Path(tmp) / "p", "train", batch_size, randomize=order)
            a, b = data.batch(0), _numpy_batch(data, 0)
            if not all(
                torch.equal(getattr(a, k), getattr(b, k)) for k in ("dense", "indices", "labels")
            ):
                raise RuntimeError("the native batch differs from numpy's")
            best = {"native": float("inf"), "numpy": float("inf")}
            for _ in range(repeats):
                for name, make in (
                    ("native", data.batch),
                    ("numpy", lambda i: _numpy_batch(data, i)),
                ):
                    t0 = time.perf_counter()
                    for i in range(len(data)):
                        make(i)
                    best[name] = min(best[name], (time.perf_counter() - t0) / len(data) * 1e3)
            out.append({"order": order, "batch": batch_size, "batches": len(data),
                        "native_ms": best["native"], "numpy_ms": best["numpy"]})  # fmt: skip
    return out


def run(
    lines: int = 5_000_000,
    threads: List[int] = (1, 2),
    python_lines: int = 200_000,
    spill_mib: int = 16,
):
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "train.txt"
        generate(raw, lines)
        size = raw.stat().st_size
        small = Path(tmp) / "small.txt"
        with open(raw, "rb") as f, open(small, "wb") as out:
            for _, line in zip(range(python_lines), f):
                out.write(line)
        runs = [("native", th, raw, size, mode) for mode in ("hashed", "vocab") for th in threads]
        runs.append(("native", max(threads), raw, size, f"vocab {spill_mib}"))  # through the disk
        runs += [
            ("python reference", 1, small, small.stat().st_size, m) for m in ("hashed", "vocab")
        ]
        for name, th, path, nbytes, mode in runs:
            out = Path(tmp) / f"out_{name}_{th}_{mode}"
            r = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    str(path),
                    str(out),
                    "1" if name == "native" else "0",
                    str(th),
                    mode,
                ],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "OMP_NUM_THREADS": str(th)},
            )
            m = json.loads(r.stdout.strip().splitlines()[-1])
            m.update(
                impl=name,
                mode=mode,
                threads=th,
                mb_per_s=nbytes / m["seconds"] / 1e6,
                lines_per_s=m["lines"] / m["seconds"],
            )
            results.append(m)
    return results


def print_batches(rows) -> None:
    for r in rows:
        print(
            f"batches of {r['batch']}, rows {'shuffled' if r['order'] == 'total' else 'in order'}: "
            f"native {r['native_ms']:.3f} ms, numpy {r['numpy_ms']:.3f} ms "
            f"({r['numpy_ms'] / r['native_ms']:.1f}x), best of 3 over {r['batches']} batches"
        )


def print_table(results, vocab=None, spilled=None) -> None:
    print(
        f"{'parser':<18} {'categories':<10} {'thr':>3} {'lines':>10} {'s':>7} {'lines/s':>11} "
        f"{'MB/s':>7} {'peak RSS MB':>12}"
    )
    for r in results:
        print(
            f"{r['impl']:<18} {r['mode']:<10} {r['threads']:>3} {r['lines']:>10,} "
            f"{r['seconds']:>7.2f} {r['lines_per_s']:>11,.0f} {r['mb_per_s']:>7.0f} "
            f"{r['peak_rss_mb']:>12.0f}"
        )
    for mode in dict.fromkeys(r["mode"] for r in results):
        native = max(
            (r for r in results if r["impl"] == "native" and r["mode"] == mode),
            key=lambda r: r["lines_per_s"],
        )
        for name, total in (("Kaggle (45.8M lines)", KAGGLE_LINES), ("Terabyte (4.37B)", 4.37e9)):
            print(
                f"  {mode}: {name} at {native['lines_per_s']:,.0f} lines/s: "
                f"{total / native['lines_per_s'] / 60:,.1f} minutes"
            )
    if vocab:
        print(
            f"native vocabulary at Kaggle's cardinalities: {vocab['distinct']:,} distinct "
            f"categories from {vocab['lines']:,} lines of keys in {vocab['seconds']:.1f} s "
            f"({vocab['lines'] / vocab['seconds']:,.0f} lines/s), tables {vocab['table_mb']:,.0f} "
            f"MiB, peak RSS {vocab['peak_rss_mb']:,.0f} MB"
        )
    if spilled:
        print(
            f"through the disk in {spilled['budget_mb']:,.0f} MiB: {spilled['distinct']:,} "
            f"distinct categories from {spilled['lines']:,} lines of keys in "
            f"{spilled['seconds']:.1f} s "
            f"({spilled['scans']} scans, {spilled['id_passes']} passes writing ids), peak RSS "
            f"{spilled['peak_rss_mb']:,.0f} MB"
        )
