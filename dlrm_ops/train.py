"""``python -m dlrm_ops train`` / ``evaluate``: DLRM training and evaluation
with facebookresearch/dlrm's flags (``flags.py``), checkpoints that resume a
run exactly, and a run that an interrupt stops cleanly."""

import argparse
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time
import warnings
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint, flags, metrics, optimizers, precision, reference
from .data import (
    MLPERF_SIZES,
    CriteoDataset,
    MLPerfBinDataset,
    MultiHot,
    RandomData,
    SyntheticData,
    preprocess_criteo,
)
from .data.mlperf_bin import bin_files
from .data.prefetch import prefetch
from .errors import check_errors, set_check_mode
from .graphs import CapturedStep
from .models import DLRM
from .models.dlrm import mixed_dims
from .nn import quantize
from .schedule import LRPolicy

# 26 tables from 10 to 20k rows: big enough to need the embeddings, small
# enough that the built-in synthetic data trains in about two minutes.
DEFAULT_TABLES = [int(round(10 ** (1 + 3.3 * i / 25))) for i in range(26)]
GENERATED_TEST_BATCHES = 40
INTERRUPTED = "dlrm_ops_interrupted.pt"
# What fixes the model's shapes: taken from a checkpoint that is loaded.
ARCH = (
    "arch_sparse_feature_size",
    "arch_mlp_bot",
    "arch_mlp_top",
    "arch_interaction_op",
    "arch_interaction_itself",
    "weighted_pooling",
    "md_flag",
    "md_threshold",
    "md_temperature",
    "md_round_dims",
    "qr_flag",
    "qr_threshold",
    "qr_collisions",
    "qr_operation",
    "max_ind_range",
    "optimizer",
    "activation_function",
    "embedding_precision",
)


# How this command runs and what it writes: taken from a checkpoint only to
# resume its run.
RUN_SETTINGS = (
    "resume",
    "load_model",
    "save_model",
    "save_best",
    "save_every",
    "save_every_minutes",
    "inference_only",
    "threads",
    "device",
    "use_gpu",
    "check",
    "cuda_graph",
    "no_progress",
    "debug",
    "print_precision",
    "print_wall_time",
    "mlperf_logging",
    "quantize_emb_with_bit",
    "quantize_mlp_with_bit",
    "plot",
    "compare_reference",
    "enable_profiling",
    "force_precision",
)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _shown(v) -> str:
    return "-".join(map(str, v)) if isinstance(v, list) else str(v)


def train_defaults() -> dict:
    p = flags.Parser()
    flags.add_train_arguments(p)
    return vars(p.parse_args([]))


def config_from_checkpoint(ckpt: dict, args, given: set, resume: bool) -> argparse.Namespace:
    """The checkpoint's configuration, with what the command line may change:
    for --resume only how the run is watched and saved; otherwise (evaluate,
    --inference-only, --load-model) everything but the architecture."""
    defaults = train_defaults()
    saved = {**defaults, **ckpt["args"]}
    mine = vars(args)
    for dest in sorted(given):
        if dest not in saved or mine[dest] == saved[dest]:
            continue
        if dest in ARCH or (resume and dest not in flags.RESUME_MAY_CHANGE):
            how = "--resume continues" if resume else "the model comes from"
            raise flags.FlagError(
                f"{_flag(dest)} {_shown(mine[dest])}: {how} the checkpoint, which has "
                f"{_shown(saved[dest])}; leave the flag out"
            )
    out = dict(saved)
    out.update({d: mine[d] for d in given if d in mine})
    for d in RUN_SETTINGS:  # how this command runs: a resumed run's own unless given
        if d not in given and not (resume and d in saved):
            out[d] = mine.get(d, defaults[d])
    out["resume"], out["load_model"] = mine.get("resume"), mine.get("load_model")
    # How this launch runs (torchrun or not): never the checkpoint's.
    out["dist_backend"] = mine.get("dist_backend", "")
    for d, v in mine.items():  # evaluate's own settings
        if d not in saved:
            out[d] = v
    return argparse.Namespace(**out)


