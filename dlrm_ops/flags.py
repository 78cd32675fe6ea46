"""The flags of ``python -m dlrm_ops train`` / ``evaluate``:
facebookresearch/dlrm's ``dlrm_s_pytorch.py`` flags with dlrm's meaning, and
this command's own. Every value is checked before any work starts: a bad one
ends the command with one line naming the flag and the rule, exit status 2.
``DLRM_FLAGS`` says what the command does with each of dlrm's flags."""

import argparse
import math
import os
import sys
from typing import List, Optional

from . import optimizers
from .errors import CHECKS

# What this command does with every flag of facebookresearch/dlrm's
# dlrm_s_pytorch.py (docs/command-line.md shows this table).
IMPLEMENTED, IGNORED = "implemented", "accepted, no effect"
DLRM_FLAGS = {
    "--arch-sparse-feature-size": (IMPLEMENTED, "embedding dim"),
    "--arch-embedding-size": (
        IMPLEMENTED,
        "rows per table (generated data; Criteo: from the data)",
    ),
    "--arch-mlp-bot": (IMPLEMENTED, "bottom MLP"),
    "--arch-mlp-top": (IMPLEMENTED, "top MLP (the interaction's width is prepended, as dlrm)"),
    "--arch-interaction-op": (IMPLEMENTED, "dot or cat"),
    "--arch-interaction-itself": (IMPLEMENTED, "self-interaction terms"),
    "--weighted-pooling": (IMPLEMENTED, "learned: a trained weight per row; fixed: weights of 1"),
    "--md-flag": (IMPLEMENTED, "mixed-dimension tables with projections"),
    "--md-threshold": (IMPLEMENTED, "tables with more rows get mixed dims"),
    "--md-temperature": (IMPLEMENTED, "alpha of dlrm's md_solver"),
    "--md-round-dims": (IMPLEMENTED, "dims rounded to powers of two"),
    "--qr-flag": (IMPLEMENTED, "quotient-remainder tables"),
    "--qr-threshold": (IMPLEMENTED, "tables with more rows are split"),
    "--qr-operation": (IMPLEMENTED, "mult, add or concat"),
    "--qr-collisions": (IMPLEMENTED, "remainder table rows"),
    "--activation-function": (IMPLEMENTED, "relu, the only one dlrm builds"),
    "--loss-function": (IMPLEMENTED, "mse, bce or wbce (default here: bce; dlrm's: mse)"),
    "--loss-weights": (IMPLEMENTED, "wbce weights of negatives-positives"),
    "--loss-threshold": (IMPLEMENTED, "probabilities clamped to [t, 1-t] in the loss"),
    "--round-targets": (IMPLEMENTED, "random data: 0/1 labels instead of uniform [0, 1)"),
    "--data-size": (IMPLEMENTED, "random/synthetic data: samples (when --num-batches is 0)"),
    "--num-batches": (IMPLEMENTED, "batches per epoch; 0: all the data"),
    "--data-generation": (IMPLEMENTED, "random, dataset, and synthetic (learnable, built in)"),
    "--rand-data-dist": (IMPLEMENTED, "random data indices: uniform or gaussian"),
    "--rand-data-min": (IMPLEMENTED, "gaussian indices: clip low (fraction of rows)"),
    "--rand-data-max": (IMPLEMENTED, "gaussian indices: clip high (fraction of rows)"),
    "--rand-data-mu": (IMPLEMENTED, "gaussian indices: mean (fraction of rows)"),
    "--rand-data-sigma": (IMPLEMENTED, "gaussian indices: deviation (fraction of rows)"),
    "--data-trace-file": (IGNORED, "dlrm's trace generator is not part of its current choices"),
    "--data-set": (IMPLEMENTED, "kaggle or terabyte"),
    "--raw-data-file": (IMPLEMENTED, "Criteo raw TSV file(s)"),
    "--processed-data-file": (IMPLEMENTED, "folder of preprocessed arrays (.npz: see below)"),
    "--data-randomize": (IMPLEMENTED, "total, day, window (--shuffle-window rows) or none"),
    "--data-trace-enable-padding": (IGNORED, "belongs to the trace generator"),
    "--max-ind-range": (IMPLEMENTED, "hashing trick: rows per table cap"),
    "--data-sub-sample-rate": (IMPLEMENTED, "drops that share of negative rows"),
    "--num-indices-per-lookup": (IMPLEMENTED, "random data: indices per bag"),
    "--num-indices-per-lookup-fixed": (IMPLEMENTED, "random data: fixed bag size"),
    "--num-workers": (IGNORED, "batches are cut from memory maps in process"),
    "--memory-map": (IGNORED, "the arrays are always memory-mapped"),
    "--mini-batch-size": (IMPLEMENTED, "training batch"),
    "--nepochs": (IMPLEMENTED, "epochs"),
    "--learning-rate": (IMPLEMENTED, "learning rate of every parameter"),
    "--print-precision": (IMPLEMENTED, "digits of printed metrics"),
    "--numpy-rand-seed": (IMPLEMENTED, "the seed (same as --seed)"),
    "--sync-dense-params": (IGNORED, "one process: nothing to synchronise"),
    "--optimizer": (IMPLEMENTED, "sgd, adagrad, rwsadagrad (row-wise Adagrad), adam, ..."),
    "--dataset-multiprocessing": (IGNORED, "preprocessing streams the file"),
    "--inference-only": (IMPLEMENTED, "evaluate --load-model's model"),
    "--quantize-mlp-with-bit": (IMPLEMENTED, "8 or 16: dynamic quantization of the MLPs (eval)"),
    "--quantize-emb-with-bit": (IMPLEMENTED, "4 or 8: quantized tables (eval); 32: none"),
    "--save-onnx": (IGNORED, "no ONNX file is written: the native custom ops have no ONNX export"),
    "--use-gpu": (IMPLEMENTED, "the CUDA kernels (same as --device cuda)"),
    "--local_rank": (IGNORED, "torchrun's LOCAL_RANK is read instead"),
    "--dist-backend": (
        IMPLEMENTED,
        "gloo or nccl: hybrid-parallel training over torchrun's processes",
    ),
    "--print-freq": (IMPLEMENTED, "batches between loss lines"),
    "--test-freq": (IMPLEMENTED, "batches between evaluations (-1: at the end)"),
    "--test-mini-batch-size": (IMPLEMENTED, "evaluation batch (-1: the training batch)"),
    "--test-num-workers": (IGNORED, "batches are cut from memory maps in process"),
    "--print-time": (IGNORED, "times are always printed"),
    "--print-wall-time": (IMPLEMENTED, "wall-clock time on each loss line"),
    "--debug-mode": (IMPLEMENTED, "prints the model and full tracebacks"),
    "--enable-profiling": (IMPLEMENTED, "torch.profiler over training, table printed"),
    "--plot-compute-graph": (IGNORED, "needs torchviz; see --plot for curves"),
    "--tensor-board-filename": (IGNORED, "no TensorBoard writer; see --plot"),
    "--save-model": (IMPLEMENTED, "checkpoint at the end, every --save-every, on Ctrl-C"),
    "--load-model": (IMPLEMENTED, "model, optimizer and schedule from a checkpoint"),
    "--mlperf-logging": (IMPLEMENTED, ":::MLLOG lines and dlrm's extra metrics"),
    "--mlperf-acc-threshold": (IMPLEMENTED, "stop once test accuracy exceeds it"),
    "--mlperf-auc-threshold": (IMPLEMENTED, "stop once test AUC exceeds it"),
    "--mlperf-bin-loader": (IMPLEMENTED, "reads dlrm's <name>_train.bin / _test.bin records"),
    "--mlperf-bin-shuffle": (IMPLEMENTED, "the binary file's batches in a random order"),
    "--mlperf-grad-accum-iter": (
        IMPLEMENTED,
        "one optimizer step per k batches over their summed gradients (the tables then "
        "use torch.optim with sparse gradients, not the fused update)",
    ),
    "--lr-num-warmup-steps": (IMPLEMENTED, "linear warmup (dlrm's LRPolicyScheduler)"),
    "--lr-decay-start-step": (IMPLEMENTED, "quadratic decay start"),
    "--lr-num-decay-steps": (IMPLEMENTED, "quadratic decay length"),
}

