"""``python -m dlrm_ops train`` / ``evaluate`` as a user meets them: bad
flags, interrupted and resumed runs, checkpoints that rebuild the model, tiny
data, facebookresearch/dlrm's command lines."""

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

from dlrm_ops import flags, metrics
from dlrm_ops.data import CriteoDataset, RandomData, preprocess_criteo
from dlrm_ops.models.dlrm import DLRM, mixed_dims
from dlrm_ops.schedule import LRPolicy

ROOT = Path(__file__).resolve().parents[1]
CRITEO_SAMPLE = ROOT.parent / "shared" / "data" / "criteo_kaggle_sample.tsv"
SMALL = [
    "--arch-embedding-size",
    "20-30-40",
    "--arch-mlp-bot",
    "13-8-4",
    "--arch-sparse-feature-size",
    "4",
    "--arch-mlp-top",
    "8-1",
    "--mini-batch-size",
    "16",
    "--num-test-batches",
    "2",
    "--test-mini-batch-size",
    "32",
    "--no-progress",
    "--compare-reference",
    "0",
]


def cli(*args, cwd=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "dlrm_ops", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


def criteo_file(path: Path, n: int, seed: int = 0) -> Path:
    """n raw Criteo-format lines with empty fields now and then."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        ints = [str(int(x)) if rng.random() > 0.1 else "" for x in rng.integers(0, 50, 13)]
        cats = [f"{int(x):08x}" if rng.random() > 0.1 else "" for x in rng.integers(0, 40, 26)]
        lines.append("\t".join([str(int(rng.random() < 0.3))] + ints + cats))
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------ flags

BAD_FLAGS = [
    (["--print-freq", "0"], "--print-freq: must be at least 1, got 0"),
    (["--num-batches", "-5"], "--num-batches: must be at least 0, got -5"),
    (["--num-test-batches", "-1"], "--num-test-batches: must be at least 0"),
    (["--arch-sparse-feature-size", "0"], "--arch-sparse-feature-size: must be at least 1"),
    (["--mini-batch-size", "0"], "--mini-batch-size: must be at least 1"),
    (["--learning-rate", "0"], "--learning-rate: must be above 0"),
    (["--learning-rate", "nan"], "--learning-rate: must be above 0"),
    (["--arch-mlp-bot", "13-x-16"], "--arch-mlp-bot: must be ints joined by '-'"),
    (["--arch-mlp-bot", "13-64-8"], "--arch-mlp-bot must end in --arch-sparse-feature-size (16)"),
    (["--arch-mlp-top", "64-2"], "--arch-mlp-top must end in 1"),
    (
        ["--data-generation", "dataset", "--raw-data-file", "{raw}", "--arch-mlp-bot", "12-16"],
        "--arch-mlp-bot must start with 13 for the Criteo logs",
    ),
    (["--data-generation", "dataset"], "needs --raw-data-file or --processed-data-file"),
    (["--data-generation", "dataset", "--raw-data-file", "nope.txt"], "--raw-data-file nope.txt"),
    (["--load-model", "nope.pt"], "--load-model nope.pt: no such file"),
    (["--resume", "nope.pt"], "--resume nope.pt: no such file"),
    (["--inference-only"], "--inference-only needs --load-model"),
    (["--save-model", "/no/such/dir/m.pt"], "--save-model /no/such/dir/m.pt: no folder"),
    (["--optimizer", "lamb"], "--optimizer: must be one of"),
    (["--round-targets=maybe"], "--round-targets: must be True or False"),
    (["--loss-function", "hinge"], "--loss-function: invalid choice"),
    (["--qr-flag", "--md-flag"], "--qr-flag and --md-flag exclude each other"),
    (
        ["--mlperf-grad-accum-iter", "4", "--optimizer", "rowwise_adagrad"],
        "--mlperf-grad-accum-iter 4: accumulated gradients go through torch.optim",
    ),
    (
        ["--data-generation", "dataset", "--mlperf-bin-loader", "--raw-data-file", "{raw}"],
        "--mlperf-bin-loader needs --processed-data-file and --raw-data-file",
    ),
    (
        ["--lr-num-warmup-steps", "10", "--lr-decay-start-step", "5", "--lr-num-decay-steps", "3"],
        "--lr-decay-start-step (5) must not come before",
    ),
    (["--num-batches", "0"], "generated data then needs --data-size"),
    (["--processed-data-file", "{raw}", "--data-generation", "dataset"], "is a file, not a folder"),
    (["--mlperf-auc-threshold", "2"], "--mlperf-auc-threshold: must be in [0, 1]"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--check", "loud"], "--check: invalid choice"),
    (["--cuda-graph"], "--cuda-graph: it needs --device cuda"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags_end_with_one_line_and_status_2(tmp_path, monkeypatch, capsys, argv, message):
    """In process, as the command runs them (the subprocess tests below cover
    the real exits)."""
    from dlrm_ops.__main__ import main

    raw = criteo_file(tmp_path / "raw.txt", 20)
    argv = [a.replace("{raw}", str(raw)) for a in argv]
    monkeypatch.chdir(tmp_path)
    try:
        status = main(["train", *argv])
    except SystemExit as e:
        status = e.code
    out = capsys.readouterr()
    assert status == 2, (out.out, out.err)
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.err
    assert not out.out and not list(tmp_path.glob("*.processed"))


def test_check_mode_flag_sets_the_mode(monkeypatch):
    from dlrm_ops import errors, train

    seen = []
    monkeypatch.setattr(train, "set_check_mode", lambda m: seen.append(m))
    monkeypatch.setattr(train, "_run", lambda *a: 0)
    from dlrm_ops.__main__ import main

    for argv, mode in (([], "deferred"), (["--check", "immediate"], "immediate")):
        assert main(["train", *SMALL, *argv]) == 0
        assert seen[-1] == mode
    assert errors.get_check_mode() == "deferred"


def test_save_onnx_is_accepted_with_a_note():
    r = cli("train", *SMALL, "--num-batches", "2", "--save-onnx")
    assert r.returncode == 0, r.stderr
    assert "no effect here: --save-onnx" in r.stderr


def test_no_cuda_is_a_flag_error_here():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = cli("train", "--use-gpu")
    assert r.returncode == 2 and r.stderr.strip() == (
        "python -m dlrm_ops train: --use-gpu: no CUDA GPU is available here"
    )


def test_help_texts_show_defaults_and_evaluate_only_its_flags():
    train = cli("train", "--help").stdout
    assert "(default: 13-512-256-64-16)" in train and "(default: 0.1)" in train
    ev = cli("evaluate", "--help").stdout
    assert "--load-model" in ev and "--test-mini-batch-size" in ev
    for training_only in ("--learning-rate", "--arch-mlp-bot", "--nepochs", "--save-every"):
        assert training_only not in ev
    r = cli("evaluate", "--load-model", "x.pt", "--learning-rate", "0.3")
    assert r.returncode == 2 and "unrecognized arguments: --learning-rate" in r.stderr


def test_every_dlrm_flag_is_accepted_and_documented():
    """Each flag of facebookresearch/dlrm's dlrm_s_pytorch.py parses here and
    has a row in docs/command-line.md."""
    p = flags.Parser()
    flags.add_train_arguments(p)
    known = {s for a in p._actions for s in a.option_strings}
    doc = (ROOT / "docs" / "command-line.md").read_text()
    for flag in flags.DLRM_FLAGS:
        assert flag in known, flag
        assert f"`{flag}`" in doc, flag
    assert len(flags.DLRM_FLAGS) == 76  # all of dlrm_s_pytorch.py's


# ------------------------------------------------------------ checkpoints


def weights(path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    """SIGINT mid-run saves a checkpoint; --resume continues it to the weights
    an uninterrupted run ends with (LR warmup and decay, row-wise Adagrad)."""
    run = [
        *SMALL,
        "--num-batches",
        "300",
        "--print-freq",
        "1",
        "--test-freq",
        "100",
        "--optimizer",
        "rwsadagrad",
        "--lr-num-warmup-steps",
        "20",
        "--lr-decay-start-step",
        "100",
        "--lr-num-decay-steps",
        "150",
        "--threads",
        "1",
    ]
    whole = cli("train", *run, "--save-model", tmp_path / "whole.pt")
    assert whole.returncode == 0, whole.stderr
    part = tmp_path / "part.pt"
    log = open(tmp_path / "log.txt", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dlrm_ops", "train", *run, "--save-model", str(part)],
        stdout=log,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while "batch 40:" not in (tmp_path / "log.txt").read_text() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "SIGINT: stopped after batch" in err and "Traceback" not in err
    stopped = torch.load(part, weights_only=True)["step"]
    assert 40 <= stopped < 300, stopped
    resumed = cli("train", "--resume", part, "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {part} (trained {stopped} batches)" in resumed.stdout
    a, b = weights(tmp_path / "whole.pt"), weights(part)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The summary's throughput covers the run's own steps, resumed or not.
    assert "300 batches, 4,800 samples in" in resumed.stdout


def test_periodic_checkpoints_and_sigterm(tmp_path):
    run = [*SMALL, "--num-batches", "100000", "--print-freq", "5", "--test-freq", "0"]
    ckpt = tmp_path / "m.pt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dlrm_ops", "train", *run, "--save-model", str(ckpt)]
        + ["--save-every", "10"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert torch.load(ckpt, weights_only=True)["step"] % 10 == 0
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "SIGTERM: stopped after batch" in err


def test_resume_refuses_changed_settings_and_load_model_changed_arch(tmp_path):
    ckpt = tmp_path / "m.pt"
    assert cli("train", *SMALL, "--num-batches", "5", "--save-model", ckpt).returncode == 0
    r = cli("train", "--resume", ckpt, "--learning-rate", "0.5")
    assert (
        r.returncode == 2 and "--learning-rate 0.5: --resume continues the checkpoint" in r.stderr
    )
    r = cli("train", "--load-model", ckpt, "--arch-mlp-bot", "13-16-4")
    assert r.returncode == 2 and "--arch-mlp-bot 13-16-4: the model comes from the checkpoint, "
    "which has 13-8-4" in r.stderr
    # --load-model starts a new run from the checkpoint's weights, its architecture kept.
    r = cli("train", "--load-model", ckpt, "--num-batches", "3", "--no-progress")
    assert r.returncode == 0 and "loaded" in r.stdout and "summary: 8 batches" in r.stdout


def test_save_best_and_inference_only(tmp_path):
    best = tmp_path / "best.pt"
    r = cli("train", *SMALL, "--num-batches", "40", "--test-freq", "10", "--save-best", best)
    assert r.returncode == 0 and best.exists(), r.stderr
    aucs = [float(x) for x in re.findall(r"test at batch \d+: .*AUC ([\d.]+)", r.stdout)]
    step = torch.load(best, weights_only=True)["step"]
    assert aucs[step // 10 - 1] == max(aucs)
    inf = cli("train", "--inference-only", "--load-model", best, "--no-progress")
    assert inf.returncode == 0 and f"a model trained {step} batches" in inf.stdout
    assert f"AUC {max(aucs):.5f}" in inf.stdout


# ------------------------------------------------------------- tiny data


@pytest.mark.parametrize("rows", [50, 200])
def test_tiny_criteo_files_train_and_evaluate(tmp_path, rows):
    raw = (
        CRITEO_SAMPLE
        if rows == 200 and CRITEO_SAMPLE.exists()
        else criteo_file(tmp_path / "t.txt", rows)
    )
    r = cli(
        "train",
        "--data-generation",
        "dataset",
        "--raw-data-file",
        raw,
        "--processed-data-file",
        tmp_path / "p",
        "--no-progress",
        "--num-batches",
        "0",
        "--save-model",
        tmp_path / "m.pt",
        "--compare-reference",
        "3",
    )
    assert r.returncode == 0, r.stderr
    test_rows = int(re.search(r"test \((\d+) samples\)", r.stdout).group(1))
    assert 0 < test_rows < 1024  # one short test batch
    ev = cli("evaluate", "--load-model", tmp_path / "m.pt", "--no-progress")
    assert ev.returncode == 0 and f"test ({test_rows} samples)" in ev.stdout, ev.stderr


def test_no_test_rows_skips_evaluation(tmp_path):
    raw = criteo_file(tmp_path / "t.txt", 3)
    r = cli("train", "--data-generation", "dataset", "--raw-data-file", raw, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "no test rows: evaluation skipped" in r.stdout and "summary: 1 batches" in r.stdout


def test_dlrm_kaggle_script_command_line(tmp_path):
    """bench/dlrm_s_criteo_kaggle.sh's flags, as written there, on a small file."""
    (tmp_path / "input").mkdir()
    criteo_file(tmp_path / "input" / "train.txt", 700)
    r = cli(
        "train",
        "--arch-sparse-feature-size=16",
        "--arch-mlp-bot=13-512-256-64-16",
        "--arch-mlp-top=512-256-1",
        "--data-generation=dataset",
        "--data-set=kaggle",
        "--raw-data-file=./input/train.txt",
        "--processed-data-file=./input/kaggleAdDisplayChallenge_processed.npz",
        "--loss-function=bce",
        "--round-targets=True",
        "--learning-rate=0.1",
        "--mini-batch-size=128",
        "--print-freq=1024",
        "--print-time",
        "--test-mini-batch-size=16384",
        "--test-num-workers=16",
        "--no-progress",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "no effect here: --test-num-workers, --print-time" in r.stderr
    assert "kaggleAdDisplayChallenge_processed.dlrm_ops" in r.stderr
    assert "summary: 5 batches, 600 samples" in r.stdout  # 6 of Kaggle's 7 days train


def test_mlperf_logging_stops_at_the_auc_threshold(tmp_path):
    r = cli(
        "train",
        *SMALL,
        "--num-batches",
        "200",
        "--test-freq",
        "10",
        "--mlperf-logging",
        "--mlperf-auc-threshold",
        "0.01",
    )
    assert r.returncode == 0, r.stderr
    assert "stopped early: test AUC" in r.stdout and "summary: 10 batches" in r.stdout
    logs = [line for line in r.stdout.splitlines() if line.startswith(":::MLLOG ")]
    assert '"key": "run_start"' in logs[0] and '"status": "success"' in logs[-1]
    assert "recall" in r.stdout and "AP " in r.stdout


def test_dlrm_model_options_train(tmp_path):
    r = cli(
        "train",
        *SMALL,
        "--arch-embedding-size",
        "20-300-4000",
        "--num-batches",
        "10",
        "--md-flag",
        "--md-threshold",
        "25",
        "--weighted-pooling",
        "learned",
        "--loss-function",
        "wbce",
        "--loss-weights",
        "0.5-2.0",
        "--quantize-mlp-with-bit",
        "8",
        "--debug-mode",
    )
    assert r.returncode == 0, r.stderr
    assert "(proj): ModuleDict" in r.stdout and "with int8 MLPs:" in r.stdout
    r = cli(
        "train",
        *SMALL,
        "--data-generation",
        "random",
        "--rand-data-dist",
        "gaussian",
        "--num-batches",
        "0",
        "--data-size",
        "100",
        "--loss-function",
        "mse",
    )
    assert r.returncode == 0 and "summary: 7 batches, 100 samples" in r.stdout, r.stderr


# -------------------------------------------------------------- pieces


def test_lr_policy_follows_dlrm():
    """dlrm's LRPolicyScheduler: warmup lr*k/W, hold, quadratic decay to the
    1e-7 floor, then the last rate."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    s = LRPolicy(opt, num_warmup_steps=4, decay_start_step=6, num_decay_steps=4)
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    expect = [0.25, 0.5, 0.75, 0.75, 0.75, 1.0, 0.5625, 0.25, 0.0625, 0.0625, 0.0625, 0.0625]
    assert lrs == pytest.approx(expect)
    with pytest.raises(ValueError, match="warmup .* must end before the decay"):
        LRPolicy(opt, 10, 5, 3)


def test_metrics_ne_and_one_class():
    y = torch.tensor([0.0, 1.0, 0.0, 0.0])
    base = metrics.scores(torch.full((4,), 0.25), y)
    assert base["ne"] == pytest.approx(1.0) and base["auc"] == 0.5
    good = metrics.scores(torch.tensor([0.1, 0.9, 0.1, 0.2]), y, mlperf=True)
    assert good["ne"] < 0.5 and good["auc"] == 1.0 and good["f1"] == 1.0
    one = metrics.scores(torch.tensor([0.3, 0.4]), torch.zeros(2))
    assert np.isnan(one["auc"]) and np.isnan(one["ne"])
    assert metrics.scores(torch.zeros(0), torch.zeros(0)) == {"samples": 0}


def test_mixed_dims_match_dlrm_md_solver():
    # dlrm's md_solver(n=[10, 300, 5000, 20000], alpha=0.3, d0=16) gives [16, 6, 2, 2],
    # with round_dim [16, 8, 2, 2].
    rows = [5000, 10, 20000, 300]
    assert mixed_dims(rows, 16, 0.3, False) == [2, 16, 2, 6]
    assert mixed_dims(rows, 16, 0.3, True) == [2, 16, 2, 8]
    m = DLRM(rows, 16, [13, 16], [4, 1], embedding_dims=[2, 16, 2, 8], weighted_pooling="learned")
    b = RandomData(rows, 13, 8, 1).batch(0)
    m(b.dense, b.indices, b.offsets).sum().backward()
    assert m.sparse.proj["0"].weight.grad.shape == (16, 2) and "1" not in m.sparse.proj
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in m.sparse.pooling_weights)
    names = {id(p) for p in m.dense_parameters()}
    assert all(id(w) in names for w in m.sparse.pooling_weights)


def test_criteo_shuffle_and_sub_sample(tmp_path):
    raw = criteo_file(tmp_path / "t.txt", 700)
    preprocess_criteo([raw], tmp_path / "p", "kaggle")
    plain = CriteoDataset(tmp_path / "p", "train", 32, drop_last=False)
    rows = torch.cat([b.dense for b in plain])
    for mode in ("day", "total"):
        ds = CriteoDataset(tmp_path / "p", "train", 32, randomize=mode, seed=3, drop_last=False)
        got = torch.cat([b.dense for b in ds])
        assert len(got) == len(rows) and not torch.equal(got, rows)
        key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
        assert key(got) == key(rows)  # the same rows, in another order
        again = CriteoDataset(tmp_path / "p", "train", 32, randomize=mode, seed=3, drop_last=False)
        assert torch.equal(torch.cat([b.dense for b in again]), got)
    sub = CriteoDataset(tmp_path / "p", "train", 32, sub_sample_rate=0.5, seed=1, drop_last=False)
    labels = torch.cat([b.labels for b in plain])
    kept = torch.cat([b.labels for b in sub])
    assert int(kept.sum()) == int(labels.sum())  # every positive kept
    assert 0.3 < (kept == 0).sum() / (labels == 0).sum() < 0.7
    assert len(CriteoDataset(tmp_path / "p", "test", 1000, drop_last=False)) == 1


def test_checkpoint_is_plain_data_with_the_full_configuration(tmp_path):
    ckpt = tmp_path / "m.pt"
    assert cli("train", *SMALL, "--num-batches", "4", "--save-model", ckpt).returncode == 0
    c = torch.load(ckpt, weights_only=True)
    assert c["args"]["arch_mlp_bot"] == [13, 8, 4] and c["run"]["tables"] == [20, 30, 40]
    assert set(c["run"]) >= {"epoch", "batch", "scheduler", "torch_rng", "best_auc"}
    assert os.path.getsize(ckpt) > 0


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_gradient_accumulation_steps_once_per_window(optimizer):
    """--mlperf-grad-accum-iter 3: one step per 3 batches over their summed
    gradients, tables included (through torch.optim's sparse path)."""
    import argparse
    import copy

    from dlrm_ops import train
    from dlrm_ops.data import SyntheticData

    cfg = train.train_defaults()
    cfg.update(
        arch_mlp_bot=[13, 8, 4],
        arch_sparse_feature_size=4,
        arch_mlp_top=[8, 1],
        optimizer=optimizer,
        mlperf_grad_accum_iter=3,
        no_progress=True,
    )
    args = argparse.Namespace(**cfg)
    tables = [20, 30]
    data = SyntheticData(tables, 13, 16, 6, seed=2)
    torch.manual_seed(0)
    t = train.Trainer(args, tables, data, None, None)
    ref = copy.deepcopy(t.model)
    params = list(ref.parameters())
    make = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adagrad
    opt = make(params, lr=args.learning_rate, **({} if optimizer == "sgd" else {"eps": 1e-10}))
    for i in range(6):
        b = data.batch(i)
        t.train_step(b)
        t.step += 1
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            ref(b.dense, b.indices, b.offsets), b.labels
        )
        loss.backward()
        if (i + 1) % 3 == 0:
            opt.step()
            opt.zero_grad()
        for a, r in zip(t.model.parameters(), ref.parameters()):
            torch.testing.assert_close(a, r)
    r = cli("train", *SMALL, "--num-batches", "9", "--mlperf-grad-accum-iter", "3")
    assert r.returncode == 0 and "summary: 9 batches" in r.stdout, r.stderr
    r = cli("train", "--mlperf-grad-accum-iter", "2", "--optimizer", "rwsadagrad")
    assert r.returncode == 2 and "torch.optim, which has no rowwise_adagrad" in r.stderr


def test_mlperf_binary_files(tmp_path):
    """dlrm's --mlperf-bin-loader files: records read as dlrm's loader reads
    them, and the command trains and evaluates on them."""
    from dlrm_ops.data import MLPerfBinDataset

    rng = np.random.default_rng(0)

    def records(n):
        r = np.zeros((n, 40), np.int32)
        r[:, 0] = rng.random(n) < 0.3
        r[:, 1:14] = rng.integers(-1, 100, (n, 13))
        r[:, 14:] = rng.integers(0, 90, (n, 26))
        return r

    train, test = records(100), records(30)
    train.tofile(tmp_path / "kaggle_train.bin")
    test.tofile(tmp_path / "kaggle_test.bin")
    np.savez(tmp_path / "train.txt_fea_count.npz", counts=np.full(26, 90))
    counts = tmp_path / "train.txt_fea_count.npz"
    ds = MLPerfBinDataset(tmp_path / "kaggle_train.bin", counts, 32, max_ind_range=40)
    assert len(ds) == 4 and ds.table_sizes == [40] * 26
    b = ds.batch(3)  # the short last batch
    assert b.size == 4
    torch.testing.assert_close(
        b.dense, torch.from_numpy(np.log1p(np.maximum(train[96:, 1:14], 0)).astype(np.float32))
    )
    assert torch.equal(b.indices, torch.from_numpy((train[96:, 14:] % 40).T.reshape(-1)).long())
    assert torch.equal(b.labels, torch.from_numpy(train[96:, 0].astype(np.float32)))
    shuffled = MLPerfBinDataset(tmp_path / "kaggle_train.bin", counts, 32, shuffle=True, seed=1)
    assert sorted(shuffled.batch(i).size for i in range(4)) == [4, 32, 32, 32]
    r = cli(
        "train",
        "--data-generation=dataset",
        "--mlperf-bin-loader",
        "--mlperf-bin-shuffle",
        "--processed-data-file=./kaggle.npz",
        "--raw-data-file=./train.txt",
        "--mini-batch-size=16",
        "--num-batches=0",
        "--no-progress",
        "--save-model=m.pt",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "summary: 7 batches, 100 samples" in r.stdout and "test (30 samples)" in r.stdout
    ev = cli("evaluate", "--load-model", "m.pt", cwd=tmp_path)
    assert ev.returncode == 0 and "test (30 samples)" in ev.stdout, ev.stderr


def test_multi_hot_data_option():
    r = cli("train", *SMALL, "--num-batches", "3", "--multi-hot-sizes", "2,3,1")
    assert r.returncode == 0, r.stderr
    assert "summary: 3 batches" in r.stdout
    bad = cli("train", *SMALL, "--num-batches", "3", "--multi-hot-sizes", "mlperf")
    assert bad.returncode == 2
    assert "--multi-hot-sizes: 26 sizes for the data's 3 tables" in bad.stderr