def build_data(args):
    """(train, test or None, table sizes, planted-ceiling AUC or None)."""
    train, test, tables, ceiling = _build_data(args)
    sizes = getattr(args, "multi_hot_sizes", None)
    if sizes is None:
        return train, test, tables, ceiling
    sizes = MLPERF_SIZES if sizes == "mlperf" else sizes
    if len(sizes) != len(tables):
        raise flags.FlagError(
            f"--multi-hot-sizes: {len(sizes)} sizes for the data's {len(tables)} tables"
        )
    wrap = lambda d: None if d is None else MultiHot(d, sizes, tables, args.seed)  # noqa: E731
    return wrap(train), wrap(test), tables, None


def _build_data(args):
    B, TB = args.mini_batch_size, args.test_mini_batch_size
    if args.data_generation == "dataset" and args.mlperf_bin_loader:
        train_file, test_file, counts = bin_files(args.processed_data_file, args.raw_data_file[0])
        kw = dict(max_ind_range=args.max_ind_range, seed=args.seed)
        train = MLPerfBinDataset(
            train_file, counts, B, args.num_batches or None, shuffle=args.mlperf_bin_shuffle, **kw
        )
        test = MLPerfBinDataset(test_file, counts, TB, args.num_test_batches or None, **kw)
        return train, (test if len(test) else None), train.table_sizes, None
    if args.data_generation == "dataset":
        processed = args.processed_data_file or args.raw_data_file[0] + ".processed"
        if args.raw_data_file:
            meta = preprocess_criteo(
                args.raw_data_file,
                processed,
                args.data_set,
                args.max_ind_range if args.max_ind_range > 0 else None,
                args.skip_malformed,
                threads=args.threads,
                progress=not args.no_progress,
            )
            if meta["skipped"]:
                print(f"skipped {meta['skipped']} malformed lines")
        common = dict(sub_sample_rate=args.data_sub_sample_rate, seed=args.seed, drop_last=False)
        train = CriteoDataset(
            processed,
            "train",
            B,
            args.num_batches or None,
            randomize=args.data_randomize,
            window=args.shuffle_window,
            **common,
        )
        test = CriteoDataset(processed, "test", TB, args.num_test_batches or None, **common)
        return train, (test if len(test) else None), train.table_sizes, None
    tables = args.arch_embedding_size or DEFAULT_TABLES
    nb = args.num_batches or math.ceil(args.data_size / B)
    samples = None if args.num_batches else args.data_size
    ntb = args.num_test_batches or GENERATED_TEST_BATCHES
    dense = args.arch_mlp_bot[0]
    if args.data_generation == "random":
        kw = dict(
            num_indices_per_lookup=args.num_indices_per_lookup,
            fixed_indices_per_lookup=args.num_indices_per_lookup_fixed,
            round_targets=args.round_targets,
            dist=args.rand_data_dist,
            lo=args.rand_data_min,
            hi=args.rand_data_max,
            mu=args.rand_data_mu,
            sigma=args.rand_data_sigma,
        )
        train = RandomData(tables, dense, B, nb, seed=args.seed, num_samples=samples, **kw)
        test = RandomData(tables, dense, TB, ntb, seed=args.seed + 1, **kw)
        return train, test, tables, None
    train = SyntheticData(tables, dense, B, nb, seed=args.seed, num_samples=samples)
    test = SyntheticData(tables, dense, TB, ntb, seed=args.seed)
    return train, _TestSplit(test), tables, test.ceiling_auc(ntb)


class _TestSplit:
    """SyntheticData's test stream as a split with batch(i)."""

    def __init__(self, data: SyntheticData):
        self.data = data

    def __len__(self) -> int:
        return self.data.num_batches

    def batch(self, i: int):
        return self.data.batch(i, split=1)


def table_shapes(args, tables):
    """Rows (capped by --max-ind-range) and dims (--md-flag) of every table."""
    D = args.arch_sparse_feature_size
    rows = [min(n, args.max_ind_range) if args.max_ind_range > 0 else n for n in tables]
    if not args.md_flag:
        return rows, [D] * len(rows)
    md = mixed_dims(rows, D, args.md_temperature, args.md_round_dims)
    return rows, [d if n > args.md_threshold else D for n, d in zip(rows, md)]


