"""The native Criteo parser against the Python reference: the same bytes in
every output file, the same malformed-line rules, blocks cut anywhere."""

from pathlib import Path

import numpy as np
import pytest

from dlrm_ops.data import criteo
from dlrm_ops.data.criteo import MalformedLineError, preprocess_criteo


def lines(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ints = [str(int(x)) if rng.random() > 0.15 else "" for x in rng.integers(-3, 10**6, 13)]
        cats = [f"{int(x):08x}" if rng.random() > 0.15 else "" for x in rng.integers(0, 2**32, 26)]
        out.append("\t".join([str(int(rng.random() < 0.3))] + ints + cats))
    return out


def odd(line: str, field: int, value: str) -> str:
    f = line.split("\t")
    f[field] = value
    return "\t".join(f)


def outputs(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("day_*.bin"))}


def both(tmp_path, files, **kw):
    a = preprocess_criteo(files, tmp_path / "native", native=True, threads=2, **kw)
    b = preprocess_criteo(files, tmp_path / "python", native=False, **kw)
    assert outputs(tmp_path / "native") == outputs(tmp_path / "python")
    assert outputs(tmp_path / "native")
    for k in ("days", "table_sizes", "skipped"):
        assert a[k] == b[k], k
    return a


@pytest.mark.parametrize("block", [1 << 20, 997])
def test_native_equals_python_byte_for_byte(tmp_path, monkeypatch, block):
    monkeypatch.setattr(criteo, "BLOCK_BYTES", block)  # blocks cut mid-line
    rows = lines(700)
    # What only the reference reads (the native parser hands these lines back).
    rows[3] = odd(rows[3], 2, "+17")
    rows[4] = odd(rows[4], 3, " 5")
    rows[5] = odd(rows[5], 15, "0x1a2b")
    rows[6] = odd(rows[6], 16, "f" * 24)  # 96-bit category
    rows[7] = odd(rows[7], 4, "9" * 400)  # log(x) of a 400-digit integer
    rows[8] = odd(rows[8], 5, "1234567890123456")  # 16 digits
    rows[9] = rows[9] + "\r"  # a CRLF line
    raw = tmp_path / "train.txt"
    raw.write_text("\n".join(rows))  # no newline after the last line
    meta = both(tmp_path, [raw], dataset="kaggle", max_ind_range=1000)
    assert sum(meta["days"].values()) == 700


def test_malformed_lines_same_rules(tmp_path):
    rows = lines(60)
    rows[10] = odd(rows[10], 0, "2")
    rows[20] = rows[20] + "\textra"
    rows[30] = odd(rows[30], 7, "x1")
    raw = tmp_path / "train.txt"
    raw.write_text("\n".join(rows) + "\n")
    meta = both(tmp_path, [raw], dataset="kaggle", max_ind_range=50, skip_malformed=True)
    assert meta["skipped"] == 3 and sum(meta["days"].values()) == 57
    for native in (True, False):
        with pytest.raises(MalformedLineError, match=r"train.txt:11: label must be 0 or 1"):
            preprocess_criteo([raw], tmp_path / f"e{native}", "kaggle", 50, native=native)


def test_terabyte_days_and_lone_carriage_return(tmp_path):
    files = []
    for d in range(24):
        f = tmp_path / f"day_{d}"
        f.write_text("\n".join(lines(5, seed=d)) + "\n")
        files.append(f)
    both(tmp_path, files, dataset="terabyte", max_ind_range=97)
    # A lone CR splits a line in Python's text mode: the native path steps aside.
    cr = tmp_path / "cr.txt"
    rows = lines(14)
    cr.write_text("\n".join(rows[:5]) + "\r" + "\n".join(rows[5:]) + "\n")
    both(tmp_path / "x", [cr], dataset="kaggle", max_ind_range=97)


def test_preprocess_command(tmp_path):
    import subprocess
    import sys

    raw = tmp_path / "train.txt"
    rows = lines(300)
    rows[7] = odd(rows[7], 0, "x")
    raw.write_text("\n".join(rows) + "\n")
    cmd = [sys.executable, "-m", "dlrm_ops", "preprocess", "--raw-data-file", str(raw)]
    cmd += ["--processed-data-file", str(tmp_path / "p"), "--max-ind-range", "100"]
    bad = subprocess.run(cmd + ["--no-progress"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "train.txt:8: label must be 0 or 1" in bad.stderr
    ok = subprocess.run(
        cmd + ["--skip-malformed", "--threads", "2"], capture_output=True, text=True, timeout=120
    )
    assert ok.returncode == 0, ok.stderr
    assert "300 lines (1 skipped)" in ok.stdout and "lines/s" in ok.stdout
    assert "train.txt" in ok.stderr  # the progress bar


def test_prefetch_keeps_order_and_stops_early():
    from dlrm_ops.data import RandomData
    from dlrm_ops.data.prefetch import prefetch

    data = RandomData([30, 40], 13, 8, 10, seed=4)
    got = list(prefetch(data, 3, 10, depth=3))
    assert len(got) == 7
    for i, b in zip(range(3, 10), got):
        assert np.array_equal(b.indices.numpy(), data.batch(i).indices.numpy())
    assert len(list(prefetch(data, 0, 10, depth=0))) == 10  # inline
    it = prefetch(data, 0, 10, depth=4)
    next(it)
    it.close()  # leaves without waiting for the rest
