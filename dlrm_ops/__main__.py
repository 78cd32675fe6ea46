"""Command line: ``python -m dlrm_ops {train,evaluate,benchmark,info}``."""

import argparse
import json
import sys

import torch


def _positive(s: str) -> int:
    n = int(s)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _ints(s: str):
    return [int(x) for x in s.split(",")]


def cmd_info(args) -> int:
    import dlrm_ops

    print(json.dumps(dlrm_ops.build_info(), indent=2))
    return 0


def cmd_preprocess(args) -> int:
    import os
    import time

    from .data import MalformedLineError, preprocess_criteo

    for f in args.raw_data_file:
        if not os.path.isfile(f):
            print(
                f"python -m dlrm_ops preprocess: --raw-data-file {f}: no such file", file=sys.stderr
            )
            return 2
    if args.vocabulary_memory is not None and args.vocabulary_memory < 1:
        print(
            "python -m dlrm_ops preprocess: --vocabulary-memory must be at least 1 (MiB), "
            f"got {args.vocabulary_memory}",
            file=sys.stderr,
        )
        return 2
    t0 = time.perf_counter()
    try:
        meta = preprocess_criteo(
            args.raw_data_file,
            args.processed_data_file,
            args.data_set,
            args.max_ind_range if args.max_ind_range > 0 else None,
            args.skip_malformed,
            threads=args.threads,
            progress=not args.no_progress,
            vocabulary=args.vocabulary,
            min_count=args.min_count,
            vocabulary_memory=args.vocabulary_memory and args.vocabulary_memory << 20,
        )
    except ValueError as e:  # MalformedLineError included
        print(f"python -m dlrm_ops preprocess: {e}", file=sys.stderr)
        return 1 if isinstance(e, MalformedLineError) else 2
    seconds = time.perf_counter() - t0
    lines = sum(meta["days"].values()) + meta["skipped"]
    size = sum(os.path.getsize(f) for f in args.raw_data_file)
    passes = meta.get("vocabulary_passes")
    through_disk = (
        f" (vocabularies: {passes['scans']} scans, {passes['id_passes']} passes writing ids)"
        if passes
        else ""
    )
    print(
        f"{lines:,} lines ({meta['skipped']} skipped) in {seconds:.1f} s: "
        f"{lines / seconds:,.0f} lines/s, {size / seconds / 1e6:,.0f} MB/s; "
        f"written to {args.processed_data_file}{through_disk}"
    )
    return 0


def cmd_benchmark(args, argv=None) -> int:
    from . import benchmark

    if args.device == "cuda":
        from . import benchmark_cuda

        if not torch.cuda.is_available():
            print("--device cuda: no CUDA GPU here", file=sys.stderr)
            return 2
        print(
            f"{torch.cuda.get_device_name()}, {args.tables} tables x {args.rows} rows, Zipf "
            "indices, fp32; dlrm_ops x = other's time / dlrm_ops' time",
            flush=True,
        )
        res = benchmark_cuda.run_all(args.ops, args.tables, args.rows, args.batch)
        benchmark.print_table(res)
        _write(args, res, argv)
        return 0
    threads = args.threads or sorted({1, torch.get_num_threads()})
    dtype = getattr(torch, args.dtype)
    args.distinct_batches = args.distinct_batches or benchmark.DISTINCT_BATCHES
    print(
        f"table-batched embedding bag, {args.tables} tables x {args.rows} rows, "
        f"Zipf indices, {args.distinct_batches} distinct batches in turn, {dtype}; "
        "dlrm_ops x = other's time / dlrm_ops' time",
        flush=True,
    )
    res = []
    if "forward" in args.ops:
        res += benchmark.run_embedding_bag(
            args.tables,
            args.rows,
            args.dims,
            args.batch,
            args.lengths,
            threads,
            dtype,
            args.min_time,
            args.distinct_batches,
        )
    if "train" in args.ops:
        res += benchmark.run_training(
            args.tables,
            args.rows,
            args.dims,
            args.batch,
            args.lengths,
            threads,
            args.optimizers,
            args.dense,
            args.min_time,
            args.distinct_batches,
        )
    if "quantized" in args.ops:
        res += benchmark.run_quantized(
            args.tables,
            args.rows,
            args.dims,
            args.batch,
            args.lengths,
            threads,
            [8, 4],
            args.min_time,
            args.distinct_batches,
        )
        res += benchmark.run_quantize(args.quantize_rows, 128, threads, args.min_time)
    if "dlrm" in args.ops:
        from .precision import native_bf16

        bf16 = native_bf16() if args.dlrm_bf16 is None else args.dlrm_bf16
        res += benchmark.run_dlrm(
            args.dlrm_configs, args.rows, args.batch, threads, args.min_time, bf16=bf16
        )
    if "interaction" in args.ops:
        res += benchmark.run_interaction(
            args.interaction_batches, args.tables, args.interaction_dims, threads, args.min_time
        )
    benchmark.print_table(res)
    if "preprocess" in args.ops:
        from . import benchmark_criteo

        print(
            f"\nCriteo preprocessing, hashed and with vocabularies, "
            f"{args.preprocess_lines:,} generated lines",
            flush=True,
        )
        pre = benchmark_criteo.run(args.preprocess_lines, threads)
        spilled = args.kaggle_vocabulary_memory and benchmark_criteo.kaggle_vocabulary_spilled(
            args.kaggle_vocabulary_memory, max(threads)
        )
        vocab = benchmark_criteo.kaggle_vocabulary(max(threads))
        benchmark_criteo.print_table(pre, vocab, spilled)
        benchmark_criteo.print_batches(benchmark_criteo.batch_speed())
    if "dropin" in args.ops:
        from . import benchmark_dropin

        print(
            "\nyour own model: a facebookresearch/dlrm-style DLRM (ModuleList of "
            "nn.EmbeddingBag, bmm interaction, torch.optim.SGD), train step",
            flush=True,
        )
        drop = benchmark_dropin.run(args.dropin_configs, threads)
        benchmark_dropin.print_table(drop)
        res += drop
    _write(args, res, argv)
    return 0


