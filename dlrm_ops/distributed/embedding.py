"""Sharded embedding tables and the all-to-all that brings each rank the
pooled vectors of its slice of the batch."""

from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..nn import EmbeddingBagCollection
from ..nn.embedding import seeded_init_
from .plan import ShardingPlan, even_bounds

COMM_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class _Exchange:
    """One all-to-all of pooled vectors in flight, and later its gradient's."""

    def __init__(self, group, send_splits, recv_splits, comm_dtype, grad_scale, traffic, rank):
        self.group, self.send_splits, self.recv_splits = group, send_splits, recv_splits
        self.comm_dtype, self.grad_scale, self.traffic = comm_dtype, grad_scale, traffic
        self.rank = rank

    def launch(self, x: torch.Tensor, send, recv, key: str):
        """Starts sending x (cut by ``send``) and receiving (cut by ``recv``);
        returns (work, buffer, dtype to give back)."""
        dtype = x.dtype
        payload = x.to(self.comm_dtype) if self.comm_dtype is not None else x
        payload = payload.contiguous()
        out = payload.new_empty(sum(recv))
        work = dist.all_to_all_single(out, payload, recv, send, group=self.group, async_op=True)
        self.traffic[key] += (sum(send) - send[self.rank]) * payload.element_size()
        self._keep = payload  # alive until the transfer is done
        return work, out, dtype


class _Start(torch.autograd.Function):
    """Issues the forward all-to-all; its backward waits for the gradient's
    (issued by _Wait's backward), so the autograd engine runs the bottom
    MLP's backward while the gradients travel."""

    @staticmethod
    def forward(ctx, x, ex: _Exchange):
        ctx.ex = ex
        ex.work, ex.out, ex.dtype = ex.launch(x, ex.send_splits, ex.recv_splits, "forward")
        return x.new_empty(0)

    @staticmethod
    def backward(ctx, _):
        ex = ctx.ex
        ex.grad_work.wait()
        grad = ex.grad_out.to(ex.dtype)
        ex.grad_work = ex.grad_out = ex._keep = None
        return grad, None


class _Wait(torch.autograd.Function):
    """Waits for the forward all-to-all; its backward issues the gradients'."""

    @staticmethod
    def forward(ctx, token, ex: _Exchange):
        ctx.ex = ex
        ex.work.wait()
        out = ex.out.to(ex.dtype)
        ex.work = ex.out = None
        return out

    @staticmethod
    def backward(ctx, grad):
        ex = ctx.ex
        # Each rank's loss is scaled by world_size / its share of the batch
        # (so DDP's mean over ranks is the global mean): the embedding
        # gradients get 1/world_size here, the same as in one process.
        g = grad * ex.grad_scale if ex.grad_scale != 1 else grad
        ex.grad_work, ex.grad_out, _ = ex.launch(g, ex.recv_splits, ex.send_splits, "backward")
        return grad.new_empty(0), None


class Pending:
    """The pooled vectors on their way; ``wait()`` gives ``[B_local, sum(dims)]``
    in global table order."""

    def __init__(self, owner: "ShardedEmbeddingBagCollection", token, ex: _Exchange, local: int):
        self.owner, self.token, self.ex, self.local = owner, token, ex, local

    def wait(self) -> torch.Tensor:
        recv = _Wait.apply(self.token, self.ex)
        o, B = self.owner, self.local
        parts, at = [], 0
        for n, w in zip(self.ex.recv_splits, o.width):
            parts.append(recv[at : at + n].view(B, w))
            at += n
        cols = []
        for blocks in o.blocks:  # per table: (source rank, first column, dim)
            s, c, d = blocks[0]
            x = parts[s][:, c : c + d]
            for s, c, d in blocks[1:]:  # a row-wise table: the partial sums meet here
                x = x + parts[s][:, c : c + d]
            cols.append(x)
        return torch.cat(cols, 1)


class _Ready:
    def __init__(self, pooled: torch.Tensor):
        self.pooled = pooled

    def wait(self) -> torch.Tensor:
        return self.pooled


