"""Run by tests/test_distributed.py under torchrun (gloo): every rank checks
its ShardedEmbeddingBagCollection against one EmbeddingBagCollection holding
all tables, forward and fused-SGD backward, and writes ``ok-<rank>`` to the
folder given as argv[1] when all checks pass."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dlrm_ops.distributed import ShardedEmbeddingBagCollection, even_bounds, plan_sharding
from dlrm_ops.nn import EmbeddingBagCollection


def bags(rows, B, g, itype):
    """Table-major bags of 0 to 4 indices (empty bags included)."""
    lengths = torch.randint(0, 5, (len(rows), B), generator=g)
    idx = torch.cat(
        [torch.randint(0, n, (int(lengths[t].sum()),), generator=g) for t, n in enumerate(rows)]
    )
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.reshape(-1).cumsum(0)])
    return idx.to(itype), offsets.to(itype), lengths


def local_input(idx, offsets, lengths, tables, B):
    parts, lens = [], []
    for t in tables:
        parts.append(idx[int(offsets[t * B]) : int(offsets[(t + 1) * B])])
        lens.append(lengths[t])
    lens = torch.cat(lens) if lens else torch.zeros(0, dtype=torch.long)
    off = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(offsets.dtype)
    return (torch.cat(parts) if parts else idx[:0]), off


def check(rows, dims, row_wise, mode, B, itype, seed):
    rank, W = dist.get_rank(), dist.get_world_size()
    plan = plan_sharding(rows, dims, W, row_wise)
    lr = 0.5
    sharded = ShardedEmbeddingBagCollection(plan, rank, "sgd", lr, mode=mode, seed=seed)
    ref = EmbeddingBagCollection(rows, dims, mode=mode, optimizer="sgd", lr=lr)
    ref.reset_parameters(seed)
    g = torch.Generator().manual_seed(seed)
    cuts = even_bounds(B, W)
    lo, hi = cuts[rank], cuts[rank + 1]
    for step in range(3):
        idx, offsets, lengths = bags(rows, B, g, itype)
        upstream = torch.randn(B, sum(dims), generator=g)
        want = ref(idx, offsets)
        (want * upstream).sum().backward()
        i, o = local_input(idx, offsets, lengths, sharded.input_tables, B)
        got = sharded(i, o, B)
        # Each rank's loss carries world_size / its share, as the trainer's does.
        (got * upstream[lo:hi]).sum().mul(W).backward()
        torch.testing.assert_close(got, want.detach()[lo:hi], rtol=1e-5, atol=1e-6)
    for k, s in enumerate(sharded.shards):  # the updates, row for row
        if sharded.tables is not None:
            torch.testing.assert_close(
                sharded.tables.weight_of(k),
                ref.weight_of(s.table)[s.lo : s.hi],
                rtol=1e-5,
                atol=1e-6,
            )
    # An index past its table fails on the ranks holding a row-wise shard of it.
    bad_table = next((s.table for s in sharded.shards if plan.row_wise(s.table)), None)
    if bad_table is not None:
        i, o = local_input(idx, offsets, lengths, sharded.input_tables, B)
        k = sharded.input_tables.index(bad_table)
        i = i.clone()
        i[int(o[k * B]) : int(o[(k + 1) * B])] = rows[bad_table]
        try:
            sharded._lookup_input(i, o, B)
            raise AssertionError("an out-of-range index was accepted")
        except ValueError as e:
            assert f"indices of table {bad_table} must be in [0, {rows[bad_table]})" in str(e)


def main():
    dist.init_process_group("gloo")
    rows, dims = [7, 300, 40, 1000, 3], [4, 8, 4, 8, 16]
    check(rows, dims, "none", "sum", 10, torch.int64, 1)
    check(rows, dims, "all", "mean", 11, torch.int32, 2)
    check(rows, dims, [1, 3], "mean", 5, torch.int64, 3)
    check(rows, dims, "auto", "sum", 2, torch.int64, 4)  # fewer samples than ranks
    Path(sys.argv[1], f"ok-{dist.get_rank()}").write_text("ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