# What --resume may change: how the run is watched and saved, not what it computes.
RESUME_MAY_CHANGE = {
    "resume",
    "nepochs",  # a finished run may go on for more epochs
    "save_model",
    "save_every",
    "save_every_minutes",
    "save_best",
    "no_progress",
    "print_freq",
    "print_wall_time",
    "threads",
    "debug",
    "debug_mode",
    "plot",
    "compare_reference",
    "enable_profiling",
    "dist_backend",
    "dist_timeout",
    "row_wise_tables",
    "a2a_precision",
}


class FlagError(Exception):
    """A flag's value breaks a rule; the message starts with the flag."""


class Parser(argparse.ArgumentParser):
    """argparse, with errors as one line (no usage block) and exit status 2."""

    def error(self, message: str):
        print(f"{self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def _int(rule: str, ok):
    def parse(s: str) -> int:
        try:
            n = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {s!r}") from None
        if not ok(n):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {n}")
        return n

    return parse


def _float(rule: str, ok):
    def parse(s: str) -> float:
        try:
            x = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {s!r}") from None
        if not math.isfinite(x) or not ok(x):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {s}")
        return x

    return parse


def _dashed(kind, rule: str, ok):
    def parse(s: str):
        try:
            xs = [kind(x) for x in s.split("-")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {kind.__name__}s joined by '-', got {s!r}"
            ) from None
        if not all(ok(x) for x in xs):
            raise argparse.ArgumentTypeError(f"every value must be {rule}, got {s!r}")
        return xs

    return parse


def _bool(s: str) -> bool:
    """dlrm's ``type=bool`` flags take any word; here only the clear ones."""
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"must be True or False, got {s!r}")


