"""Vocabularies built through the disk in a byte budget (data/criteo_spill.py):
the same bytes as the Python reference, the budget kept, every step
resumable."""

import subprocess
import sys

import numpy as np
import pytest
from test_criteo_native import odd, outputs, repeating_lines, terabyte_days

from dlrm_ops import _C
from dlrm_ops.data import criteo, criteo_spill
from dlrm_ops.data.criteo import MalformedLineError, preprocess_criteo

SMALL = 1 << 16  # about 50 keys per column per scan: many scans and id groups


def test_key_range_keeps_the_budget_and_covers_every_key():
    rng = np.random.default_rng(0)
    n, columns, budget = 20000, 4, 1 << 16
    keys = (rng.zipf(1.3, size=(n, columns)) % 50000).astype(np.int64)
    keys[rng.random((n, columns)) < 0.1] = 0
    keys[:, 3] = 7  # one key only
    lo, active, got = [0] * columns, [True] * columns, [{} for _ in range(columns)]
    scans = 0
    while any(active):
        scan = _C.KeyRange(lo, active, budget)
        for s in range(0, n, 3000):
            scan.add(keys[s : s + 3000], s, 2)
            assert scan.memory_bytes() <= budget
        scans += 1
        for c in range(columns):
            if not active[c]:
                continue
            assert scan.lo(c) == lo[c] and scan.hi(c) >= lo[c]
            k, first, counts = scan.take(c)
            assert np.all(np.diff(first) > 0)  # in order of first appearance
            for key, f, count in zip(k.tolist(), first.tolist(), counts.tolist()):
                assert key not in got[c]  # ranges do not overlap
                got[c][key] = (f, count)
            active[c] = scan.hi(c) != criteo_spill.TOP
            lo[c] = scan.hi(c) + active[c]
    assert scans > 3
    for c in range(columns):
        col = keys[:, c]
        values, first, counts = np.unique(col[col != 0], return_index=True, return_counts=True)
        rows = np.flatnonzero(col != 0)[first]
        want = {int(v): (int(r), int(k)) for v, r, k in zip(values, rows, counts)}
        assert got[c] == want
    with pytest.raises(ValueError, match="budget_bytes"):
        _C.KeyRange([0] * 26, [True] * 26, 1000)


def test_id_map_writes_only_the_keys_it_holds():
    ids = _C.IdMap(3)
    ids.add(1, np.array([5, 7]), np.array([10, 20]))
    keys = np.array([[5, 5, 0], [0, 7, 5], [9, 9, 9]])
    out = np.full((3, 3), -1, np.int64)
    ids.apply(keys, out, 2)
    assert out.tolist() == [[-1, 10, -1], [-1, 20, -1], [-1, -1, -1]]
    with pytest.raises(ValueError, match="out must be a writeable"):
        ids.apply(keys, out[:, :2], 1)
    big = _C.IdMap(3)  # sized once: what the groups of runs are budgeted by
    big.reserve(2, 5000)
    big.add(2, np.arange(1, 5001), np.arange(5000))
    assert big.memory_bytes() <= _C.IdMap.bytes_for(5000) + 2 * _C.IdMap.bytes_for(0)


@pytest.mark.parametrize(
    "vocabulary,min_count,budget",
    [
        ("first", 1, SMALL),
        ("frequency", 3, SMALL),
        ("first", 1, 1 << 30),
        ("frequency", 1, 1 << 30),
    ],
)
def test_spilled_vocabularies_equal_python(tmp_path, monkeypatch, vocabulary, min_count, budget):
    monkeypatch.setattr(criteo, "BLOCK_BYTES", 1999)  # the first scan fed many blocks
    rows = repeating_lines(1500)
    rows[100] = odd(rows[100], 0, "7")  # malformed: skipped, numbers nothing
    raw = tmp_path / "train.txt"
    raw.write_text("\n".join(rows) + "\n")
    kw = dict(vocabulary=vocabulary, min_count=min_count, skip_malformed=True)
    a = preprocess_criteo([raw], tmp_path / "s", threads=2, vocabulary_memory=budget, **kw)
    b = preprocess_criteo([raw], tmp_path / "p", native=False, **kw)
    assert outputs(tmp_path / "s") == outputs(tmp_path / "p")
    for k in ("days", "table_sizes", "skipped"):
        assert a[k] == b[k], k
    assert "spill" not in a and sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(
        p.name for p in (tmp_path / "p").iterdir()
    )  # keys and runs removed
    passes = a["vocabulary_passes"]
    if budget == SMALL:
        assert passes["scans"] > 3 and passes["id_passes"] > 3
    else:  # the first scan, fed while parsing, held all
        assert passes == {"scans": 1, "id_passes": 1}