class ShardedEmbeddingBagCollection(nn.Module):
    """This rank's shards of the tables of ``plan``, in one
    ``EmbeddingBagCollection`` with the optimizer fused into its backward.

    ``start(indices, offsets, batch_size)`` takes the indices of this rank's
    tables (``input_tables``, table-major, offsets with
    ``len(input_tables) * batch_size + 1`` entries) for the whole global
    batch, pools them, and sends every rank the vectors of its slice of the
    batch (``even_bounds(batch_size, world_size)``) in one asynchronous
    ``all_to_all_single``; ``.wait()`` on the result gives this rank's
    ``[B_local, sum(dims)]``. A row-wise shard looks up only the indices in
    its row range (the others are masked out) and its partial sums travel in
    the same all-to-all, summed on arrival: a reduce-scatter folded into the
    one collective. Mean pooling divides by the global bag lengths before
    sending. The backward sends the gradients back the same way and each
    shard's optimizer updates its rows locally.

    Every shard is initialised with ``seeded_init_`` from (seed, global table
    id): the tables are the same on any number of ranks and in one process
    built with ``DLRM(init_seed=seed)``.
    """

    def __init__(
        self,
        plan: ShardingPlan,
        rank: int,
        optimizer: Optional[str] = "sgd",
        lr: float = 0.01,
        mode: str = "sum",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        group=None,
        comm_precision: str = "fp32",
        max_ind_range: Optional[int] = None,
        device: Optional[torch.device] = None,
    ):
        super().__init__()
        if mode not in ("sum", "mean"):
            raise ValueError(f"mode must be 'sum' or 'mean', got {mode!r}")
        if comm_precision not in COMM_DTYPES:
            raise ValueError(
                f"comm_precision must be one of {sorted(COMM_DTYPES)}, got {comm_precision!r}"
            )
        self.plan, self.rank, self.world_size = plan, rank, plan.world_size
        self.mode, self.group, self.max_ind_range = mode, group, max_ind_range
        self.comm_dtype = COMM_DTYPES[comm_precision]
        self.shards = plan.on(rank)
        self.input_tables = [s.table for s in self.shards]
        self.local_dims = [plan.dims[s.table] for s in self.shards]
        self.row_wise = [plan.row_wise(s.table) for s in self.shards]
        self.tables = None
        if self.shards:
            with torch.random.fork_rng(devices=[]):
                self.tables = EmbeddingBagCollection(
                    [s.hi - s.lo for s in self.shards],
                    self.local_dims,
                    optimizer=optimizer,
                    lr=lr,
                    dtype=dtype,
                    device=device,
                    stochastic_rounding=dtype != torch.float32 and optimizer is not None,
                )
            for k, s in enumerate(self.shards):
                seeded_init_(self.tables.weight_of(k), seed, s.table, s.lo, plan.rows[s.table])
        # Per rank, the width of what it sends; per table, where its columns arrive.
        self.width = [sum(plan.dims[s.table] for s in plan.on(r)) for r in range(self.world_size)]
        self.blocks: List[list] = [[] for _ in plan.rows]
        for r in range(self.world_size):
            col = 0
            for s in plan.on(r):
                self.blocks[s.table].append((r, col, plan.dims[s.table]))
                col += plan.dims[s.table]
        self.traffic = {"forward": 0, "backward": 0}  # bytes this rank sent to others

    @property
    def lr(self) -> Optional[float]:
        return self.tables.lr if self.tables is not None else None

    @lr.setter
    def lr(self, value: float) -> None:
        if self.tables is not None:
            self.tables.lr = value

    def _lookup_input(self, indices: torch.Tensor, offsets: torch.Tensor, B: int):
        """Indices and offsets of the local shards: a row-wise shard keeps
        the indices in its rows, shifted to start at 0; also each table's
        global bag lengths (for mean pooling)."""
        T = len(self.shards)
        if offsets.dim() != 1 or offsets.numel() != T * B + 1:
            raise ValueError(
                f"offsets must have len(input_tables) * batch_size + 1 = {T * B + 1} entries "
                f"for this rank's tables {self.input_tables}, got {tuple(offsets.shape)}"
            )
        if self.max_ind_range:
            indices = torch.remainder(indices, self.max_ind_range)
        lengths = (offsets[1:] - offsets[:-1]).view(T, B) if self.mode == "mean" else None
        if not any(self.row_wise):
            return indices, offsets, lengths
        starts = offsets[::B].tolist() if B else [0] * (T + 1)
        idx_parts, off_parts, base = [], [offsets.new_zeros(1)], 0
        for k, s in enumerate(self.shards):
            idx = indices[starts[k] : starts[k + 1]]
            ends = offsets[k * B + 1 : (k + 1) * B + 1] - starts[k]
            if self.row_wise[k]:
                n = self.plan.rows[s.table]
                bad = (idx < 0) | (idx >= n)
                if bool(bad.any()):
                    raise ValueError(
                        f"indices of table {s.table} must be in [0, {n}), got {int(idx[bad][0])}"
                    )
                keep = (idx >= s.lo) & (idx < s.hi)
                kept = torch.cat([keep.new_zeros(1, dtype=torch.int64), keep.cumsum(0)])
                ends = kept[ends]
                idx = idx[keep] - s.lo
            idx_parts.append(idx)
            off_parts.append((ends + base).to(offsets.dtype))
            base += idx.numel()
        return torch.cat(idx_parts), torch.cat(off_parts), lengths

    def start(self, indices: torch.Tensor, offsets: torch.Tensor, batch_size: int):
        B, W = int(batch_size), self.world_size
        cuts = even_bounds(B, W)
        local = cuts[self.rank + 1] - cuts[self.rank]
        width = self.width[self.rank]
        if self.tables is not None:
            idx, offs, lengths = self._lookup_input(indices, offsets, B)
            pooled = self.tables(idx, offs)
            if lengths is not None:
                parts = pooled.split(self.local_dims, 1)
                den = lengths.clamp(min=1).to(pooled.dtype)
                pooled = torch.cat([p / den[k].unsqueeze(1) for k, p in enumerate(parts)], 1)
            if W == 1:  # one rank holds every table, in order: nothing to exchange
                return _Ready(pooled)
            flat = pooled.reshape(-1)
        else:
            # Nothing to send, but this rank still takes part in both exchanges.
            flat = torch.zeros(0, device=indices.device, requires_grad=torch.is_grad_enabled())
        # The batch slices are contiguous row ranges in rank order: the pooled
        # rows are already the send buffer.
        send = [(cuts[r + 1] - cuts[r]) * width for r in range(W)]
        recv = [local * self.width[r] for r in range(W)]
        ex = _Exchange(self.group, send, recv, self.comm_dtype, 1.0 / W, self.traffic, self.rank)
        return Pending(self, _Start.apply(flat, ex), ex, local)

    def forward(self, indices, offsets, batch_size: int) -> torch.Tensor:
        return self.start(indices, offsets, batch_size).wait()