POSITIVE = _int("at least 1", lambda n: n >= 1)
NON_NEGATIVE = _int("at least 0", lambda n: n >= 0)


def _optimizer(s: str) -> str:
    name = {"rwsadagrad": "rowwise_adagrad"}.get(s, s)
    if name not in optimizers.OPTIMIZERS:
        raise argparse.ArgumentTypeError(
            f"must be one of {', '.join(sorted(optimizers.OPTIMIZERS) + ['rwsadagrad'])}, got {s!r}"
        )
    return name


class _Adder:
    """add_argument with the default shown in the help, or with no default at
    all (``explicit``: to learn which flags the user gave)."""

    def __init__(self, explicit: bool):
        self.explicit = explicit

    def __call__(self, group, *names, **kw):
        if self.explicit:
            kw["default"] = argparse.SUPPRESS
        elif "help" in kw and kw.get("default") not in (None, False):
            d = kw["default"]
            shown = "-".join(map(str, d)) if isinstance(d, list) else d
            kw["help"] += f" (default: {shown})"
        group.add_argument(*names, **kw)


def add_train_arguments(p: argparse.ArgumentParser, explicit: bool = False) -> None:
    add = _Adder(explicit)
    a = p.add_argument_group("model")
    add(a, "--arch-sparse-feature-size", type=POSITIVE, default=16, help="embedding dim")
    add(
        a,
        "--arch-embedding-size",
        type=_dashed(int, "at least 1", lambda n: n >= 1),
        default=None,
        help="rows per table, '-'-separated (default: 26 tables of 10 to 20k rows; "
        "with --data-generation dataset, from the data)",
    )
    layers = _dashed(int, "at least 1", lambda n: n >= 1)
    add(
        a,
        "--arch-mlp-bot",
        type=layers,
        default=[13, 512, 256, 64, 16],
        help="bottom MLP sizes: dense features first, --arch-sparse-feature-size last",
    )
    add(
        a,
        "--arch-mlp-top",
        type=layers,
        default=[512, 256, 1],
        help="top MLP sizes after the interaction, ending in 1",
    )
    add(a, "--arch-interaction-op", choices=["dot", "cat"], default="dot", help="interaction")
    add(a, "--arch-interaction-itself", action="store_true", help="dot: also each with itself")
    add(
        a,
        "--weighted-pooling",
        choices=["fixed", "learned"],
        default=None,
        help="per-row pooling weights: learned (trained) or fixed (ones)",
    )
    add(a, "--md-flag", action="store_true", help="mixed-dimension embeddings")
    add(a, "--md-threshold", type=NON_NEGATIVE, default=200, help="mixed dims above these rows")
    add(
        a,
        "--md-temperature",
        type=_float("at least 0", lambda x: x >= 0),
        default=0.3,
        help="mixed-dimension temperature (alpha)",
    )
    add(a, "--md-round-dims", action="store_true", help="mixed dims rounded to powers of two")
    add(a, "--qr-flag", action="store_true", help="quotient-remainder embeddings")
    add(a, "--qr-threshold", type=NON_NEGATIVE, default=200, help="split tables above these rows")
    add(a, "--qr-collisions", type=_int("at least 2", lambda n: n >= 2), default=4, help="QR rows")
    add(a, "--qr-operation", choices=["mult", "add", "concat"], default="mult", help="QR combine")
    add(a, "--activation-function", choices=["relu"], default="relu", help="MLP activation")
    add(
        a,
        "--embedding-precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="the tables' dtype (bf16: updated with stochastic rounding)",
    )
    add(
        a,
        "--max-ind-range",
        type=int,
        default=-1,
        help="hashing trick: at most this many rows per table, indices modulo it (<= 0: off)",
    )
    d = p.add_argument_group("data")
    add(
        d,
        "--data-generation",
        choices=["synthetic", "random", "dataset"],
        default="synthetic",
        help="synthetic: learnable built-in clicks with a known best AUC; random: "
        "dlrm's random data; dataset: Criteo logs",
    )
    add(d, "--data-set", choices=["kaggle", "terabyte"], default="kaggle", help="Criteo log")
    add(
        d,
        "--raw-data-file",
        nargs="*",
        default=None,
        help="raw TSV: Kaggle's train.txt, or Terabyte's day_0 .. day_23",
    )
    add(
        d,
        "--processed-data-file",
        default=None,
        help="folder of preprocessed arrays (default: the raw file's name + .processed)",
    )
    add(d, "--skip-malformed", action="store_true", help="count and skip bad raw lines")
    add(
        d,
        "--mlperf-bin-loader",
        action="store_true",
        help="read facebookresearch/dlrm's MLPerf binary files <processed name>_train.bin "
        "and _test.bin, table sizes from <raw file>_fea_count.npz",
    )
    add(d, "--mlperf-bin-shuffle", action="store_true", help="binary batches in random order")
    add(
        d,
        "--multi-hot-sizes",
        type=_multi_hot,
        default=None,
        help="every index of table t becomes a bag of this many (MLPerf DLRM-DCNv2 style): "
        "mlperf (its 26 sizes) or one size per table, e.g. 3,2,1",
    )
    add(
        d,
        "--data-randomize",
        choices=["total", "day", "window", "none"],
        default="total",
        help="Criteo training rows shuffled across days, within days, within windows of "
        "--shuffle-window rows, or not",
    )
    add(
        d,
        "--shuffle-window",
        type=POSITIVE,
        default=1 << 20,
        help="rows per window of --data-randomize window",
    )
    add(
        d,
        "--data-sub-sample-rate",
        type=_float("in [0, 1)", lambda x: 0 <= x < 1),
        default=0.0,
        help="Criteo: share of negative rows dropped",
    )
    add(
        d,
        "--data-size",
        type=NON_NEGATIVE,
        default=0,
        help="generated data: samples per epoch, when --num-batches is 0",
    )
    add(
        d,
        "--num-indices-per-lookup",
        type=POSITIVE,
        default=10,
        help="random data: (at most) indices per bag",
    )
    add(
        d,
        "--num-indices-per-lookup-fixed",
        type=_bool,
        nargs="?",
        const=True,
        default=False,
        help="random data: exactly --num-indices-per-lookup per bag",
    )
    add(d, "--rand-data-dist", choices=["uniform", "gaussian"], default="uniform", help="indices")
    for name, default in (("min", 0.0), ("max", 1.0), ("mu", -1.0), ("sigma", 1.0)):
        add(
            d,
            f"--rand-data-{name}",
            type=_float("a finite number", lambda x: True),
            default=default,
            help=f"gaussian random indices: {name}, as a fraction of the rows",
        )
    add(
        d,
        "--round-targets",
        type=_bool,
        nargs="?",
        const=True,
        default=False,
        help="random data: labels 0/1 (else uniform in [0, 1))",
    )
    t = p.add_argument_group("training")
    add(t, "--mini-batch-size", type=POSITIVE, default=256, help="samples per training batch")
    add(
        t,
        "--num-batches",
        type=NON_NEGATIVE,
        default=15000,
        help="batches per epoch; 0: all the data (generated data: --data-size)",
    )
    add(t, "--nepochs", type=POSITIVE, default=1, help="epochs")
    add(
        t,
        "--learning-rate",
        type=_float("above 0", lambda x: x > 0),
        default=0.1,
        help="learning rate",
    )
    add(
        t,
        "--optimizer",
        type=_optimizer,
        default="sgd",
        help="the tables' optimizer, fused into the backward; the MLPs get torch's SGD, "
        "Adagrad or Adam. rwsadagrad (dlrm's name) = rowwise_adagrad",
    )
    add(
        t,
        "--loss-function",
        choices=["bce", "mse", "wbce"],
        default="bce",
        help="binary cross-entropy, mean squared error of the probability, or "
        "BCE weighted by label",
    )
    add(
        t,
        "--loss-weights",
        type=_dashed(float, "at least 0", lambda x: x >= 0),
        default=[1.0, 1.0],
        help="wbce: weight of label 0 and of label 1",
    )
    add(
        t,
        "--loss-threshold",
        type=_float("in [0, 1)", lambda x: 0 <= x < 1),
        default=0.0,
        help="probabilities clamped to [t, 1-t] in the loss (0: off)",
    )
    add(t, "--lr-num-warmup-steps", type=NON_NEGATIVE, default=0, help="linear LR warmup")
    add(t, "--lr-decay-start-step", type=NON_NEGATIVE, default=0, help="LR decay start")
    add(t, "--lr-num-decay-steps", type=NON_NEGATIVE, default=0, help="quadratic LR decay steps")
    add(
        t,
        "--seed",
        "--numpy-rand-seed",
        dest="seed",
        type=int,
        default=123,
        help="seed of the weights and of generated data",
    )
    add(
        t,
        "--mlperf-grad-accum-iter",
        type=POSITIVE,
        default=1,
        help="batches whose gradients are summed per optimizer step",
    )
    add(t, "--inference-only", action="store_true", help="evaluate --load-model's model only")
    _add_common(p, add, training=True)
    s = p.add_argument_group("checkpoints")
    add(
        s,
        "--save-model",
        default=None,
        help="checkpoint written at the end, every --save-every, and on Ctrl-C or SIGTERM",
    )
    add(s, "--save-every", type=NON_NEGATIVE, default=0, help="batches between saves (0: off)")
    add(
        s,
        "--save-every-minutes",
        type=_float("at least 0", lambda x: x >= 0),
        default=0.0,
        help="minutes between saves (0: off)",
    )
    add(s, "--save-best", default=None, help="checkpoint written whenever test AUC improves")
    add(s, "--load-model", default=None, help="start from this checkpoint's model and optimizer")
    add(s, "--resume", default=None, help="continue this checkpoint's run where it stopped")
    r = p.add_argument_group("reporting")
    add(r, "--print-freq", type=POSITIVE, default=1000, help="batches between loss lines")
    add(
        r,
        "--test-freq",
        type=int,
        default=5000,
        help="batches between evaluations (<= 0: at the end only)",
    )
    add(r, "--print-wall-time", action="store_true", help="wall-clock time on loss lines")
    add(r, "--plot", default=None, help="write a loss/AUC plot to this PNG (needs matplotlib)")
    add(
        r,
        "--compare-reference",
        type=NON_NEGATIVE,
        default=30,
        help="after training, a separate race: this many steps of this DLRM against the "
        "pure-PyTorch reference (0: skip)",
    )
    add(r, "--enable-profiling", action="store_true", help="torch.profiler table of training")
    add(r, "--mlperf-acc-threshold", type=_unit, default=0.0, help="stop at this test accuracy")
    add(r, "--mlperf-auc-threshold", type=_unit, default=0.0, help="stop at this test AUC")
    c = p.add_argument_group(
        "facebookresearch/dlrm flags accepted for compatibility (no effect here)"
    )
    for flag, (what, why) in DLRM_FLAGS.items():
        if what != IMPLEMENTED:
            kind = _IGNORED_KINDS.get(flag, {"nargs": "?", "const": True})
            add(c, flag, help=why, default=None, **kind)


