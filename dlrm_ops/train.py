"""``python -m dlrm_ops train`` / ``evaluate``: DLRM training and evaluation
with facebookresearch/dlrm's command-line flags."""

import argparse
import copy
import os
import time
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from . import checkpoint, optimizers, reference
from .data import CriteoDataset, RandomData, SyntheticData, preprocess_criteo
from .models import DLRM
from .nn import quantize

# 26 tables from 10 to 20k rows: big enough to need the embeddings, small
# enough that the built-in synthetic data trains in about two minutes.
DEFAULT_TABLES = [int(round(10 ** (1 + 3.3 * i / 25))) for i in range(26)]


def _dashed(s: str) -> List[int]:
    return [int(x) for x in s.split("-")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument_group("model (facebookresearch/dlrm flags)")
    a.add_argument("--arch-sparse-feature-size", type=int, default=16)
    a.add_argument(
        "--arch-embedding-size",
        type=_dashed,
        default=None,
        help="rows per table, dash-separated (default: 26 tables of 10..20k rows; "
        "from the data for --data-generation dataset)",
    )
    a.add_argument("--arch-mlp-bot", type=_dashed, default=_dashed("13-512-256-64-16"))
    a.add_argument("--arch-mlp-top", type=_dashed, default=_dashed("512-256-1"))
    a.add_argument("--arch-interaction-op", choices=["dot", "cat"], default="dot")
    a.add_argument("--arch-interaction-itself", action="store_true")
    a.add_argument(
        "--max-ind-range", type=int, default=-1, help="hashing trick: rows per table cap"
    )
    a.add_argument("--qr-flag", action="store_true", help="quotient-remainder embeddings")
    a.add_argument("--qr-collisions", type=int, default=4)
    a.add_argument("--qr-operation", choices=["mult", "add", "concat"], default="mult")
    d = p.add_argument_group("data")
    d.add_argument(
        "--data-generation", choices=["random", "synthetic", "dataset"], default="synthetic"
    )
    d.add_argument("--data-set", choices=["kaggle", "terabyte"], default="kaggle")
    d.add_argument(
        "--raw-data-file",
        nargs="*",
        default=None,
        help="raw TSV: Kaggle's train.txt, or Terabyte's day_0 .. day_23",
    )
    d.add_argument("--processed-data-file", default=None, help="folder of preprocessed arrays")
    d.add_argument("--skip-malformed", action="store_true", help="count and skip bad raw lines")
    d.add_argument("--num-indices-per-lookup", type=int, default=10)
    d.add_argument("--num-indices-per-lookup-fixed", action="store_true")
    t = p.add_argument_group("training")
    t.add_argument("--mini-batch-size", type=int, default=256)
    t.add_argument("--test-mini-batch-size", type=int, default=1024)
    t.add_argument("--num-batches", type=int, default=15000, help="per epoch; 0: the whole data")
    t.add_argument("--num-test-batches", type=int, default=40)
    t.add_argument("--nepochs", type=int, default=1)
    t.add_argument("--learning-rate", type=float, default=0.1)
    t.add_argument(
        "--optimizer",
        choices=sorted(optimizers.OPTIMIZERS),
        default="sgd",
        help="embeddings use it fused into the backward; MLPs use torch's SGD, Adagrad or Adam",
    )
    t.add_argument("--loss-function", choices=["bce"], default="bce")
    t.add_argument("--print-freq", type=int, default=1000)
    t.add_argument("--test-freq", type=int, default=5000)
    t.add_argument("--seed", type=int, default=123)
    t.add_argument("--save-model", default=None)
    t.add_argument("--load-model", default=None)
    t.add_argument("--inference-only", action="store_true")
    t.add_argument(
        "--quantize-emb-with-bit",
        type=int,
        choices=[8, 4],
        default=None,
        help="also evaluate with embedding tables quantized to this many bits",
    )
    t.add_argument("--plot", default=None, help="write a loss/AUC plot to this PNG")
    t.add_argument(
        "--compare-reference",
        type=int,
        default=30,
        help="train steps timed against the pure-PyTorch reference DLRM (0: skip)",
    )
    t.add_argument("--no-progress", action="store_true")


def build_data(args):
    """(train iterable, test batches, table sizes, planted-ceiling AUC or None)."""
    B, TB = args.mini_batch_size, args.test_mini_batch_size
    if args.data_generation == "dataset":
        processed = args.processed_data_file
        if processed is None:
            if not args.raw_data_file:
                raise SystemExit(
                    "--data-generation dataset needs --raw-data-file or --processed-data-file"
                )
            processed = args.raw_data_file[0] + ".processed"
        if not os.path.exists(os.path.join(processed, "meta.json")) or args.raw_data_file:
            if args.raw_data_file:
                meta = preprocess_criteo(
                    args.raw_data_file,
                    processed,
                    args.data_set,
                    args.max_ind_range if args.max_ind_range > 0 else None,
                    args.skip_malformed,
                )
                if meta["skipped"]:
                    print(f"skipped {meta['skipped']} malformed lines")
        nb = args.num_batches or None
        train = CriteoDataset(processed, "train", B, nb)
        test = list(CriteoDataset(processed, "test", TB, args.num_test_batches))
        return train, test, train.table_sizes, None
    tables = args.arch_embedding_size or DEFAULT_TABLES
    if args.data_generation == "random":
        train = RandomData(
            tables,
            args.arch_mlp_bot[0],
            B,
            args.num_batches,
            args.num_indices_per_lookup,
            args.num_indices_per_lookup_fixed,
            args.seed,
        )
        test = [
            RandomData(
                tables,
                args.arch_mlp_bot[0],
                TB,
                args.num_test_batches,
                args.num_indices_per_lookup,
                args.num_indices_per_lookup_fixed,
                args.seed + 1,
            ).batch(i)
            for i in range(args.num_test_batches)
        ]
        return train, test, tables, None
    data = SyntheticData(tables, args.arch_mlp_bot[0], B, args.num_batches, seed=args.seed)
    test_data = SyntheticData(
        tables, args.arch_mlp_bot[0], TB, args.num_test_batches, seed=args.seed
    )
    return (
        data,
        test_data.test_batches(args.num_test_batches),
        tables,
        test_data.ceiling_auc(args.num_test_batches),
    )


def build_model(args, tables) -> DLRM:
    return DLRM(
        tables,
        args.arch_sparse_feature_size,
        args.arch_mlp_bot,
        args.arch_mlp_top,
        interaction=args.arch_interaction_op,
        self_interaction=args.arch_interaction_itself,
        embedding_optimizer=args.optimizer,
        embedding_lr=args.learning_rate,
        max_ind_range=args.max_ind_range if args.max_ind_range > 0 else None,
        qr_collisions=args.qr_collisions if args.qr_flag else 0,
        qr_operation=args.qr_operation,
    )


def dense_optimizer(args, params):
    """The torch.optim class of the embeddings' optimizer (dlrm_ops.optimizers)."""
    return optimizers.spec(args.optimizer).dense(params, lr=args.learning_rate)


@torch.no_grad()
def evaluate(model, batches) -> dict:
    model.eval()
    probs, labels = [], []
    for b in batches:
        probs.append(torch.sigmoid(model(b.dense, b.indices, b.offsets)))
        labels.append(b.labels)
    model.train()
    p = torch.cat(probs).double().clamp(1e-7, 1 - 1e-7)
    y = torch.cat(labels).double()
    logloss = float(F.binary_cross_entropy(p, y))
    acc = float(((p > 0.5).double() == y).double().mean())
    auc = (
        float(roc_auc_score(y.numpy(), p.numpy())) if 0 < float(y.sum()) < len(y) else float("nan")
    )
    return {"logloss": logloss, "accuracy": acc, "auc": auc, "samples": len(y)}


def save_checkpoint(path: str, model, optimizer, step: int, args) -> None:
    checkpoint.save(
        path,
        model.state_dict(),
        optimizer.state_dict(),
        step,
        {k: v for k, v in vars(args).items() if k != "func"},
    )


def compare_with_reference(args, model, tables, data, steps: int) -> Optional[dict]:
    """Train-step throughput of this DLRM and of the pure-PyTorch reference
    on the same batches (the reference starts from a copy of our weights)."""
    if args.qr_flag or args.max_ind_range > 0:
        return None
    batches = (
        [data.batch(i) for i in range(steps)]
        if hasattr(data, "batch")
        else [b for _, b in zip(range(steps), data)]
    )
    ours = copy.deepcopy(model)
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
    return {name: len(batches) * batches[0].size / t for name, t in best.items()}


def plot(path: str, losses, evals) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot([s for s, _ in losses], [l for _, l in losses])
    ax[0].set(xlabel="batch", ylabel="train loss (BCE)", title="training loss")
    ax[1].plot([s for s, _ in evals], [e["auc"] for _, e in evals], marker="o")
    ax[1].set(xlabel="batch", ylabel="test ROC AUC", title="test AUC")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args) -> int:
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    train, test, tables, ceiling = build_data(args)
    model = build_model(args, tables)
    opt = dense_optimizer(args, model.dense_parameters())
    step = 0
    if args.load_model:
        try:
            ckpt = checkpoint.load(args.load_model)
        except checkpoint.CheckpointError as e:
            raise SystemExit(f"--load-model: {e}") from None
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        print(f"loaded {args.load_model} (trained {step} batches)")
    print(
        f"DLRM: {len(tables)} tables ({sum(tables):,} rows, dim {args.arch_sparse_feature_size}), "
        f"bottom {args.arch_mlp_bot}, top {args.arch_mlp_top}, {args.arch_interaction_op} "
        f"interaction, {args.optimizer}, lr {args.learning_rate}, data {args.data_generation}"
    )

    losses, evals = [], []
    seconds = 0.0
    samples = 0
    if not args.inference_only:
        total = len(train) * args.nepochs
        bar = tqdm(total=total, unit="batch", disable=args.no_progress, dynamic_ncols=True)
        running, n_running = 0.0, 0
        for epoch in range(args.nepochs):
            for b in train:
                t0 = time.perf_counter()
                opt.zero_grad()
                loss = F.binary_cross_entropy_with_logits(
                    model(b.dense, b.indices, b.offsets), b.labels
                )
                loss.backward()
                opt.step()
                seconds += time.perf_counter() - t0
                samples += b.size
                step += 1
                running += float(loss.detach())
                n_running += 1
                bar.update(1)
                bar.set_postfix(samples_per_s=f"{samples / seconds:,.0f}")
                if step % args.print_freq == 0:
                    losses.append((step, running / n_running))
                    bar.write(f"epoch {epoch} batch {step}: train loss {running / n_running:.5f}")
                    running, n_running = 0.0, 0
                if args.test_freq > 0 and step % args.test_freq == 0:
                    e = evaluate(model, test)
                    evals.append((step, e))
                    bar.write(
                        f"  test: logloss {e['logloss']:.5f}  accuracy {e['accuracy']:.4f}  "
                        f"AUC {e['auc']:.4f}"
                    )
        bar.close()
        if args.save_model:
            save_checkpoint(args.save_model, model, opt, step, args)
            print(f"saved {args.save_model}")
    final = evaluate(model, test)
    if not evals or evals[-1][0] != step:
        evals.append((step, final))
    line = (
        f"test ({final['samples']} samples): logloss {final['logloss']:.5f}  "
        f"accuracy {final['accuracy']:.4f}  AUC {final['auc']:.4f}"
    )
    if ceiling is not None:
        line += f"  (planted-model ceiling AUC {ceiling:.4f})"
    print(line)
    if args.quantize_emb_with_bit:
        q = copy.deepcopy(model)
        report = quantize(q, bits=args.quantize_emb_with_bit)
        qe = evaluate(q, test)
        print(
            f"{report}\n  int{args.quantize_emb_with_bit} embeddings: logloss {qe['logloss']:.5f}"
            f"  accuracy {qe['accuracy']:.4f}  AUC {qe['auc']:.4f}"
        )
    speed = None
    if not args.inference_only and args.compare_reference > 0:
        speed = compare_with_reference(args, model, tables, train, args.compare_reference)
        if speed:
            print(
                f"train step speed: dlrm_ops {speed['dlrm_ops']:,.0f} samples/s, pure-PyTorch "
                f"reference {speed['reference']:,.0f} samples/s "
                f"({speed['dlrm_ops'] / speed['reference']:.2f}x)"
            )
    if args.plot:
        plot(args.plot, losses, evals)
        print(f"plot written to {args.plot}")
    summary = (
        f"summary: batches {step}, test AUC {final['auc']:.4f}, logloss {final['logloss']:.5f}"
    )
    if samples:
        summary += f", {samples / seconds:,.0f} train samples/s"
    if speed:
        summary += f", {speed['dlrm_ops'] / speed['reference']:.2f}x the reference"
    print(summary)
    return 0