def model_options(args) -> dict:
    """The keyword arguments ``DLRM`` and ``distributed.DistributedDLRM``
    both take, from the command's flags."""
    return dict(
        interaction=args.arch_interaction_op,
        self_interaction=args.arch_interaction_itself,
        embedding_optimizer=args.optimizer,
        embedding_lr=args.learning_rate,
        max_ind_range=args.max_ind_range if args.max_ind_range > 0 else None,
        precision=args.precision,
        embedding_dtype=torch.bfloat16 if args.embedding_precision == "bf16" else torch.float32,
    )


def build_model(args, tables, fused: bool = True) -> DLRM:
    options = model_options(args)
    if not fused:
        options["embedding_optimizer"] = None
    return DLRM(
        tables,
        args.arch_sparse_feature_size,
        args.arch_mlp_bot,
        args.arch_mlp_top,
        qr_collisions=args.qr_collisions if args.qr_flag else 0,
        qr_operation=args.qr_operation,
        qr_threshold=args.qr_threshold,
        embedding_dims=table_shapes(args, tables)[1] if args.md_flag else None,
        weighted_pooling=args.weighted_pooling,
        init_seed=args.seed,
        **options,
    )


def dense_optimizer(args, params):
    """The torch.optim class of the embeddings' optimizer (dlrm_ops.optimizers)."""
    return optimizers.spec(args.optimizer).dense(params, lr=args.learning_rate)


def embedding_optimizer(args, tables):
    """torch.optim's sparse-gradient counterpart of the tables' optimizer."""
    make = {
        "sgd": lambda p: torch.optim.SGD(p, lr=args.learning_rate),
        "adagrad": lambda p: torch.optim.Adagrad(p, lr=args.learning_rate, eps=1e-10),
        "adam": lambda p: torch.optim.SparseAdam(p, lr=args.learning_rate),
    }
    return make[args.optimizer](list(tables.parameters()))


def loss_function(args):
    """dlrm's losses on the logits: bce, mse (of the probability) or wbce,
    probabilities clamped to [t, 1-t] when --loss-threshold t > 0."""
    t = args.loss_threshold
    weights = torch.tensor(args.loss_weights, dtype=torch.float32)

    def prob(z):
        p = torch.sigmoid(z)
        return p.clamp(t, 1 - t) if t > 0 else p

    def loss(z, y):
        if args.loss_function == "mse":
            return F.mse_loss(prob(z), y)
        if args.loss_function == "bce" and t == 0:
            return F.binary_cross_entropy_with_logits(z, y)
        per = (
            F.binary_cross_entropy(prob(z), y, reduction="none")
            if t > 0
            else F.binary_cross_entropy_with_logits(z, y, reduction="none")
        )
        if args.loss_function == "wbce":
            per = per * weights.to(z.device)[y.round().long()]
        return per.mean()

    return loss


def to_device(b, device):
    """A batch (any Batch dataclass) on ``device``."""
    if device == "cpu":
        return b
    return dataclasses.replace(
        b,
        **{
            k: getattr(b, k).to(device, non_blocking=True)
            for k in ("dense", "indices", "offsets", "labels")
        },
    )


@torch.no_grad()
def evaluate(model, test, device="cpu", mlperf=False) -> dict:
    model.eval()
    probs, labels = [], []
    batches = (test.batch(i) for i in range(len(test))) if hasattr(test, "batch") else test
    for b in batches:
        b = to_device(b, device)
        probs.append(torch.sigmoid(model(b.dense, b.indices, b.offsets)).float().cpu())
        labels.append(b.labels.float().cpu())
    model.train()
    return metrics.scores(torch.cat(probs), torch.cat(labels), mlperf)