_IGNORED_KINDS = {
    "--memory-map": {"action": "store_true"},
    "--print-time": {"action": "store_true"},
    "--dataset-multiprocessing": {"action": "store_true"},
    "--plot-compute-graph": {"action": "store_true"},
    "--save-onnx": {"action": "store_true"},
}


def _words_or_ints(words, example: str, what: str, minimum: int):
    """An argparse type: one of ``words``, or comma-separated integers of at
    least ``minimum`` (a list)."""

    def parse(s: str):
        if s in words:
            return s
        try:
            values = [int(x) for x in s.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {', '.join(words)} or {what} such as {example}, got {s!r}"
            ) from None
        if any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"{what} must be >= {minimum}, got {s!r}")
        return values

    return parse


_multi_hot = _words_or_ints(("mlperf",), "3,2,1", "sizes", 1)
_row_wise = _words_or_ints(("auto", "none", "all"), "2,7", "table ids", 0)


def _unit(s: str) -> float:
    return _float("in [0, 1]", lambda x: 0 <= x <= 1)(s)


def _add_common(p, add, training: bool) -> None:
    e = p.add_argument_group("evaluation and running")
    add(
        e,
        "--test-mini-batch-size",
        type=_int("-1 or at least 1", lambda n: n == -1 or n >= 1),
        default=1024 if training else None,
        help="samples per evaluation batch (-1: --mini-batch-size)"
        + ("" if training else " (default: the checkpoint's)"),
    )
    add(
        e,
        "--num-test-batches",
        type=NON_NEGATIVE,
        default=0 if training else None,
        help="evaluation batches (0: the whole test split; generated data: 40)"
        + ("" if training else " (default: the checkpoint's)"),
    )
    add(
        e,
        "--quantize-emb-with-bit",
        type=int,
        choices=[4, 8, 32],
        default=32,
        help="also evaluate with the tables quantized to 8 or 4 bits (32: no)",
    )
    add(
        e,
        "--quantize-mlp-with-bit",
        type=int,
        choices=[8, 16, 32],
        default=32,
        help="evaluate with the MLPs dynamically quantized to int8 or fp16 (32: no)",
    )
    add(e, "--mlperf-logging", action="store_true", help=":::MLLOG lines, precision/recall/F1/AP")
    add(e, "--print-precision", type=NON_NEGATIVE, default=5, help="digits of printed metrics")
    add(
        e,
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: the MLPs' GEMMs and the interaction in bf16, fp32 master weights "
        "(fp32 is kept, with a note, on CPUs without native bf16)",
    )
    add(e, "--force-precision", action="store_true", help="bf16 even without native bf16")
    add(e, "--threads", type=POSITIVE, default=None, help="CPU threads (default: torch's)")
    add(e, "--device", choices=["cpu", "cuda"], default="cpu", help="where the model runs")
    add(e, "--use-gpu", action="store_true", help="same as --device cuda")
    add(
        e,
        "--check",
        choices=list(CHECKS),
        default="deferred",
        help="when a bad lookup on the GPU is reported (docs/errors.md): deferred raises at the "
        "next loss line, immediate at the call (the host waits every call), warn warns, off never",
    )
    if training:
        add(
            e,
            "--cuda-graph",
            action="store_true",
            help="replay the training step from a CUDA graph (--device cuda, one process, no lr "
            "schedule, no gradient accumulation; batches of another shape run eagerly)",
        )
    add(e, "--no-progress", action="store_true", help="no progress bar")
    add(e, "--debug", "--debug-mode", dest="debug", action="store_true", help="full tracebacks")
    g = p.add_argument_group(
        "hybrid parallel (under torchrun: tables sharded over ranks, MLPs data parallel)"
    )
    add(
        g,
        "--dist-backend",
        choices=["", "gloo", "nccl"],
        default="",
        help="torch.distributed backend: gloo (CPU) or nccl (GPU); default: gloo, or nccl "
        "with --device cuda, when torchrun starts several processes",
    )
    add(
        g,
        "--dist-timeout",
        type=POSITIVE,
        default=300,
        help="seconds a collective may wait for a rank before the job fails",
    )
    add(
        g,
        "--row-wise-tables",
        type=_row_wise,
        default="auto",
        help="tables cut over all ranks by rows: auto (those above an even share of "
        "the memory), none, all, or table ids such as 2,7",
    )
    add(
        g,
        "--a2a-precision",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="payload of the all-to-alls of pooled vectors and their gradients",
    )


