"""The DLRM model against the pure-PyTorch reference, data and the command."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dlrm_ops import reference
from dlrm_ops.data import (
    CriteoDataset,
    MalformedLineError,
    RandomData,
    SyntheticData,
    preprocess_criteo,
)
from dlrm_ops.models import DLRM

TABLES = [30, 7, 50, 12]
CRITEO_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo_kaggle_sample.tsv"


def model_pair(optimizer="sgd", interaction="dot", self_interaction=False, lr=0.1):
    torch.manual_seed(0)
    ours = DLRM(
        TABLES,
        8,
        [13, 16, 8],
        [16, 1],
        interaction=interaction,
        self_interaction=self_interaction,
        embedding_optimizer=optimizer,
        embedding_lr=lr,
    )
    ref = reference.ReferenceDLRM(
        TABLES, 8, [13, 16, 8], [16, 1], interaction, self_interaction
    ).load_from(ours)
    return ours, ref


@pytest.mark.parametrize(
    "interaction, self_interaction", [("dot", False), ("dot", True), ("cat", False)]
)
def test_forward_equals_reference(interaction, self_interaction):
    ours, ref = model_pair(interaction=interaction, self_interaction=self_interaction)
    b = RandomData(TABLES, 13, 9, 1, num_indices_per_lookup=4).batch(0)
    torch.testing.assert_close(
        ours(b.dense, b.indices, b.offsets), ref(b.dense, b.indices, b.offsets)
    )


@pytest.mark.parametrize(
    "optimizer, torch_opt", [("sgd", torch.optim.SGD), ("adagrad", torch.optim.Adagrad)]
)
def test_training_steps_equal_reference(optimizer, torch_opt):
    ours, ref = model_pair(optimizer)
    data = RandomData(TABLES, 13, 16, 5, num_indices_per_lookup=3, seed=1)
    opt_ours = torch_opt(ours.dense_parameters(), lr=0.1)
    opt_ref = torch_opt(list(ref.dense_parameters()), lr=0.1)
    opt_emb = torch_opt(list(ref.embedding_parameters()), lr=0.1)
    for b in data:
        losses = []
        for model, opts in ((ours, [opt_ours]), (ref, [opt_ref, opt_emb])):
            for o in opts:
                o.zero_grad()
            loss = F.binary_cross_entropy_with_logits(
                model(b.dense, b.indices, b.offsets), b.labels
            )
            loss.backward()
            for o in opts:
                o.step()
            losses.append(float(loss.detach()))
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for t, m in enumerate(ref.tables):
        torch.testing.assert_close(ours.embeddings.weight_of(t), m.weight, atol=1e-5, rtol=1e-5)
    for p, q in zip(ours.dense_parameters(), ref.dense_parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)


def test_training_on_synthetic_data_learns():
    data = SyntheticData([50, 200, 1000, 30], 13, batch_size=256, num_batches=600, seed=3)
    test = SyntheticData([50, 200, 1000, 30], 13, batch_size=1024, seed=3).test_batches(4)
    ceiling = SyntheticData([50, 200, 1000, 30], 13, batch_size=1024, seed=3).ceiling_auc(4)
    torch.manual_seed(0)
    model = DLRM(
        [50, 200, 1000, 30],
        8,
        [13, 32, 8],
        [32, 1],
        embedding_optimizer="adagrad",
        embedding_lr=0.1,
    )
    opt = torch.optim.Adagrad(model.dense_parameters(), lr=0.1)
    for b in data:
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(
            model(b.dense, b.indices, b.offsets), b.labels
        ).backward()
        opt.step()
    from dlrm_ops.train import evaluate

    auc = evaluate(model, test)["auc"]
    assert auc > 0.65 and auc > 0.5 + 0.6 * (ceiling - 0.5), (auc, ceiling)


def test_synthetic_data_is_repeatable_and_zipf_like():
    a = SyntheticData([1000], 13, batch_size=4096, seed=5)
    b = SyntheticData([1000], 13, batch_size=4096, seed=5)
    x, y = a.batch(3), b.batch(3)
    assert torch.equal(x.indices, y.indices) and torch.equal(x.labels, y.labels)
    counts = np.bincount(x.indices.numpy(), minlength=1000)
    assert counts.max() > 50 * np.median(counts[counts > 0])  # a few very popular rows
    assert 0.1 < float(x.labels.mean()) < 0.6
    assert 0.5 < a.ceiling_auc(2) < 1.0


def test_hashing_trick_and_qr_embeddings():
    torch.manual_seed(0)
    m = DLRM([1000, 50], 8, [13, 8], [4, 1], max_ind_range=100)
    assert m.embeddings.num_embeddings == [100, 50]
    b = RandomData([1000, 50], 13, 6, 1, 3).batch(0)
    assert m(b.dense, b.indices, b.offsets).shape == (6,)
    for op in ("mult", "add", "concat"):
        q = DLRM([1000, 50], 8, [13, 8], [4, 1], qr_collisions=4, qr_operation=op)
        assert q.embeddings.num_embeddings == [250, 4, 50]  # table 2 is under the threshold
        out = q(b.dense, b.indices, b.offsets)
        assert out.shape == (6,)
        # the first feature's pooled vector is the combination of its two tables
        B = 6
        off = b.offsets
        idx0 = b.indices[: int(off[B])]
        e = q.embeddings
        bag = lambda w, i: torch.stack(
            [w[i[int(off[k]) : int(off[k + 1])]].sum(0) for k in range(B)]
        )  # noqa: E731
        qv, rv = bag(e.weight_of(0), idx0 // 4), bag(e.weight_of(1), idx0 % 4)
        expect = qv * rv if op == "mult" else qv + rv if op == "add" else torch.cat([qv, rv], 1)
        torch.testing.assert_close(q.sparse(b.indices, b.offsets)[:, :8], expect)


def test_bad_architecture():
    with pytest.raises(ValueError, match="bottom_mlp must end in embedding_dim = 8"):
        DLRM([5], 8, [13, 4], [4, 1])
    with pytest.raises(ValueError, match="top_mlp must end in 1"):
        DLRM([5], 8, [13, 8], [4, 2])


# ------------------------------------------------------------------- Criteo


def write_tsv(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def row(label="0", ints=None, cats=None):
    ints = ints if ints is not None else ["1"] * 13
    cats = cats if cats is not None else ["68fd1e64"] * 26
    return "\t".join([label] + ints + cats)


def test_parser_fields(tmp_path):
    lines = [
        row("1", ["", "-5", "3"] + ["0"] * 10, [""] + ["ffffffffffffffffffff"] + ["0000000a"] * 24),
        row("0"),
    ] * 7
    write_tsv(tmp_path / "train.txt", lines)
    meta = preprocess_criteo([tmp_path / "train.txt"], tmp_path / "p", "kaggle", max_ind_range=1000)
    assert sum(meta["days"].values()) == 14 and meta["table_sizes"] == [1000] * 26
    ds = CriteoDataset(tmp_path / "p", "train", batch_size=2)
    b = next(iter(ds))
    assert b.labels.tolist() == [1.0, 0.0]
    assert b.dense[0, :3].tolist() == [
        0.0,
        0.0,
        pytest.approx(np.log(4.0)),
    ]  # empty, negative, log(x+1)
    sparse = b.indices.view(26, 2)  # table-major
    assert sparse[0, 0] == 0  # empty category
    assert sparse[1, 0] == int("ffffffffffffffffffff", 16) % 1000  # huge hex value
    assert sparse[2, 0] == 10


def test_parser_dictionaries(tmp_path):
    write_tsv(tmp_path / "train.txt", [row(cats=[f"{i % 3:08x}"] * 26) for i in range(14)])
    meta = preprocess_criteo([tmp_path / "train.txt"], tmp_path / "p", "kaggle")
    assert meta["table_sizes"] == [4] * 26  # 3 values + the empty one


@pytest.mark.parametrize(
    "bad, msg",
    [
        (row()[:-9], "expected 40 tab-separated fields, got 39"),
        (row(ints=["x"] + ["1"] * 12), "I1 must be an integer, got 'x'"),
        (row(label="2"), "label must be 0 or 1, got '2'"),
        (row(cats=["zz"] + ["1"] * 25), "C1 must be hexadecimal, got 'zz'"),
    ],
)
def test_malformed_lines(tmp_path, bad, msg):
    write_tsv(tmp_path / "train.txt", [row()] * 3 + [bad] + [row()] * 3)
    with pytest.raises(MalformedLineError, match=rf"train.txt:4: {msg}"):
        preprocess_criteo([tmp_path / "train.txt"], tmp_path / "p", "kaggle", max_ind_range=10)
    meta = preprocess_criteo(
        [tmp_path / "train.txt"], tmp_path / "q", "kaggle", max_ind_range=10, skip_malformed=True
    )
    assert meta["skipped"] == 1 and sum(meta["days"].values()) == 6


def test_terabyte_days_resume(tmp_path):
    files = []
    for d in range(24):
        write_tsv(tmp_path / f"day_{d}", [row(label=str(d % 2))] * 4)
        files.append(tmp_path / f"day_{d}")
    preprocess_criteo(files[:10], tmp_path / "p", "terabyte", max_ind_range=50)
    made = (tmp_path / "p" / "day_3.labels.bin").stat().st_mtime_ns
    meta = preprocess_criteo(files, tmp_path / "p", "terabyte", max_ind_range=50)
    assert len(meta["days"]) == 24
    assert (tmp_path / "p" / "day_3.labels.bin").stat().st_mtime_ns == made  # not made again
    assert len(CriteoDataset(tmp_path / "p", "test", batch_size=2)) == 1
    write_tsv(tmp_path / "day_3", [row(label="1")] * 6)  # a changed day is made again
    meta = preprocess_criteo(files, tmp_path / "p", "terabyte", max_ind_range=50)
    assert meta["days"]["3"] == 6 and meta["days"]["4"] == 4


@pytest.mark.skipif(not CRITEO_SAMPLE.exists(), reason="shared Criteo sample not present")
def test_criteo_sample(tmp_path):
    meta = preprocess_criteo([CRITEO_SAMPLE], tmp_path / "p", "kaggle", max_ind_range=10_000)
    assert sum(meta["days"].values()) == 200 and meta["skipped"] == 0
    ds = CriteoDataset(tmp_path / "p", "train", batch_size=16)
    labels = torch.cat([b.labels for b in ds])
    assert len(labels) == 16 * len(ds) and 0 < labels.mean() < 0.5


# ------------------------------------------------------------------ command


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "dlrm_ops", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_train_command_checkpoint_and_evaluate(tmp_path):
    ckpt, png = tmp_path / "m.pt", tmp_path / "plot.png"
    common = [
        "--arch-embedding-size",
        "20-30-40",
        "--arch-mlp-bot",
        "13-8-4",
        "--arch-sparse-feature-size",
        "4",
        "--arch-mlp-top",
        "8-1",
        "--mini-batch-size",
        "32",
        "--num-test-batches",
        "2",
        "--test-mini-batch-size",
        "64",
        "--no-progress",
        "--seed",
        "7",
    ]
    res = run_cli(
        "train",
        *common,
        "--num-batches",
        "40",
        "--print-freq",
        "20",
        "--test-freq",
        "20",
        "--save-model",
        str(ckpt),
        "--plot",
        str(png),
        "--quantize-emb-with-bit",
        "4",
        "--compare-reference",
        "5",
    )
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "batch 20: train loss" in out and "planted-model ceiling AUC" in out
    assert "with int4 tables" in out and "summary: 40 batches" in out
    assert "separate speed race" in out and "x)" in out
    assert ckpt.exists() and png.stat().st_size > 1000
    again = run_cli("train", *common, "--num-batches", "40", "--compare-reference", "0")
    auc = lambda s: s.split("summary:")[1].split("AUC ")[1].split(",")[0]  # noqa: E731
    assert auc(again.stdout) == auc(out)  # --seed makes runs repeatable
    # The non-default architecture and the test data come from the checkpoint alone.
    ev = run_cli("evaluate", "--load-model", str(ckpt), "--no-progress")
    assert ev.returncode == 0, ev.stderr
    assert f"AUC {auc(out)}" in ev.stdout


@pytest.mark.skipif(not CRITEO_SAMPLE.exists(), reason="shared Criteo sample not present")
def test_train_command_on_criteo_sample(tmp_path):
    res = run_cli(
        "train",
        "--data-generation",
        "dataset",
        "--raw-data-file",
        str(CRITEO_SAMPLE),
        "--processed-data-file",
        str(tmp_path / "p"),
        "--max-ind-range",
        "1000",
        "--mini-batch-size",
        "16",
        "--test-mini-batch-size",
        "8",
        "--num-batches",
        "0",
        "--num-test-batches",
        "2",
        "--no-progress",
        "--compare-reference",
        "0",
    )
    assert res.returncode == 0, res.stderr
    assert "summary: 11 batches, 171 samples" in res.stdout  # the short last batch too