def quantized_copy(model, args):
    """The model with quantized tables and/or dynamically quantized MLPs, or None."""
    if args.quantize_emb_with_bit == 32 and args.quantize_mlp_with_bit == 32:
        return None
    q = copy.deepcopy(model).cpu()
    what = []
    if args.quantize_emb_with_bit != 32:
        report = quantize(q, bits=args.quantize_emb_with_bit)
        what.append(f"int{args.quantize_emb_with_bit} tables ({report.bytes_after:,} bytes)")
    if args.quantize_mlp_with_bit != 32:
        dtype = torch.qint8 if args.quantize_mlp_with_bit == 8 else torch.float16
        with warnings.catch_warnings():  # torch's notice that quantized tensors are deprecated
            warnings.simplefilter("ignore", UserWarning)
            torch.ao.quantization.quantize_dynamic(q, {torch.nn.Linear}, dtype=dtype, inplace=True)
        what.append(f"{'int8' if dtype == torch.qint8 else 'fp16'} MLPs")
    return q, " + ".join(what)


def compare_with_reference(args, model, tables, data, steps: int) -> Optional[dict]:
    """A separate race: train-step throughput of this DLRM and of the
    pure-PyTorch reference on the same batches (the reference starts from a
    copy of our weights)."""
    if args.qr_flag or args.md_flag or args.weighted_pooling or args.max_ind_range > 0:
        return None
    batches = [data.batch(i) for i in range(min(steps, len(data)))]
    if not batches:
        return None
    ours = copy.deepcopy(model).cpu()
    ref = reference.ReferenceDLRM(
        tables,
        args.arch_sparse_feature_size,
        args.arch_mlp_bot,
        args.arch_mlp_top,
        args.arch_interaction_op,
        args.arch_interaction_itself,
    ).load_from(ours)
    opt_ours = dense_optimizer(args, ours.dense_parameters())
    opt_ref = dense_optimizer(args, ref.dense_parameters())
    emb_opt = {
        torch.optim.SGD: torch.optim.SGD,
        torch.optim.Adagrad: torch.optim.Adagrad,
        torch.optim.Adam: torch.optim.SparseAdam,
    }[optimizers.spec(args.optimizer).dense]
    emb_ref = emb_opt(ref.embedding_parameters(), lr=args.learning_rate)

    def step_ours(b):
        opt_ours.zero_grad()
        F.binary_cross_entropy_with_logits(ours(b.dense, b.indices, b.offsets), b.labels).backward()
        opt_ours.step()

    def step_ref(b):
        opt_ref.zero_grad()
        emb_ref.zero_grad()
        F.binary_cross_entropy_with_logits(ref(b.dense, b.indices, b.offsets), b.labels).backward()
        opt_ref.step()
        emb_ref.step()

    sides = {"dlrm_ops": step_ours, "reference": step_ref}
    with torch.sparse.check_sparse_tensor_invariants(enable=False):  # torch.optim's sparse path
        return _race(sides, batches)


def _race(sides, batches) -> dict:
    for fn in sides.values():
        for b in batches[:3]:
            fn(b)
    # Interleaved rounds, best of each side: drifting machine load hits both alike.
    best = {name: float("inf") for name in sides}
    for _ in range(3):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            for b in batches:
                fn(b)
            best[name] = min(best[name], time.perf_counter() - t0)
    samples = sum(b.size for b in batches)
    return {name: samples / t for name, t in best.items()}


def plot(path: str, losses, evals) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot([s for s, _ in losses], [l for _, l in losses])
    ax[0].set(xlabel="batch", ylabel="train loss", title="training loss")
    ax[1].plot([s for s, _ in evals], [e["auc"] for _, e in evals], marker="o")
    ax[1].set(xlabel="batch", ylabel="test ROC AUC", title="test AUC")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def mllog(key: str, value=None, **metadata) -> None:
    """One line in the MLPerf logging format."""
    line = {
        "namespace": "",
        "time_ms": int(time.time() * 1000),
        "event_type": "POINT_IN_TIME",
        "key": key,
        "value": value,
        "metadata": metadata,
    }
    print(":::MLLOG " + json.dumps(line), flush=True)