def add_evaluate_arguments(p: argparse.ArgumentParser, explicit: bool = False) -> None:
    add = _Adder(explicit)
    add(p, "--load-model", required=not explicit, default=None, help="the checkpoint to evaluate")
    d = p.add_argument_group("data (default: what the checkpoint was trained on)")
    add(
        d,
        "--data-generation",
        choices=["synthetic", "random", "dataset"],
        default=None,
        help="synthetic, random or dataset",
    )
    add(d, "--data-set", choices=["kaggle", "terabyte"], default=None, help="Criteo log")
    add(d, "--raw-data-file", nargs="*", default=None, help="raw Criteo TSV file(s)")
    add(d, "--processed-data-file", default=None, help="folder of preprocessed arrays")
    add(d, "--skip-malformed", action="store_true", help="count and skip bad raw lines")
    add(
        d,
        "--data-sub-sample-rate",
        type=_float("in [0, 1)", lambda x: 0 <= x < 1),
        default=None,
        help="Criteo: share of negative rows dropped",
    )
    _add_common(p, add, training=False)


def distributed(args) -> bool:
    """Whether this run is hybrid parallel: --dist-backend given, or torchrun
    started several processes."""
    return bool(args.dist_backend) or int(os.environ.get("WORLD_SIZE", "1")) > 1


