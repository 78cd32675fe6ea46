"""The native Criteo parser against the Python reference: the same bytes in
every output file, the same malformed-line rules, blocks cut anywhere."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dlrm_ops.data import criteo
from dlrm_ops.data.criteo import CriteoDataset, MalformedLineError, preprocess_criteo


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


@pytest.mark.parametrize("block", [1 << 20, 997, 50])  # 50: every line longer than a block
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


def repeating_lines(n: int, seed: int = 0):
    """Lines whose categories repeat (Zipf over a few thousand values), some
    of them strings only the reference reads."""
    rng = np.random.default_rng(seed)
    rows = lines(n, seed)
    for i, row in enumerate(rows):
        f = row.split("\t")
        for j in range(14, 40):
            if f[j]:
                f[j] = f"{int(rng.zipf(1.3)) % 3000:08x}"
        f[15] = "ABCDEF12" if i % 41 == 0 else f[15]  # uppercase hex
        f[16] = "zz-odd" if i % 37 == 0 else f[16]  # not hex at all
        f[17] = "1234567890abcdef0" if i % 43 == 0 else f[17]  # 17 digits
        f[18] = "0" + f[18] if i % 31 == 0 and f[18] else f[18]  # a leading zero: another string
        rows[i] = "\t".join(f)
    return rows


@pytest.mark.parametrize(
    "vocabulary,min_count,block", [("first", 1, 1 << 20), ("first", 1, 1999), ("frequency", 3, 997)]
)
def test_native_vocabularies_equal_python(tmp_path, monkeypatch, vocabulary, min_count, block):
    monkeypatch.setattr(criteo, "BLOCK_BYTES", block)
    rows = repeating_lines(1500)
    rows[100] = odd(rows[100], 0, "7")  # malformed: skipped, and numbers nothing
    raw = tmp_path / "train.txt"
    raw.write_text("\n".join(rows) + "\n")
    meta = both(
        tmp_path, [raw], dataset="kaggle", vocabulary=vocabulary, min_count=min_count,
        skip_malformed=True,
    )  # fmt: skip
    assert meta["skipped"] == 1
    sizes = meta["table_sizes"]
    assert all(1 < n <= 3002 for n in sizes[1:])
    if vocabulary == "frequency":  # the most frequent category of a column gets id 1
        sparse = np.fromfile(tmp_path / "native" / "day_0.sparse.bin", dtype=np.int64)
        col = sparse.reshape(-1, 26)[:, 5]
        ids, counts = np.unique(col[col > 0], return_counts=True)
        assert ids[np.argmax(counts)] == 1


def test_vocabulary_keeps_first_appearance_and_counts():
    from dlrm_ops import _C

    with pytest.raises(RuntimeError, match="needs a Vocabulary that counts"):
        _C.Vocabulary(1).freeze(1)
    v = _C.Vocabulary(2, count=True)
    keys = np.array([[5, 0], [9, 5], [5, 5], [0, 7]], dtype=np.int64)
    v.map(keys, 2)
    assert keys.tolist() == [[1, 0], [2, 1], [1, 1], [0, 2]]
    assert v.sizes() == [3, 3]
    assert v.keys(0).tolist() == [5, 9]
    v.freeze(2)  # column 0: 5 twice, 9 once -> 9 is rare
    again = np.array([[9, 7], [5, 5], [4, 0]], dtype=np.int64)
    v.map(again, 1)
    assert again.tolist() == [[0, 0], [1, 1], [0, 0]]
    assert v.sizes() == [2, 2]
    bad = np.zeros((4, 2), dtype=np.int64)
    for keys in (
        np.zeros((2, 3), np.int64),
        bad.astype(np.int32),
        bad[::2],
        np.asfortranarray(bad),
    ):
        with pytest.raises(ValueError, match="keys must be a writeable C-contiguous int64"):
            v.map(keys, 1)  # a copy would take the ids silently
    for fn in (_C.has_lone_cr, _C.count_newlines):
        with pytest.raises(ValueError, match="contiguous 1-D buffer of bytes"):
            fn(memoryview(b"a\rb\nc")[::2])
    with pytest.raises(ValueError, match="contiguous 1-D buffer of bytes"):
        _C.parse_criteo(np.zeros(4, np.int32), 10, 1)


def test_vocabulary_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="vocabulary must be"):
        preprocess_criteo([], tmp_path, vocabulary="alphabetical")
    with pytest.raises(ValueError, match="min_count must be 1"):
        preprocess_criteo([], tmp_path, min_count=3)


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


def test_preprocess_benchmark_runs_both_modes():
    from dlrm_ops import benchmark_criteo

    rows = benchmark_criteo.run(lines=3000, threads=[1], python_lines=500)
    assert [(r["impl"], r["mode"]) for r in rows] == [
        ("native", "hashed"),
        ("native", "vocab"),
        ("native", "vocab 16"),
        ("python reference", "hashed"),
        ("python reference", "vocab"),
    ]
    assert all(r["lines"] in (3000, 500) and r["lines_per_s"] > 0 for r in rows)
    cut = benchmark_criteo.batch_speed(lines=3000, batch_size=256, repeats=1)
    assert [r["order"] for r in cut] == ["none", "total"]
    assert all(r["batches"] == 10 and r["native_ms"] > 0 and r["numpy_ms"] > 0 for r in cut)


def test_torchrec_npy_round_trip(tmp_path):
    from dlrm_ops.data import CriteoDataset, TorchrecNpyDataset, write_torchrec_npy

    raw = tmp_path / "train.txt"
    raw.write_text("\n".join(repeating_lines(900)) + "\n")
    preprocess_criteo([raw], tmp_path / "p", "kaggle", progress=False)
    assert write_torchrec_npy(tmp_path / "p", tmp_path / "npy") == list(range(7))
    dense = np.load(tmp_path / "npy" / "day_0_dense.npy")
    assert dense.dtype == np.float32 and dense.shape[1] == 13
    assert np.load(tmp_path / "npy" / "day_3_labels.npy").shape[1] == 1
    for split, kw in (("train", dict(randomize="total")), ("test", {}), ("val", {})):
        ours = CriteoDataset(tmp_path / "p", split, 64, drop_last=False, **kw)
        theirs = TorchrecNpyDataset(tmp_path / "npy", split, 64, drop_last=False, **kw)
        assert len(ours) == len(theirs) and ours.table_sizes == theirs.table_sizes
        for i in range(len(ours)):
            a, b = ours.batch(i), theirs.batch(i)
            for k in ("dense", "indices", "offsets", "labels"):
                assert torch.equal(getattr(a, k), getattr(b, k)), (split, i, k)


def test_torchrec_raw_hashes_are_taken_modulo(tmp_path):
    from dlrm_ops.data import TorchrecNpyDataset

    rng = np.random.default_rng(0)
    for d in range(3):  # torchrec's own output: log(x + 3) and raw int32 hashes
        n = 10 + d
        np.save(
            tmp_path / f"day_{d}_dense.npy",
            np.log(rng.integers(0, 9, (n, 13)) + 3.0).astype(np.float32),
        )
        np.save(
            tmp_path / f"day_{d}_sparse.npy",
            rng.integers(-(2**31), 2**31, (n, 26)).astype(np.int32),
        )
        np.save(tmp_path / f"day_{d}_labels.npy", rng.integers(0, 2, (n, 1)).astype(np.int32))
    with pytest.raises(ValueError, match="give max_ind_range"):
        TorchrecNpyDataset(tmp_path, "train", 4)
    data = TorchrecNpyDataset(tmp_path, "train", 4, max_ind_range=1000, drop_last=False)
    raw = np.concatenate([np.load(tmp_path / f"day_{d}_sparse.npy") for d in range(2)])
    got = torch.cat([data.batch(i).indices.view(26, -1).T for i in range(len(data))])
    assert torch.equal(got, torch.from_numpy(np.remainder(raw.astype(np.int64), 1000)))
    assert data.table_sizes == [1000] * 26 and len(data) == 6  # 21 rows, batches of 4


@pytest.mark.parametrize("randomize", ["none", "total"])
def test_batches_are_cut_natively_as_numpy_reads_them(tmp_path, randomize):
    raw = tmp_path / "train.txt"
    raw.write_text("\n".join(lines(900)) + "\n")
    preprocess_criteo([raw], tmp_path / "p", "kaggle", 1000, progress=False)
    from dlrm_ops.distributed.plan import even_bounds

    opener = CriteoDataset.__new__(CriteoDataset)
    opener.dir = tmp_path / "p"
    maps = [opener._open(d) for d in range(7)]
    for split in ("train", "test", "val"):
        data = CriteoDataset(tmp_path / "p", split, 50, drop_last=False, randomize=randomize,
                             sub_sample_rate=0.2, seed=1)  # fmt: skip
        # The rows of the split in numpy: days 0-5, or the halves of day 6.
        parts = maps[:6] if split == "train" else [maps[6]]
        dense, sparse, labels = (np.concatenate([p[j] for p in parts]) for j in range(3))
        if split != "train":
            half = len(maps[6][2]) // 2
            cut = slice(0, half) if split == "test" else slice(half, None)
            dense, sparse, labels = dense[cut], sparse[cut], labels[cut]
        for i in range(len(data)):
            rows = data._rows(i)
            b = data.batch(i)
            assert torch.equal(b.dense, torch.from_numpy(dense[rows]))
            assert torch.equal(b.indices, torch.from_numpy(sparse[rows].T.reshape(-1)))
            assert torch.equal(b.labels, torch.from_numpy(labels[rows]))
            assert torch.equal(b.offsets, torch.arange(26 * len(rows) + 1))
            part = data.batch_part(i, 1, 3, [4, 0, 25])
            cuts = even_bounds(len(rows), 3)
            mine = rows[cuts[1] : cuts[2]]
            assert torch.equal(part.dense, torch.from_numpy(dense[mine]))
            assert torch.equal(part.labels, torch.from_numpy(labels[mine]))
            assert torch.equal(
                part.indices, torch.from_numpy(sparse[rows][:, [4, 0, 25]].T.reshape(-1))
            )
    from dlrm_ops import _C

    with pytest.raises(IndexError, match="row 1000000 is outside"):
        data._gather(np.array([0, 1_000_000]), range(26))
    with pytest.raises(ValueError, match="columns must be in"):
        data._gather(np.array([0]), [26])
    train = CriteoDataset(tmp_path / "p", "train", 50)
    lows, bad = np.zeros(6, np.int64), train.starts.copy()
    bad[1] = bad[2] + 1
    with pytest.raises(ValueError, match="starts must not decrease"):
        _C.gather_rows(train.arrays, bad, lows, np.array([0]), [0], 0, None, None, None)
    with pytest.raises(ValueError, match="starts must begin at 0"):
        _C.gather_rows(train.arrays, train.starts + 1, lows, np.array([0]), [0], 0, None, None,
                       None)  # fmt: skip
    with pytest.raises(ValueError, match="dense must be a writeable"):
        _C.gather_rows(data.arrays, data.starts, np.zeros(1, np.int64), np.array([0]), [0], 0,
                       np.zeros(13, np.float64), None, None)  # fmt: skip


def test_window_shuffle_keeps_rows_in_their_window(tmp_path):
    raw = tmp_path / "train.txt"
    raw.write_text("\n".join(lines(800)) + "\n")
    preprocess_criteo([raw], tmp_path / "p", "kaggle", 1000, progress=False)
    plain = CriteoDataset(tmp_path / "p", "train", 10_000, randomize="none", drop_last=False)
    mixed = CriteoDataset(
        tmp_path / "p", "train", 10_000, randomize="window", window=100, drop_last=False, seed=3
    )
    order = mixed.order
    assert sorted(order.tolist()) == list(range(plain.rows)) and order.tolist() != sorted(order)
    assert all(order[w : w + 100].min() >= w and order[w : w + 100].max() < w + 100
               for w in range(0, len(order), 100))  # fmt: skip
    a, b = plain.batch(0), mixed.batch(0)
    assert torch.equal(a.labels[torch.from_numpy(order)], b.labels)


def test_multi_hot_bags(tmp_path):
    from dlrm_ops.data import MLPERF_SIZES, MultiHot, RandomData

    base = RandomData(
        [50, 7, 1000], 4, 16, 3, num_indices_per_lookup=1, fixed_indices_per_lookup=True
    )
    data = MultiHot(base, [3, 1, 5], [50, 7, 1000], seed=2)
    b, one = data.batch(1), base.batch(1)
    lengths = (b.offsets[1:] - b.offsets[:-1]).view(3, 16)
    assert lengths.tolist() == [[3] * 16, [1] * 16, [5] * 16]
    bags = b.indices.split((b.offsets[1:] - b.offsets[:-1]).tolist())
    for t, n in enumerate([50, 7, 1000]):
        for i in range(16):
            bag = bags[t * 16 + i]
            assert int(bag[0]) == int(one.indices[t * 16 + i]) and bool((bag < n).all())
    again = MultiHot(base, [3, 1, 5], [50, 7, 1000], seed=2).batch(1)
    assert torch.equal(again.indices, b.indices)  # a fixed function of the index
    with pytest.raises(ValueError, match="sizes must give each of the 3 tables"):
        MultiHot(base, [3, 1], [50, 7, 1000])
    assert len(MLPERF_SIZES) == 26 and sum(MLPERF_SIZES) == 214


def terabyte_days(folder: Path, make, n: int) -> list:
    """Terabyte's 24 day files of make(n, seed=day) lines, the 6th line of
    day 9 malformed (a run stops there)."""
    files = []
    for d in range(24):
        f = folder / f"day_{d}"
        rows = make(n, seed=d)
        if d == 9:
            rows[5] = odd(rows[5], 0, "x")
        f.write_text("\n".join(rows) + "\n")
        files.append(f)
    return files


def test_terabyte_preprocessing_resumes_after_a_failure(tmp_path):
    files = terabyte_days(tmp_path, lines, 40)
    out = tmp_path / "p"
    with pytest.raises(MalformedLineError, match="day_9:6"):
        preprocess_criteo(files, out, "terabyte", 100, threads=2)
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("day_[0-8].*.bin")}
    assert len(done) == 27 and not list(out.glob("day_9.*.bin"))
    files[9].write_text("\n".join(lines(40, seed=9)) + "\n")  # mended
    meta = preprocess_criteo(files, out, "terabyte", 100, threads=2)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("day_[0-8].*.bin")} == done
    clean = preprocess_criteo(files, tmp_path / "clean", "terabyte", 100, threads=2)
    assert outputs(out) == outputs(tmp_path / "clean") and meta["days"] == clean["days"]


def test_terabyte_vocabularies_resume_after_a_failure(tmp_path):
    files = terabyte_days(tmp_path, repeating_lines, 30)
    out = tmp_path / "p"
    with pytest.raises(MalformedLineError, match="day_9:6"):
        preprocess_criteo(files, out, "terabyte", threads=2)
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("day_[0-8].*.bin")}
    assert len(done) == 27
    files[9].write_text("\n".join(repeating_lines(30, seed=9)) + "\n")
    meta = preprocess_criteo(files, out, "terabyte", threads=2)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("day_[0-8].*.bin")} == done
    clean = preprocess_criteo(files, tmp_path / "clean", "terabyte", native=False)
    assert outputs(out) == outputs(tmp_path / "clean")
    assert meta["table_sizes"] == clean["table_sizes"] and meta["days"] == clean["days"]


@pytest.mark.parametrize("hashing", [100, None])
def test_kaggle_preprocessing_resumes_after_a_failure(tmp_path, monkeypatch, hashing):
    monkeypatch.setattr(criteo, "BLOCK_BYTES", 997)  # days end in earlier blocks
    rows = lines(700) if hashing else repeating_lines(700)
    bad = list(rows)
    bad[450] = odd(bad[450], 0, "x")  # in day 4 (lines 400-499)
    raw = tmp_path / "train.txt"
    raw.write_text("\n".join(bad) + "\n")
    out = tmp_path / "p"
    with pytest.raises(MalformedLineError, match="train.txt:451"):
        preprocess_criteo([raw], out, "kaggle", hashing, threads=2)
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("day_[0-3].*.bin")}
    assert len(done) == 12 and not list(out.glob("day_4.*.bin"))
    # Mended in place, same size and modification time: the days are still valid.
    stat = raw.stat()
    raw.write_text("\n".join(rows) + "\n")
    os.utime(raw, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    meta = preprocess_criteo([raw], out, "kaggle", hashing, threads=2)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("day_[0-3].*.bin")} == done
    clean = preprocess_criteo([raw], tmp_path / "clean", "kaggle", hashing, native=False)
    assert outputs(out) == outputs(tmp_path / "clean") and meta["days"] == clean["days"]
