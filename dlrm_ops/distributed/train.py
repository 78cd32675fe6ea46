"""``torchrun ... -m dlrm_ops train --dist-backend gloo|nccl``: the command's
training run with the tables sharded over the ranks (``DistributedDLRM``),
the MLPs under DistributedDataParallel, and sharded checkpoints."""

import copy
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .. import metrics
from ..flags import FlagError
from ..train import Trainer, model_options, table_shapes, to_device
from . import checkpoint as sharded
from .data import ShardedData
from .model import DistributedDLRM
from .plan import bytes_per_row, plan_sharding


@dataclass
class Context:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    a2a_group: object  # the all-to-alls' own group, apart from DDP's allreduces
    wait_group: object  # a gloo group with a long timeout, to wait for preprocessing


def setup(args) -> Context:
    """The process group (torchrun's environment), with ``--dist-timeout``:
    a rank that dies or stalls fails the collectives of the others within it,
    and torchrun ends the job with an error. Only rank 0 writes to stdout."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if args.dist_backend == "nccl":
        torch.cuda.set_device(local)
    timeout = timedelta(seconds=args.dist_timeout)
    dist.init_process_group(args.dist_backend, timeout=timeout)
    ctx = Context(
        dist.get_rank(),
        dist.get_world_size(),
        local,
        args.dist_backend,
        dist.new_group(backend=args.dist_backend, timeout=timeout),
        dist.new_group(backend="gloo", timeout=timedelta(days=2)),
    )
    if ctx.rank:
        sys.stdout = open(os.devnull, "w")
    return ctx


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def build_data(args, ctx: Context, build):
    """``build(args)`` on every rank; raw Criteo files are preprocessed by
    rank 0 alone while the others wait, then read by all."""
    if args.data_generation != "dataset" or not args.raw_data_file or args.mlperf_bin_loader:
        return build(args)
    if ctx.rank == 0:
        out = build(args)
    dist.barrier(group=ctx.wait_group)
    if ctx.rank:
        mine = copy.copy(args)
        mine.processed_data_file = args.processed_data_file or args.raw_data_file[0] + ".processed"
        mine.raw_data_file = []
        out = build(mine)
    return out


def row_bytes(args, plan):
    elem = 2 if args.embedding_precision == "bf16" else 4
    return bytes_per_row(plan.dims, args.optimizer, elem)


class DistributedTrainer(Trainer):
    """The command's Trainer over ranks: each step every rank trains on its
    slice of the global batch, weighted so that the sum over ranks is the
    one-process loss of the whole batch; the run's flags (stop, save) and
    the printed loss are agreed in one small allreduce per step."""

    def __init__(self, args, tables, train, test, ceiling, ctx: Context):
        self.ctx = ctx
        rows, dims = table_shapes(args, tables)
        try:
            self.plan = plan_sharding(
                rows,
                dims,
                ctx.world_size,
                args.row_wise_tables,
                optimizer=args.optimizer,
                elem_bytes=2 if args.embedding_precision == "bf16" else 4,
            )
        except ValueError as e:
            raise FlagError(f"--row-wise-tables: {e}") from None
        mine = self.plan.tables_on(ctx.rank)

        def shard(data):
            return None if data is None else ShardedData(data, mine, ctx.rank, ctx.world_size)

        super().__init__(args, tables, shard(train), shard(test), ceiling)
        self.size = 0
        self.train_steps, self.train_traffic = 0, [0, 0]  # bytes this rank sent

    def make_model(self, fused: bool):
        a, ctx = self.args, self.ctx
        model = DistributedDLRM(
            self.plan,
            ctx.rank,
            a.arch_sparse_feature_size,
            a.arch_mlp_bot,
            a.arch_mlp_top,
            seed=a.seed,
            group=ctx.a2a_group,
            comm_precision=a.a2a_precision,
            **model_options(a),
        ).to(self.device)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, model.ddp_ignored()
        )
        cuda = self.device == "cuda"
        # The dense layers have no buffers to keep in step (the tables' are left out).
        self.ddp = DistributedDataParallel(model, device_ids=[ctx.local_rank] if cuda else None)
        return model

    def logits(self, b) -> torch.Tensor:
        return self.ddp(b.dense, b.indices, b.offsets, b.global_size)

    def train_step(self, b) -> float:
        """Returns the sum of this rank's sample losses (``agree`` makes it
        the global mean)."""
        lr = self.opt.param_groups[0]["lr"]
        if self.sched is not None:
            self.model.embeddings.lr = lr
        self.opt.zero_grad()
        traffic = self.model.embeddings.traffic
        before = (traffic["forward"], traffic["backward"])
        z = self.logits(b)
        n, B, W = b.dense.shape[0], b.global_size, self.ctx.world_size
        # loss_r * n_r * W / B: DDP's mean over ranks of these is the mean over the batch.
        local = self.loss(z, b.labels) if n else z.sum() * 0.0
        (local * (n * W / B)).backward()
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        self.size = B
        self.train_steps += 1
        self.train_traffic[0] += traffic["forward"] - before[0]
        self.train_traffic[1] += traffic["backward"] - before[1]
        return float(local.detach()) * n

    def agree(self, loss: float, minutes_due: bool):
        s = self.signalled
        flags = torch.tensor(
            [loss, s == signal.SIGINT, s == signal.SIGTERM, minutes_due],
            dtype=torch.float64,
            device=self.device,
        )
        dist.all_reduce(flags)
        f = flags.tolist()
        self.stopped = signal.SIGINT if f[1] else signal.SIGTERM if f[2] else None
        return f[0] / max(self.size, 1), bool(f[3])

    @torch.no_grad()
    def evaluate(self, test) -> dict:
        self.model.eval()
        probs, labels = [], []
        for i in range(len(test)):
            b = to_device(test.batch(i), self.device)
            probs.append(torch.sigmoid(self.model(b.dense, b.indices, b.offsets, b.global_size)))
            labels.append(b.labels)
        self.model.train()
        p, y = (self._gather(torch.cat(x).float()) for x in (probs, labels))
        return metrics.scores(p, y, self.args.mlperf_logging)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x, concatenated in rank order."""
        W = self.ctx.world_size
        n = torch.tensor([x.numel()], device=x.device)
        sizes = [torch.zeros_like(n) for _ in range(W)]
        dist.all_gather(sizes, n)
        sizes = [int(s) for s in sizes]
        pad = x.new_zeros(max(sizes))
        pad[: x.numel()] = x
        out = [torch.zeros_like(pad) for _ in range(W)]
        dist.all_gather(out, pad)
        return torch.cat([o[:s] for o, s in zip(out, sizes)]).cpu()

    def save(self, path: str) -> None:
        config = dict(vars(self.args))
        sharded.save(path, self.model, self.opt.state_dict(), self.step, config, self.state())

    def load_model(self, ckpt: dict) -> None:
        where = ckpt.get("dir") or "the checkpoint"
        dense = {k: v for k, v in ckpt["model"].items() if not k.startswith(sharded.TABLES)}
        missing, unexpected = self.model.load_state_dict(dense, strict=False)
        missing = [k for k in missing if not k.startswith(sharded.TABLES)]
        if missing or unexpected:
            raise ValueError(f"{where}: missing {missing}, unexpected {unexpected}")
        self.opt.load_state_dict(ckpt["optimizer"])
        if ckpt.get("dir"):
            pieces, extra = sharded.pieces_of_directory(ckpt["dir"])
        else:
            pieces, extra = sharded.pieces_of_state(
                ckpt["model"], self.plan.rows, self.plan.dims, self.args.optimizer
            )
        sharded.load_tables(self.model.embeddings, pieces, extra, where)


def traffic_line(trainer: DistributedTrainer) -> str:
    """Bytes per training step, summed over the ranks."""
    total = torch.tensor(trainer.train_traffic, dtype=torch.float64, device=trainer.device)
    dist.all_reduce(total)
    steps = max(trainer.train_steps, 1)
    fwd, bwd = (float(v) / steps for v in total.cpu())
    grads = sum(p.numel() * p.element_size() for p in trainer.model.dense_parameters())
    W = trainer.ctx.world_size
    return (
        f"hybrid parallel on {W} ranks ({trainer.ctx.backend}), per training step: all-to-alls "
        f"{fwd / 1024:,.1f} KiB (forward) + {bwd / 1024:,.1f} KiB (backward) sent over all "
        f"ranks; allreduce of {grads / 1024:,.1f} KiB of MLP gradients "
        f"({2 * (W - 1) / W * grads / 1024:,.1f} KiB sent by each rank in a ring)"
    )