def _check_distributed(args, given: set) -> None:
    if not distributed(args):
        return
    if "RANK" not in os.environ:
        raise FlagError(
            f"--dist-backend {args.dist_backend}: start the processes with torchrun, e.g. "
            f"torchrun --nproc-per-node 2 -m dlrm_ops train --dist-backend {args.dist_backend}"
        )
    cuda = args.device == "cuda"
    args.dist_backend = args.dist_backend or ("nccl" if cuda else "gloo")
    if args.dist_backend == "nccl" and not cuda:
        raise FlagError("--dist-backend nccl: needs --device cuda (gloo runs on the CPU)")
    refused = {
        "qr_flag": ("quotient-remainder tables", lambda v: bool(v)),
        "mlperf_grad_accum_iter": ("gradient accumulation", lambda v: v > 1),
        "quantize_emb_with_bit": ("evaluation with quantized tables", lambda v: v != 32),
        "quantize_mlp_with_bit": ("evaluation with quantized MLPs", lambda v: v != 32),
    }
    for dest, (what, used) in refused.items():
        value = getattr(args, dest, None)
        if value is not None and used(value):
            raise FlagError(
                f"{_flag_name(dest)}: {what} run in one process only, not with --dist-backend"
            )
    if getattr(args, "weighted_pooling", None) == "learned":
        raise FlagError(
            "--weighted-pooling learned: per-row weights run in one process only, "
            "not with --dist-backend"
        )