def test_terabyte_spilled_vocabularies_resume_per_day(tmp_path, monkeypatch):
    files = terabyte_days(tmp_path, repeating_lines, 30)
    out = tmp_path / "s"
    with pytest.raises(MalformedLineError, match="day_9:6"):
        preprocess_criteo(files, out, "terabyte", threads=2, vocabulary_memory=SMALL)
    assert len(list(out.glob("day_*.keys.bin"))) == 9 and not list(out.glob("day_*.sparse.bin"))
    files[9].write_text("\n".join(repeating_lines(30, seed=9)) + "\n")
    written = []
    real = criteo_spill._DayWriter
    monkeypatch.setattr(
        criteo_spill, "_DayWriter", lambda out, d, kind: written.append(d) or real(out, d, kind)
    )
    meta = preprocess_criteo(files, out, "terabyte", threads=2, vocabulary_memory=SMALL)
    assert written == list(range(9, 24))  # days 0-8 were not parsed again
    clean = preprocess_criteo(files, tmp_path / "clean", "terabyte", native=False)
    assert outputs(out) == outputs(tmp_path / "clean")
    assert meta["table_sizes"] == clean["table_sizes"] and meta["days"] == clean["days"]


class Killed(Exception):
    pass


@pytest.mark.parametrize("after", [2, 8, 10, 12, 13, 15, 17])  # keys, scans, ids, apply, end
def test_spilled_vocabularies_resume_from_any_step(tmp_path, monkeypatch, after):
    monkeypatch.setattr(criteo, "BLOCK_BYTES", 3001)
    rows = repeating_lines(800, seed=3)
    rows[300] = odd(rows[300], 0, "2")  # skipped, and still counted after a resume
    raw = tmp_path / "train.txt"
    raw.write_text("\n".join(rows) + "\n")
    kw = dict(vocabulary="frequency", min_count=2, skip_malformed=True)
    kw.update(threads=2, vocabulary_memory=SMALL)
    real = criteo_spill._write_meta
    writes = []

    def write(out, meta):
        real(out, meta)
        writes.append(1)
        if len(writes) == after:
            raise Killed

    monkeypatch.setattr(criteo_spill, "_write_meta", write)
    with pytest.raises(Killed):
        preprocess_criteo([raw], tmp_path / "s", **kw)
    monkeypatch.setattr(criteo_spill, "_write_meta", real)
    meta = preprocess_criteo([raw], tmp_path / "s", **kw)
    clean = preprocess_criteo(
        [raw], tmp_path / "p", vocabulary="frequency", min_count=2, skip_malformed=True
    )
    assert outputs(tmp_path / "s") == outputs(tmp_path / "p")
    for k in ("days", "table_sizes", "skipped"):
        assert meta[k] == clean[k], k


def test_vocabulary_memory_is_checked(tmp_path):
    raw = tmp_path / "train.txt"
    raw.write_text("\n".join(repeating_lines(20)) + "\n")
    with pytest.raises(ValueError, match="leave out max_ind_range"):
        preprocess_criteo([raw], tmp_path / "a", max_ind_range=10, vocabulary_memory=1 << 20)
    with pytest.raises(ValueError, match="needs the native parser"):
        preprocess_criteo([raw], tmp_path / "a", native=False, vocabulary_memory=1 << 20)
    with pytest.raises(ValueError, match="at least 65536 bytes"):
        preprocess_criteo([raw], tmp_path / "a", vocabulary_memory=1000)
    cmd = [sys.executable, "-m", "dlrm_ops", "preprocess", "--raw-data-file", str(raw)]
    cmd += ["--processed-data-file", str(tmp_path / "c"), "--no-progress"]
    bad = subprocess.run(cmd + ["--vocabulary-memory", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--vocabulary-memory must be at least 1" in bad.stderr
    ok = subprocess.run(cmd + ["--vocabulary-memory", "1"], capture_output=True, text=True)
    assert ok.returncode == 0 and "20 lines" in ok.stdout, ok.stderr
    assert "(vocabularies: 1 scans, 1 passes writing ids)" in ok.stdout
    assert outputs(tmp_path / "c") == outputs(
        preprocess_criteo([raw], tmp_path / "p") and tmp_path / "p"
    )
