"""Hybrid parallelism (dlrm_ops.distributed): the sharding plan, what each
rank reads, sharded checkpoints, and, under torchrun with gloo on this
machine, 2 and 4 ranks training the same model as one process."""

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dlrm_ops import checkpoint, train
from dlrm_ops.data import CriteoDataset, RandomData, preprocess_criteo
from dlrm_ops.distributed import (
    ShardingPlan,
    all_to_all_bytes,
    bytes_per_row,
    even_bounds,
    plan_sharding,
    slice_batch,
)
from dlrm_ops.distributed import checkpoint as sharded
from dlrm_ops.models import DLRM
from dlrm_ops.nn import EmbeddingBagCollection
from dlrm_ops.nn.embedding import INIT_CHUNK_ROWS, seeded_init_

HERE = Path(__file__).resolve().parent
# A small model on dlrm's random data: multi-hot bags, batches of 61 (uneven
# over 2 and 4 ranks) and a short last batch of 45 (--data-size 350).
MODEL = [
    "--data-generation", "random", "--arch-embedding-size", "50-200-1000-30",
    "--arch-sparse-feature-size", "8", "--arch-mlp-bot", "13-16-8", "--arch-mlp-top", "16-1",
    "--mini-batch-size", "61", "--num-batches", "0", "--data-size", "350",
    "--num-indices-per-lookup", "5",
    "--print-freq", "1", "--print-precision", "7", "--no-progress", "--compare-reference", "0",
    "--num-test-batches", "3", "--test-mini-batch-size", "100", "--learning-rate", "0.1",
]  # fmt: skip


def torchrun(n, *args, timeout=240, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, **kw
    )


def one_process(*args, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "dlrm_ops", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def losses(out: str):
    return [float(x) for x in re.findall(r"train loss ([0-9.]+)", out)]


def final_metrics(out: str):
    """The numbers of the final ``test (...)`` line."""
    line = re.search(r"test \((\d+) samples\): (.*)", out)
    return [float(line.group(1))] + [float(x) for x in re.findall(r" ([0-9.]+)", line.group(2))]


def weights(path) -> dict:
    """A checkpoint's model as one process's state dict."""
    if not os.path.isdir(path):
        return checkpoint.load(path)["model"]
    meta = sharded.load_meta(path)
    args = argparse.Namespace(**{**train.train_defaults(), **meta["args"]})
    model = train.build_model(args, meta["run"]["tables"])
    t = model.embeddings
    return sharded.one_process_state(
        path, model.state_dict(), t.num_embeddings, t.embedding_dims, t.optimizer
    )


def assert_same_model(a: dict, b: dict, atol=2e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), rtol=1e-4, atol=atol, msg=k)


# -- the plan ---------------------------------------------------------------------------


def test_even_bounds():
    assert even_bounds(10, 4) == [0, 3, 6, 8, 10]
    assert even_bounds(2, 3) == [0, 1, 2, 2]
    assert even_bounds(0, 2) == [0, 0, 0]


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_plan_covers_every_row_once(world):
    rng = np.random.default_rng(world)
    rows = [int(x) for x in rng.integers(1, 5000, 20)]
    dims = [int(x) for x in rng.choice([4, 16, 64], 20)]
    for row_wise in ("auto", "none", "all", [0, 5]):
        plan = plan_sharding(rows, dims, world, row_wise, optimizer="adagrad")
        for t, n in enumerate(rows):
            pieces = sorted((s.lo, s.hi) for s in plan.shards if s.table == t)
            assert pieces[0][0] == 0 and pieces[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
            assert len({s.rank for s in plan.shards if s.table == t}) == len(pieces)
        assert ShardingPlan.from_dict(plan.to_dict()) == plan


def test_plan_greedy_largest_first_balances():
    rows = [1000, 900, 500, 400, 300, 100]
    plan = plan_sharding(rows, [8] * 6, 2, "none")
    owner = {s.table: s.rank for s in plan.shards}
    # 1000 -> rank 0, 900 -> 1, 500 -> 1, 400 -> 0, 300 -> 0 or 1 by cost ...
    assert owner[0] != owner[1]
    load = [sum(rows[t] for t in owner if owner[t] == r) for r in (0, 1)]
    assert abs(load[0] - load[1]) <= 300


def test_plan_auto_cuts_a_table_above_an_even_share():
    plan = plan_sharding([10_000, 100, 200, 300], [16] * 4, 4)
    assert plan.row_wise(0) and not any(plan.row_wise(t) for t in (1, 2, 3))
    assert [s.hi - s.lo for s in plan.shards if s.table == 0] == [2500] * 4
    assert "row-wise: 0" in plan.describe()
    assert not plan_sharding([10_000, 100], [16, 16], 1).row_wise(0)  # one rank: never


def test_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="row_wise names tables \\[7\\]"):
        plan_sharding([10, 20], [4, 4], 2, [7])
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        plan_sharding([10], [4], 0)


