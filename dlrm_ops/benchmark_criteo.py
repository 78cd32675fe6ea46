"""Criteo preprocessing speed: a generated Criteo-format file (Zipf-like
categories, log-normal counts, a tenth of the fields empty, as in the Kaggle
logs), preprocessed with hashing by the native parser (1 and 2 threads) and
by the Python reference (on its first lines), in child processes so that
peak RSS is each run's own."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List

import numpy as np

DISTINCT = 250_000  # distinct lines generated; the file repeats them


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


CHILD = """
import json, resource, sys, time
from dlrm_ops.data import preprocess_criteo
raw, out, native, threads = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
t0 = time.perf_counter()
meta = preprocess_criteo([raw], out, "kaggle", 10_000_000, native=native, threads=threads)
t = time.perf_counter() - t0
print(json.dumps({"seconds": t, "lines": sum(meta["days"].values()),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(lines: int = 5_000_000, threads: List[int] = (1, 2), python_lines: int = 200_000):
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "train.txt"
        generate(raw, lines)
        size = raw.stat().st_size
        small = Path(tmp) / "small.txt"
        with open(raw, "rb") as f, open(small, "wb") as out:
            for _, line in zip(range(python_lines), f):
                out.write(line)
        runs = [("native", th, raw, size) for th in threads]
        runs.append(("python reference", 1, small, small.stat().st_size))
        for name, th, path, nbytes in runs:
            out = Path(tmp) / f"out_{name}_{th}"
            r = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    str(path),
                    str(out),
                    "1" if name == "native" else "0",
                    str(th),
                ],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "OMP_NUM_THREADS": str(th)},
            )
            m = json.loads(r.stdout.strip().splitlines()[-1])
            m.update(
                impl=name,
                threads=th,
                mb_per_s=nbytes / m["seconds"] / 1e6,
                lines_per_s=m["lines"] / m["seconds"],
            )
            results.append(m)
    return results


def print_table(results) -> None:
    print(
        f"{'parser':<18} {'thr':>3} {'lines':>10} {'s':>7} {'lines/s':>11} {'MB/s':>7} "
        f"{'peak RSS MB':>12}"
    )
    for r in results:
        print(
            f"{r['impl']:<18} {r['threads']:>3} {r['lines']:>10,} {r['seconds']:>7.2f} "
            f"{r['lines_per_s']:>11,.0f} {r['mb_per_s']:>7.0f} {r['peak_rss_mb']:>12.0f}"
        )
    native = max((r for r in results if r["impl"] == "native"), key=lambda r: r["lines_per_s"])
    for name, total in (("Kaggle (45.8M lines)", 45_840_617), ("Terabyte (4.37B lines)", 4.37e9)):
        print(
            f"  {name} at {native['lines_per_s']:,.0f} lines/s: "
            f"{total / native['lines_per_s'] / 60:,.1f} minutes"
        )