class Trainer:
    """One training run: the model, its optimizers and schedule, and where
    the run stands, all of which a checkpoint holds."""

    def __init__(self, args, tables, train, test, ceiling):
        self.args, self.tables, self.train, self.test, self.ceiling = (
            args,
            tables,
            train,
            test,
            ceiling,
        )
        self.device = args.device
        # Gradients accumulated over k batches: the tables give sparse
        # gradients to a torch optimizer instead of updating in the backward.
        self.accumulate = args.mlperf_grad_accum_iter
        fused = self.accumulate == 1
        self.model = self.make_model(fused)
        self.opt = dense_optimizer(args, self.model.dense_parameters())
        self.emb_opt = None if fused else embedding_optimizer(args, self.model.embeddings)
        self.sched = (
            LRPolicy(
                self.opt,
                args.lr_num_warmup_steps,
                args.lr_decay_start_step,
                args.lr_num_decay_steps,
            )
            if args.lr_num_warmup_steps or args.lr_num_decay_steps
            else None
        )
        self.loss = loss_function(args)
        self.captured = CapturedStep(self._step) if getattr(args, "cuda_graph", False) else None
        self.epoch = self.batch = self.step = 0
        self.best_auc = -math.inf
        self.losses, self.evals = [], []
        self.seconds, self.samples = 0.0, 0
        self.signalled = None  # the signal caught, if any
        self.stopped = None  # the signal that stops the run (as all ranks agree)

    def make_model(self, fused: bool):
        return build_model(self.args, self.tables, fused).to(self.device)

    def logits(self, b) -> torch.Tensor:
        return self.model(b.dense, b.indices, b.offsets)

    def evaluate(self, test) -> dict:
        return evaluate(self.model, test, self.device, self.args.mlperf_logging)

    def agree(self, loss: float, minutes_due: bool):
        """(loss, minutes_due) as all ranks see them (one process: as given);
        also settles ``stopped``."""
        self.stopped = self.signalled
        return loss, minutes_due

    # checkpoints
    def state(self) -> dict:
        return dict(
            epoch=self.epoch,
            batch=self.batch,
            best_auc=self.best_auc,
            losses=self.losses,
            evals=self.evals,
            seconds=self.seconds,
            samples=self.samples,
            tables=list(self.tables),
            scheduler=self.sched.state_dict() if self.sched else None,
            embedding_optimizer=self.emb_opt.state_dict() if self.emb_opt else None,
            torch_rng=torch.get_rng_state(),
        )

    def save(self, path: str) -> None:
        config = {k: v for k, v in vars(self.args).items()}
        checkpoint.save(
            path, self.model.state_dict(), self.opt.state_dict(), self.step, config, self.state()
        )

    def load(self, ckpt: dict, resume: bool, flag: str) -> None:
        run = ckpt.get("run") or {}
        if run.get("tables") is not None and list(run["tables"]) != list(self.tables):
            saved, now = list(run["tables"]), list(self.tables)
            raise flags.FlagError(
                f"{flag}: the checkpoint's {len(saved)} tables ({_shown(saved[:6])}...) differ "
                f"from the data's {len(now)} ({_shown(now[:6])}...)"
            )
        try:
            self.load_model(ckpt)
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0]
            raise flags.FlagError(f"{flag}: the checkpoint does not fit this model: {first}")
        self.step = int(ckpt["step"])
        if not resume:
            return
        self.epoch, self.batch = run["epoch"], run["batch"]
        self.best_auc = run["best_auc"]
        self.losses = [tuple(x) for x in run["losses"]]
        self.evals = [tuple(x) for x in run["evals"]]
        self.seconds, self.samples = run["seconds"], run["samples"]
        if self.sched is not None and run.get("scheduler"):
            self.sched.load_state_dict(run["scheduler"])
        if self.emb_opt is not None and run.get("embedding_optimizer"):
            self.emb_opt.load_state_dict(run["embedding_optimizer"])
        torch.set_rng_state(run["torch_rng"])

    def load_model(self, ckpt: dict) -> None:
        """The model and dense optimizer of a checkpoint file, or of a sharded
        checkpoint directory (``ckpt["dir"]``: its tables assembled)."""
        state = ckpt["model"]
        if ckpt.get("dir"):
            from .distributed import checkpoint as sharded

            tables = self.model.embeddings
            state = sharded.one_process_state(
                ckpt["dir"],
                self.model.state_dict(),
                tables.num_embeddings,
                tables.embedding_dims,
                tables.optimizer,
            )
        self.model.load_state_dict(state)
        self.opt.load_state_dict(ckpt["optimizer"])

    # the run
    def at_boundary(self) -> bool:
        """Whether no gradients are pending (between accumulation windows)."""
        return self.step % self.accumulate == 0

    def _step(self, dense, indices, offsets, labels) -> torch.Tensor:
        """The step --cuda-graph captures (one optimizer step per batch, constant lr)."""
        self.opt.zero_grad()
        loss = self.loss(self.model(dense, indices, offsets), labels)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def train_step(self, b):
        """One batch; the optimizers step once every ``accumulate`` batches
        (after self.step counts this one). Returns the loss as a tensor on the
        device: reading it would make the host wait for the GPU every step."""
        if self.captured is not None:
            return self.captured(b.dense, b.indices, b.offsets, b.labels)
        lr = self.opt.param_groups[0]["lr"]
        if self.emb_opt is None:  # the tables update in the backward: same rate as the MLPs
            if self.sched is not None:
                self.model.embeddings.lr = lr
            self.opt.zero_grad()
        elif self.at_boundary():  # a new window
            for o in (self.opt, self.emb_opt):
                o.zero_grad()
        loss = self.loss(self.logits(b), b.labels)
        loss.backward()
        if (self.step + 1) % self.accumulate == 0:
            self.opt.step()
            if self.emb_opt is not None:
                for g in self.emb_opt.param_groups:
                    g["lr"] = lr
                with torch.sparse.check_sparse_tensor_invariants(enable=False):
                    self.emb_opt.step()
            if self.sched is not None:
                self.sched.step()
        return loss.detach()

    def evaluation(self, bar) -> Optional[dict]:
        a = self.args
        if self.test is None:
            return None
        e = self.evaluate(self.test)
        check_errors(self.device)
        self.evals.append((self.step, e))
        bar.write(f"  test at batch {self.step}: {metrics.line(e, a.print_precision)}")
        if a.mlperf_logging:
            mllog("eval_accuracy", e["auc"], epoch_num=self.epoch + 1)
        if e["auc"] > self.best_auc:
            self.best_auc = e["auc"]
            if a.save_best:
                self.save(a.save_best)
                bar.write(f"  best test AUC so far: saved {a.save_best}")
        return e

    def threshold_reached(self, e: Optional[dict]) -> Optional[str]:
        a = self.args
        if e is None:
            return None
        if 0 < a.mlperf_acc_threshold < e["accuracy"]:
            return f"test accuracy {e['accuracy']:.5f} above --mlperf-acc-threshold"
        if 0 < a.mlperf_auc_threshold < e["auc"]:
            return f"test AUC {e['auc']:.5f} above --mlperf-auc-threshold"
        return None

    def run(self) -> Optional[str]:
        """Trains from where the run stands; returns why it stopped early, if it did."""
        a = self.args
        nb = len(self.train)
        bar = tqdm(
            total=nb * a.nepochs,
            initial=self.epoch * nb + self.batch,
            unit="batch",
            disable=a.no_progress,
            dynamic_ncols=True,
        )
        last_save = time.monotonic()
        running, n_running = 0.0, 0
        stop = None
        try:
            while self.epoch < a.nepochs and stop is None:
                gpu = self.device == "cuda"
                batches = prefetch(self.train, self.batch, nb, depth=4 if gpu else 0, pin=gpu)
                while self.batch < nb:
                    b = to_device(next(batches), self.device)
                    t0 = time.perf_counter()
                    loss = self.train_step(b)
                    minutes_due = bool(a.save_every_minutes) and (
                        time.monotonic() - last_save >= 60 * a.save_every_minutes
                    )
                    loss, minutes_due = self.agree(loss, minutes_due)
                    self.seconds += time.perf_counter() - t0
                    self.samples += b.size
                    self.step += 1
                    self.batch += 1
                    running += loss
                    n_running += 1
                    bar.update(1)
                    bar.set_postfix(samples_per_s=f"{self.samples / self.seconds:,.0f}")
                    if self.step % a.print_freq == 0:
                        # The host waits here anyway: the time to raise a bad
                        # lookup the GPU recorded (dlrm_ops.errors).
                        check_errors(self.device)
                        running = float(running)
                        self.losses.append((self.step, running / n_running))
                        when = time.strftime("%H:%M:%S ") if a.print_wall_time else ""
                        bar.write(
                            f"{when}epoch {self.epoch} batch {self.step}: train loss "
                            f"{running / n_running:.{a.print_precision}f}"
                        )
                        running, n_running = 0.0, 0
                    if a.test_freq > 0 and self.step % a.test_freq == 0:
                        stop = self.threshold_reached(self.evaluation(bar))
                    due = (a.save_every and self.step % a.save_every == 0) or minutes_due
                    if not self.at_boundary():
                        continue  # an accumulation window ends before a save or a stop
                    if a.save_model and due:
                        self.save(a.save_model)
                        last_save = time.monotonic()
                    if self.stopped is not None or stop is not None:
                        break
                batches.close()  # no batch is made past where the run stands
                if self.stopped is not None:
                    return "interrupted"
                if self.batch >= nb:
                    self.epoch, self.batch = self.epoch + 1, 0
        finally:
            bar.close()
        check_errors(self.device)
        return stop