def _write(args, res, argv) -> None:
    from . import benchmark

    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.markdown:
        command = "python -m dlrm_ops " + " ".join(sys.argv[1:] if argv is None else argv)
        benchmark.write_markdown(args.markdown, res, command)
        print(f"\nwritten to {args.markdown}")


def main(argv=None) -> int:
    from . import flags

    argv = sys.argv[1:] if argv is None else list(argv)
    p = flags.Parser(prog="python -m dlrm_ops")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="build information: version, torch, CPU ISA, CUDA")
    b = sub.add_parser("benchmark", help="kernels against PyTorch (and FBGEMM if installed)")
    b.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cuda: the CUDA kernels at fixed shapes (26 tables, B=2048; --rows, "
        "--ops, --batch apply)",
    )
    b.add_argument(
        "--dropin-configs",
        type=lambda s: s.split(","),
        default=["kaggle", "multi-hot"],
        help="for --ops dropin: kaggle, multi-hot (dlrm_ops/benchmark_dropin.py)",
    )
    b.add_argument("--tables", type=int, default=26)
    b.add_argument("--rows", type=int, default=100_000, help="rows per table (Kaggle: 500000)")
    b.add_argument("--dims", type=_ints, default=[64, 128])
    b.add_argument("--batch", type=int, default=2048)
    b.add_argument("--lengths", type=_ints, default=[1, 20], help="indices per bag")
    b.add_argument(
        "--distinct-batches",
        type=_positive,
        default=None,
        help="index batches every contender cycles through, so rows come cold from "
        "memory as in training (default 16); 1 repeats one batch, whose rows "
        "stay cached",
    )
    b.add_argument("--threads", type=_ints, default=None, help="default: 1 and all")
    b.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    b.add_argument("--min-time", type=float, default=0.3, help="seconds per measurement")
    b.add_argument(
        "--ops",
        type=lambda s: s.split(","),
        default=["forward", "train", "interaction", "quantized", "dlrm", "dropin"],
        help="comma list of: forward (pooled lookup), train (fwd+bwd+fused update), "
        "interaction (dot interaction fwd and fwd+bwd), quantized (int8/int4 "
        "lookups and quantization), dlrm (model train step and inference; "
        "the GB/s column then holds M samples/s), dropin (a user's own "
        "dlrm-style model stock, converted, and with the optimizer in the backward), "
        "preprocess (Criteo preprocessing: native parser against the Python reference)",
    )
    b.add_argument("--dlrm-configs", type=lambda s: s.split(","), default=["kaggle", "mlperf"])
    b.add_argument(
        "--dlrm-bf16",
        type=lambda s: s.lower() in ("1", "true", "yes"),
        default=None,
        help="for --ops dlrm: also bf16 rows (default: where the CPU has native bf16)",
    )
    b.add_argument(
        "--quantize-rows",
        type=int,
        default=1_000_000,
        help="rows of the D=128 table the quantization speed is measured on",
    )
    b.add_argument("--interaction-batches", type=_ints, default=[2048, 8192])
    b.add_argument("--interaction-dims", type=_ints, default=[16, 64, 128])
    b.add_argument(
        "--optimizers",
        type=lambda s: s.split(","),
        default=["sgd", "rowwise_adagrad"],
        help="for train: names of dlrm_ops.optimizers.OPTIMIZERS",
    )
    b.add_argument(
        "--dense",
        action="store_true",
        help="train: also time dense gradients + SGD (a dense gradient of every "
        "table: 3.3 GB more at 26 x 500k x 64)",
    )
    b.add_argument(
        "--preprocess-lines",
        type=int,
        default=5_000_000,
        help="for --ops preprocess: lines of the generated Criteo-format file",
    )
    b.add_argument(
        "--kaggle-vocabulary-memory",
        type=int,
        default=None,
        metavar="MIB",
        help="for --ops preprocess: also number Kaggle-size vocabularies through the disk in "
        "this many MiB (19 GB of temporary files, minutes)",
    )
    b.add_argument("--json", help="also write the results here")
    b.add_argument(
        "--markdown",
        help="also write the results here as markdown tables, with the machine and this command",
    )
    pre = sub.add_parser(
        "preprocess",
        help="raw Criteo logs to memory-mapped arrays (native and multi-threaded with hashing)",
    )
    pre.add_argument("--raw-data-file", nargs="+", required=True, help="raw TSV file(s)")
    pre.add_argument("--processed-data-file", required=True, help="output folder")
    pre.add_argument("--data-set", choices=["kaggle", "terabyte"], default="kaggle")
    pre.add_argument(
        "--max-ind-range",
        type=int,
        default=-1,
        help="hash categories modulo this (<= 0: per-column vocabularies, in Python)",
    )
    pre.add_argument(
        "--vocabulary",
        choices=["first", "frequency"],
        default="first",
        help="without --max-ind-range: category ids by first appearance, or by count "
        "(a second pass)",
    )
    pre.add_argument(
        "--min-count",
        type=int,
        default=1,
        help="--vocabulary frequency: categories seen fewer times share id 0 with empty ones",
    )
    pre.add_argument(
        "--vocabulary-memory",
        type=int,
        default=None,
        metavar="MIB",
        help="without --max-ind-range: build the vocabularies through the disk in this many MiB "
        "(for more categories than memory holds; the same ids, more passes)",
    )
    pre.add_argument("--skip-malformed", action="store_true", help="count and skip bad lines")
    pre.add_argument("--threads", type=int, default=None, help="parser threads (default: all)")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    fmt = argparse.RawDescriptionHelpFormatter
    tr = sub.add_parser(
        "train",
        help="train a DLRM (default: built-in synthetic data)",
        description="Train a DLRM. Takes facebookresearch/dlrm's dlrm_s_pytorch.py flags "
        "(docs/command-line.md lists what each does here).",
        formatter_class=fmt,
    )
    flags.add_train_arguments(tr)
    ev = sub.add_parser(
        "evaluate",
        help="evaluate a checkpoint (the model is rebuilt from it alone)",
        description="Evaluate a checkpoint on its test data (or the data given here).",
        formatter_class=fmt,
    )
    flags.add_evaluate_arguments(ev)
    args = p.parse_args(argv)
    if args.cmd == "preprocess":
        return cmd_preprocess(args)
    if args.cmd not in ("train", "evaluate"):
        return cmd_info(args) if args.cmd == "info" else cmd_benchmark(args, argv)
    build = flags.add_train_arguments if args.cmd == "train" else flags.add_evaluate_arguments
    given = flags.explicit_flags(build, argv[argv.index(args.cmd) + 1 :])
    debug = args.debug
    try:
        from . import train

        return train.run(args, given, args.cmd)
    except flags.FlagError as e:
        print(f"python -m dlrm_ops {args.cmd}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(
            f"python -m dlrm_ops {args.cmd}: {type(e).__name__}: {e} (--debug shows where)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