def _flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def explicit_flags(build, argv: List[str]) -> set:
    """The dests of the flags ``argv`` gives."""
    p = Parser(add_help=False)
    build(p, explicit=True)
    ns, _ = p.parse_known_args(argv)
    return set(vars(ns))


def check(args, given: set) -> None:
    """Rules between flags and against the file system; raises FlagError."""
    if getattr(args, "use_gpu", False):
        args.device = "cuda"
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            flag = "--use-gpu" if "use_gpu" in given else "--device cuda"
            raise FlagError(f"{flag}: no CUDA GPU is available here")
    if args.test_mini_batch_size == -1:
        args.test_mini_batch_size = getattr(args, "mini_batch_size", None) or 1024
    if getattr(args, "plot", None):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise FlagError("--plot needs matplotlib: pip install matplotlib") from None
    _check_data_files(args)
    _check_distributed(args, given)
    if getattr(args, "cuda_graph", False):
        for refused, why in (
            (args.device != "cuda", "it needs --device cuda"),
            (distributed(args), "it runs in one process"),
            (
                args.lr_num_warmup_steps or args.lr_num_decay_steps,
                "the captured step cannot follow an lr schedule",
            ),
            (
                args.mlperf_grad_accum_iter > 1,
                "gradients accumulated over batches are not captured",
            ),
        ):
            if refused:
                raise FlagError(f"--cuda-graph: {why}")
    if args.mlperf_grad_accum_iter > 1 and args.optimizer not in ("sgd", "adagrad", "adam"):
        raise FlagError(
            f"--mlperf-grad-accum-iter {args.mlperf_grad_accum_iter}: accumulated gradients go "
            f"through torch.optim, which has no {args.optimizer}; use sgd, adagrad or adam"
        )
    if args.inference_only and not args.load_model:
        raise FlagError("--inference-only needs --load-model (there is no trained model to run)")
    if args.resume and args.load_model:
        raise FlagError("--resume and --load-model exclude each other")
    D = args.arch_sparse_feature_size
    if args.arch_mlp_bot[-1] != D:
        raise FlagError(
            f"--arch-mlp-bot must end in --arch-sparse-feature-size ({D}), got "
            f"{'-'.join(map(str, args.arch_mlp_bot))}"
        )
    if len(args.arch_mlp_bot) < 2 or len(args.arch_mlp_top) < 1:
        raise FlagError("--arch-mlp-bot needs at least two sizes")
    if args.arch_mlp_top[-1] != 1:
        raise FlagError(
            f"--arch-mlp-top must end in 1, got {'-'.join(map(str, args.arch_mlp_top))}"
        )
    if args.data_generation == "dataset" and args.arch_mlp_bot[0] != 13:
        raise FlagError(
            f"--arch-mlp-bot must start with 13 for the Criteo logs (13 dense features), got "
            f"{'-'.join(map(str, args.arch_mlp_bot))}"
        )
    if args.qr_flag and args.md_flag:
        raise FlagError("--qr-flag and --md-flag exclude each other")
    if args.qr_flag and args.qr_operation == "concat" and D % 2:
        raise FlagError(f"--qr-operation concat needs an even --arch-sparse-feature-size, got {D}")
    if args.loss_function == "wbce" and len(args.loss_weights) != 2:
        raise FlagError(
            f"--loss-weights needs two values (label 0-label 1), got {args.loss_weights}"
        )
    if args.lr_num_decay_steps and args.lr_decay_start_step < args.lr_num_warmup_steps:
        raise FlagError(
            f"--lr-decay-start-step ({args.lr_decay_start_step}) must not come before the end "
            f"of --lr-num-warmup-steps ({args.lr_num_warmup_steps})"
        )
    if args.rand_data_min >= args.rand_data_max:
        raise FlagError(
            f"--rand-data-min ({args.rand_data_min}) must be below --rand-data-max "
            f"({args.rand_data_max})"
        )
    if args.rand_data_sigma <= 0:
        raise FlagError(f"--rand-data-sigma must be above 0, got {args.rand_data_sigma}")
    if args.data_generation != "dataset" and not args.num_batches and not args.data_size:
        raise FlagError("--num-batches 0 means all the data: generated data then needs --data-size")
    for flag in ("save_model", "save_best"):
        path = getattr(args, flag)
        if path:
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                raise FlagError(f"--{flag.replace('_', '-')} {path}: no folder {folder}")