def test_bytes_per_row_counts_optimizer_state():
    assert bytes_per_row([16], None) == [64]
    assert bytes_per_row([16], "adagrad") == [128]
    assert bytes_per_row([16], "rowwise_adagrad") == [68]
    assert bytes_per_row([16], "sgd", elem_bytes=2) == [32]


# -- the same model on any number of ranks ---------------------------------------------


def test_seeded_rows_are_the_same_whole_or_sharded():
    n, d = INIT_CHUNK_ROWS + 100, 3
    whole = torch.empty(n, d)
    seeded_init_(whole, 5, 2, 0, n)
    assert whole.abs().max() <= (1 / n) ** 0.5
    for lo, hi in ((0, 7), (INIT_CHUNK_ROWS - 3, INIT_CHUNK_ROWS + 9), (n - 1, n)):
        part = torch.empty(hi - lo, d)
        seeded_init_(part, 5, 2, lo, n)
        assert torch.equal(part, whole[lo:hi])
    other = torch.empty(n, d)
    seeded_init_(other, 5, 3, 0, n)  # another table id: other numbers
    assert not torch.equal(other, whole)


def test_init_seed_keeps_dense_layers_apart_from_table_sizes():
    """The MLPs draw the same numbers however big the tables are."""
    torch.manual_seed(0)
    a = DLRM([10, 20], 4, [3, 4], [4, 1], init_seed=1)
    torch.manual_seed(0)
    b = DLRM([1000, 5, 7000], 4, [3, 4], [4, 1], init_seed=1)
    assert torch.equal(a.bottom[0].weight, b.bottom[0].weight)
    table = torch.empty(20, 4)
    seeded_init_(table, 1, 1, 0, 20)  # table id 1 of seed 1
    assert torch.equal(a.embeddings.weight_of(1), table)


def test_slice_batch_keeps_rows_and_tables():
    b = RandomData([10, 20, 30], 4, 9, 1, num_indices_per_lookup=3).batch(0)
    s = slice_batch(b, [2, 0], 3, 6)
    assert s.global_size == 9 and s.size == 9 and torch.equal(s.dense, b.dense[3:6])
    assert torch.equal(s.labels, b.labels[3:6])
    for k, t in enumerate([2, 0]):
        for i in range(9):
            got = s.indices[s.offsets[k * 9 + i] : s.offsets[k * 9 + i + 1]]
            want = b.indices[b.offsets[t * 9 + i] : b.offsets[t * 9 + i + 1]]
            assert torch.equal(got, want)


def _criteo_lines(path: Path, n: int):
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(n):
            dense = "\t".join(str(int(x)) for x in rng.integers(0, 50, 13))
            cats = "\t".join(f"{int(x):08x}" for x in rng.integers(0, 2**32, 26))
            f.write(f"{int(rng.integers(0, 2))}\t{dense}\t{cats}\n")


def test_criteo_batch_part_reads_a_slice_and_some_columns(tmp_path):
    raw = tmp_path / "train.txt"
    _criteo_lines(raw, 700)
    preprocess_criteo([str(raw)], str(tmp_path / "p"), "kaggle", 1000, progress=False)
    data = CriteoDataset(str(tmp_path / "p"), "train", 64, randomize="total", drop_last=False)
    for i in (0, len(data) - 1):
        whole = data.batch(i)
        B = whole.dense.shape[0]
        cuts = even_bounds(B, 3)
        for rank in range(3):
            part = data.batch_part(i, rank, 3, [25, 3])
            want = slice_batch(whole, [25, 3], cuts[rank], cuts[rank + 1])
            for k in ("dense", "indices", "offsets", "labels"):
                assert torch.equal(getattr(part, k), getattr(want, k)), k
            assert part.global_size == B


def test_table_views_follow_the_collection_layout():
    ebc = EmbeddingBagCollection([3, 5], [2, 4], optimizer="rowwise_adagrad")
    ebc.momentum1.copy_(torch.arange(8.0))
    views = sharded.table_views(
        {"weight": ebc.weight.data, "momentum1": ebc.momentum1},
        [3, 5],
        [2, 4],
        "rowwise_adagrad",
    )
    assert torch.equal(views[1]["weight"], ebc.weight_of(1))
    assert views[1]["momentum1"].tolist() == [3.0, 4.0, 5.0, 6.0, 7.0]
    assert "momentum2" not in views[0]