def _interruptible(trainer: Trainer):
    """SIGINT and SIGTERM end the run after the current step, not in it."""

    def handler(signum, frame):
        trainer.signalled = signum

    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


def load_checkpoint(path: str, flag: str) -> dict:
    """A checkpoint file, or the meta part of a sharded checkpoint directory
    (``dir`` set: its tables are read when loaded into a model)."""
    if not os.path.exists(path):
        raise flags.FlagError(f"{flag} {path}: no such file")
    try:
        if os.path.isdir(path):
            from .distributed import checkpoint as sharded

            return dict(sharded.load_meta(path), dir=path)
        return checkpoint.load(path)
    except checkpoint.CheckpointError as e:
        raise flags.FlagError(f"{flag}: {e}") from None


def run(args, given: set, command: str = "train") -> int:
    note = flags.ignored_note(given)
    if note:
        print(note, file=sys.stderr)
    ckpt = None
    resume = getattr(args, "resume", None)
    source = resume or args.load_model
    if source:
        ckpt = load_checkpoint(source, "--resume" if resume else "--load-model")
        args = config_from_checkpoint(ckpt, args, given, resume=bool(resume))
        if command == "evaluate":
            args.inference_only = True
    flags.check(args, given)
    args.precision, why = precision.resolve(args.precision, args.device, args.force_precision)
    if why:
        print(why, file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    set_check_mode(getattr(args, "check", "deferred"))
    if not flags.distributed(args):
        return _run(args, ckpt, source, None)
    from .distributed import train as hybrid

    ctx = hybrid.setup(args)
    try:
        return _run(args, ckpt, source, ctx)
    finally:
        hybrid.teardown()


def _run(args, ckpt, source, ctx) -> int:
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if ctx is None:
        train, test, tables, ceiling = build_data(args)
        trainer = Trainer(args, tables, train, test, ceiling)
    else:
        from .distributed import train as hybrid

        train, test, tables, ceiling = hybrid.build_data(args, ctx, build_data)
        trainer = hybrid.DistributedTrainer(args, tables, train, test, ceiling, ctx)
        print(trainer.plan.describe(hybrid.row_bytes(args, trainer.plan)))
    if ckpt is not None:
        trainer.load(ckpt, bool(args.resume), "--resume" if args.resume else "--load-model")
        verb = "resuming" if args.resume else "loaded"
        print(f"{verb} {source} (trained {trainer.step} batches)")
    if args.debug:
        print(trainer.model)
    D = args.arch_sparse_feature_size
    print(
        f"DLRM: {len(tables)} tables ({sum(tables):,} rows, dim {D}), bottom "
        f"{_shown(args.arch_mlp_bot)}, top {_shown(args.arch_mlp_top)}, "
        f"{args.arch_interaction_op} interaction, {args.optimizer}, lr {args.learning_rate}, "
        f"{args.loss_function} loss, {args.precision}, data {args.data_generation}, {args.device}, "
        f"{torch.get_num_threads()} threads"
    )
    if args.mlperf_logging:
        mllog("run_start")
    stop = None
    if not args.inference_only:
        if args.enable_profiling:
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            profiler.__enter__()
        old = _interruptible(trainer)
        try:
            stop = trainer.run()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if args.enable_profiling:
                profiler.__exit__(None, None, None)
                print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        if stop == "interrupted":
            path = args.save_model or INTERRUPTED
            trainer.save(path)
            name = signal.Signals(trainer.stopped).name
            how = (
                "python -m dlrm_ops train"
                if ctx is None
                else "torchrun --nproc-per-node N -m dlrm_ops train (any N)"
            )
            if ctx is None or ctx.rank == 0:
                print(
                    f"{name}: stopped after batch {trainer.step}; saved {path} "
                    f"(continue with: {how} --resume {path})",
                    file=sys.stderr,
                )
            return 128 + trainer.stopped
        if stop:
            print(f"stopped early: {stop}")
        if args.save_model:
            trainer.save(args.save_model)
            print(f"saved {args.save_model}")
    final = None
    digits = args.print_precision
    if test is None:
        print("no test rows: evaluation skipped")
    else:
        final = trainer.evaluate(trainer.test)
        if not trainer.evals or trainer.evals[-1][0] != trainer.step:
            trainer.evals.append((trainer.step, final))
            if args.mlperf_logging:
                mllog("eval_accuracy", final["auc"], epoch_num=trainer.epoch)
        line = f"test ({final['samples']} samples): {metrics.line(final, digits)}"
        if ceiling is not None:
            line += f"  (planted-model ceiling AUC {ceiling:.4f})"
        print(line)
        q = quantized_copy(trainer.model, args)
        if q is not None:
            qe = evaluate(q[0], test, "cpu", args.mlperf_logging)
            print(f"  with {q[1]}: {metrics.line(qe, digits)}")
    if args.mlperf_logging:
        reached = final is not None and 0 < args.mlperf_auc_threshold <= final["auc"]
        mllog("run_stop", status="success" if reached else "aborted")
    speed = None
    if ctx is not None:
        print(hybrid.traffic_line(trainer))
    if (
        not args.inference_only
        and args.compare_reference > 0
        and args.device == "cpu"
        and ctx is None
    ):
        speed = compare_with_reference(args, trainer.model, tables, train, args.compare_reference)
    if args.plot and (ctx is None or ctx.rank == 0):
        plot(args.plot, trainer.losses, trainer.evals)
        print(f"plot written to {args.plot}")
    summary = (
        f"summary: a model trained {trainer.step} batches"
        if args.inference_only
        else f"summary: {trainer.step} batches"
    )
    if trainer.samples:
        summary += (
            f", {trainer.samples:,} samples in {trainer.seconds:.2f} s of train steps "
            f"({trainer.samples / trainer.seconds:,.0f} samples/s)"
        )
    if final is not None:
        summary += (
            f", test AUC {final['auc']:.4f}, NE {final['ne']:.4f}, logloss {final['logloss']:.5f}"
        )
    print(summary)
    g = trainer.captured
    if g is not None and g.calls:
        print(
            f"CUDA graph: {g.replays} of {g.calls} steps replayed, {g.eager} of another shape "
            f"eager, {min(g.calls, g.warmup)} warm-up"
        )
    if speed:
        print(
            f"separate speed race ({args.compare_reference} steps on the same batches, "
            f"best of 3): dlrm_ops {speed['dlrm_ops']:,.0f} samples/s, pure-PyTorch reference "
            f"{speed['reference']:,.0f} samples/s ({speed['dlrm_ops'] / speed['reference']:.2f}x)"
        )
    return 0