def _check_data_files(args) -> None:
    if getattr(args, "mlperf_bin_loader", False) and args.data_generation == "dataset":
        from .data.mlperf_bin import bin_files

        if not args.processed_data_file or not args.raw_data_file:
            raise FlagError(
                "--mlperf-bin-loader needs --processed-data-file and --raw-data-file "
                "(dlrm names the binary files after them)"
            )
        for f in bin_files(args.processed_data_file, args.raw_data_file[0]):
            if not f.is_file():
                raise FlagError(
                    f"--mlperf-bin-loader: no {f} (made by facebookresearch/dlrm's "
                    "preprocessing; without the flag the raw logs are preprocessed here)"
                )
        return
    for f in args.raw_data_file or []:
        if not os.path.isfile(f):
            raise FlagError(f"--raw-data-file {f}: no such file")
    processed = args.processed_data_file
    if processed and processed.endswith(".npz"):
        # facebookresearch/dlrm's scripts name a .npz file; the arrays here
        # live in a folder beside it.
        folder = processed[: -len(".npz")] + ".dlrm_ops"
        print(
            f"note: --processed-data-file {processed}: dlrm_ops keeps memory-mapped arrays in "
            f"the folder {folder}",
            file=sys.stderr,
        )
        args.processed_data_file = processed = folder
    if processed and os.path.exists(processed) and not os.path.isdir(processed):
        raise FlagError(f"--processed-data-file {processed}: is a file, not a folder")
    if args.data_generation == "dataset" and not args.raw_data_file:
        if not processed:
            raise FlagError(
                "--data-generation dataset needs --raw-data-file or --processed-data-file"
            )
        if not os.path.isfile(os.path.join(processed, "meta.json")):
            raise FlagError(
                f"--processed-data-file {processed}: no preprocessed data there "
                "(give --raw-data-file to make it)"
            )


def ignored_note(given: set) -> Optional[str]:
    """One line naming the dlrm flags given that have no effect here."""
    names = [f for f, (what, _) in DLRM_FLAGS.items() if what == IGNORED and _dest(f) in given]
    if not names:
        return None
    return "note: accepted for facebookresearch/dlrm compatibility, no effect here: " + ", ".join(
        names
    )


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")