def test_fill_refuses_rows_the_checkpoint_lacks():
    dst = [(0, 0, 4, {"weight": torch.zeros(4, 2)})]
    pieces = iter([(0, 0, 3, {"weight": torch.ones(3, 2)})])
    with pytest.raises(checkpoint.CheckpointError, match="rows 0..4 of table 0"):
        sharded.fill(dst, pieces, "x")


# -- under torchrun ------------------------------------------------------------------


def test_sharded_tables_match_one_collection_on_three_ranks(tmp_path):
    """Forward and fused-SGD update of table-wise, row-wise and mixed plans,
    sum and mean pooling, int32 and int64 indices, empty bags, a batch
    smaller than the ranks (tests/distributed_child.py)."""
    r = torchrun(3, HERE / "distributed_child.py", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok-0", "ok-1", "ok-2"]


_REFERENCES = {}


def reference(tmp_path_factory, optimizer: str, nepochs: int = 1):
    """One process's run: its loss per batch and its final model."""
    key = (optimizer, nepochs)
    if key not in _REFERENCES:
        path = tmp_path_factory.mktemp("ref") / "ref.pt"
        r = one_process(
            "train", *MODEL, "--optimizer", optimizer, "--nepochs", nepochs, "--save-model", path
        )
        assert r.returncode == 0, r.stderr
        _REFERENCES[key] = (losses(r.stdout), weights(path), r.stdout)
    return _REFERENCES[key]


@pytest.mark.parametrize(
    "world,optimizer,row_wise",
    [
        (2, "sgd", "none"),
        (2, "adagrad", "all"),
        (2, "rwsadagrad", "1,2"),
        (4, "sgd", "all"),
        (4, "adagrad", "none"),
        (4, "rwsadagrad", "auto"),
    ],
)
def test_ranks_train_the_one_process_model(tmp_path, tmp_path_factory, world, optimizer, row_wise):
    want_losses, want_model, want_out = reference(tmp_path_factory, optimizer)
    path = tmp_path / "run.pt"
    r = torchrun(
        world, "-m", "dlrm_ops", "train", *MODEL, "--optimizer", optimizer,
        "--dist-backend", "gloo", "--row-wise-tables", row_wise, "--save-model", path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    got = losses(r.stdout)
    assert len(got) == len(want_losses) == 6
    np.testing.assert_allclose(got, want_losses, rtol=1e-5)
    assert_same_model(want_model, weights(path))
    assert sorted(p.name for p in path.iterdir()) == ["meta.pt"] + [
        f"tables-{k}.pt" for k in range(world)
    ]
    # Evaluation gathers every rank's scores: the one-process metrics.
    np.testing.assert_allclose(final_metrics(r.stdout), final_metrics(want_out), rtol=1e-5)
    assert f"sharding plan: 4 tables on {world} ranks" in r.stdout
    # The bytes counted as sent match the plan's arithmetic (6 batches, the last of 45).
    kib = float(re.search(r"all-to-alls ([0-9.,]+) KiB \(forward\)", r.stdout).group(1))
    plan = ShardingPlan.from_dict(sharded.load_meta(path)["run"]["plan"])
    want = (5 * all_to_all_bytes(plan, 61) + all_to_all_bytes(plan, 45)) / 6 / 1024
    assert kib == pytest.approx(want, abs=0.06)
    assert f"hybrid parallel on {world} ranks (gloo), per training step" in r.stdout


def test_checkpoint_of_four_ranks_continues_on_two_one_and_four(tmp_path, tmp_path_factory):
    want_losses, want_model, _ = reference(tmp_path_factory, "rwsadagrad", nepochs=2)
    common = [*MODEL, "--optimizer", "rwsadagrad", "--dist-backend", "gloo"]
    first = tmp_path / "four.pt"
    r = torchrun(
        4, "-m", "dlrm_ops", "train", *common, "--row-wise-tables", "2", "--save-model", first
    )
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_allclose(losses(r.stdout), want_losses[:6], rtol=1e-5)
    runs = {
        "two": torchrun(2, "-m", "dlrm_ops", "train", "--dist-backend", "gloo", "--resume", first,
                        "--nepochs", "2", "--save-model", tmp_path / "two.pt"),
        "one": one_process("train", "--resume", first, "--nepochs", "2",
                           "--save-model", tmp_path / "one.pt"),
        "four": torchrun(4, "-m", "dlrm_ops", "train", "--dist-backend", "gloo", "--resume", first,
                         "--nepochs", "2", "--save-model", tmp_path / "again.pt"),
    }  # fmt: skip
    for name, r in runs.items():
        assert r.returncode == 0, (name, r.stderr[-3000:])
        assert f"resuming {first} (trained 6 batches)" in r.stdout
        np.testing.assert_allclose(losses(r.stdout), want_losses[6:], rtol=1e-5, err_msg=name)
    for name in ("two", "one", "again"):
        assert_same_model(want_model, weights(tmp_path / f"{name}.pt"))
    # One process's checkpoint file loads into two ranks as well.
    r = torchrun(2, "-m", "dlrm_ops", "evaluate", "--dist-backend", "gloo",
                 "--load-model", tmp_path / "one.pt")  # fmt: skip
    e = one_process("evaluate", "--load-model", tmp_path / "one.pt")
    assert r.returncode == 0 and e.returncode == 0, (r.stderr[-2000:], e.stderr)
    np.testing.assert_allclose(final_metrics(r.stdout), final_metrics(e.stdout), rtol=1e-5)


def test_mixed_dimensions_match_one_process(tmp_path):
    md = [*MODEL, "--md-flag", "--md-threshold", "100", "--num-batches", "3"]
    ref = one_process("train", *md)
    r = torchrun(2, "-m", "dlrm_ops", "train", *md, "--dist-backend", "gloo")
    assert ref.returncode == 0 and r.returncode == 0, (ref.stderr, r.stderr[-3000:])
    np.testing.assert_allclose(losses(r.stdout), losses(ref.stdout), rtol=1e-5)
    np.testing.assert_allclose(final_metrics(r.stdout), final_metrics(ref.stdout), rtol=1e-5)


@pytest.mark.parametrize("payload", ["bf16", "fp16"])
def test_compressed_all_to_all_trains_close_to_fp32(tmp_path_factory, payload):
    want, _, _ = reference(tmp_path_factory, "sgd")
    r = torchrun(2, "-m", "dlrm_ops", "train", *MODEL, "--dist-backend", "gloo",
                 "--a2a-precision", payload)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    got = losses(r.stdout)
    np.testing.assert_allclose(got, want, rtol=2e-2)
    assert got != want  # the payload really was rounded


def test_interrupted_ranks_stop_at_one_batch_and_save(tmp_path):
    path = tmp_path / "stop.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "dlrm_ops", "train", *MODEL, "--data-size", "10000000", "--print-freq", "1000",
           "--dist-backend", "gloo", "--save-model", str(path)]  # fmt: skip
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(15)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.startswith("SIGINT: stopped after batch")]
    assert len(lines) == 1, err[-3000:]  # rank 0 speaks for both
    step = int(re.search(r"batch (\d+)", lines[0]).group(1))
    assert checkpoint.load(str(path / "meta.pt"))["step"] == step
    for k in range(2):
        assert checkpoint.load(str(path / f"tables-{k}.pt"))["step"] == step


def test_a_killed_rank_ends_the_job_with_an_error(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "dlrm_ops", "train", *MODEL, "--data-size", "10000000", "--print-freq", "1000",
           "--dist-backend", "gloo", "--dist-timeout", "20"]  # fmt: skip
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        workers = []
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
            workers = _children(p.pid)
        assert len(workers) == 2, "torchrun did not start two workers"
        time.sleep(6)  # both in the training loop
        os.kill(max(workers), signal.SIGKILL)
        t0 = time.monotonic()
        p.wait(timeout=60)
        assert p.returncode != 0
        assert time.monotonic() - t0 < 25
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate()


def _children(pid: int):
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def test_row_wise_tables_beyond_the_data_is_a_flag_error():
    r = torchrun(2, "-m", "dlrm_ops", "train", *MODEL, "--dist-backend", "gloo",
                 "--row-wise-tables", "1,9")  # fmt: skip
    assert r.returncode != 0
    assert "--row-wise-tables: row_wise names tables [9]; there are 4 (0..3)" in r.stderr


def test_dist_flags_are_checked(monkeypatch, capsys):
    from dlrm_ops.__main__ import main

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["train", "--dist-backend", "gloo"]) == 2
    assert "start the processes with torchrun" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    for argv, message in (
        (["--dist-backend", "nccl"], "--dist-backend nccl: needs --device cuda"),
        (["--dist-backend", "gloo", "--qr-flag"], "--qr-flag: quotient-remainder tables"),
        (["--dist-backend", "gloo", "--weighted-pooling", "learned"], "--weighted-pooling"),
        (["--dist-backend", "gloo", "--mlperf-grad-accum-iter", "2"], "gradient accumulation"),
    ):
        assert main(["train", *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit) as e:
        main(["train", "--row-wise-tables", "x"])
    assert e.value.code == 2
    assert "--row-wise-tables: must be auto, none, all or table ids" in capsys.readouterr().err
