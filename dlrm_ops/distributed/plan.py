"""Which rank holds which rows of which table."""

from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Union

from .. import optimizers


def even_bounds(n: int, parts: int) -> List[int]:
    """``parts + 1`` cut points of ``range(n)`` into contiguous pieces as even
    as possible (the first ``n % parts`` one longer): how a global batch is
    split over ranks and a row-wise table over its shards, the same on every
    rank."""
    q, r = divmod(n, parts)
    cuts = [0]
    for p in range(parts):
        cuts.append(cuts[-1] + q + (p < r))
    return cuts


@dataclass(frozen=True)
class Shard:
    table: int  # global table id
    rank: int
    lo: int  # rows [lo, hi) of the table
    hi: int


@dataclass
class ShardingPlan:
    """Every table whole on one rank (table-wise) or cut into contiguous row
    ranges, one per rank (row-wise). ``shards`` is in table order."""

    world_size: int
    rows: List[int]
    dims: List[int]
    shards: List[Shard]

    def on(self, rank: int) -> List[Shard]:
        """The shards rank holds, in table order (at most one per table)."""
        return [s for s in self.shards if s.rank == rank]

    def tables_on(self, rank: int) -> List[int]:
        return [s.table for s in self.on(rank)]

    def row_wise(self, table: int) -> bool:
        return sum(s.table == table for s in self.shards) > 1

    def describe(self, bytes_per_row: Optional[Sequence[int]] = None) -> str:
        """The plan as a few lines, one per rank."""
        bpr = bytes_per_row or [4 * d for d in self.dims]
        rw = [t for t in range(len(self.rows)) if self.row_wise(t)]
        lines = [
            f"sharding plan: {len(self.rows)} tables on {self.world_size} ranks"
            + (f"; row-wise: {', '.join(map(str, rw))}" if rw else "; all table-wise")
        ]
        for r in range(self.world_size):
            mine = self.on(r)
            rows = sum(s.hi - s.lo for s in mine)
            mb = sum((s.hi - s.lo) * bpr[s.table] for s in mine) / 2**20
            names = [
                f"{s.table}[{s.lo}:{s.hi}]" if self.row_wise(s.table) else str(s.table)
                for s in mine
            ]
            lines.append(
                f"  rank {r}: {len(mine)} shards, {rows:,} rows, {mb:,.1f} MiB: "
                + (" ".join(names) or "none")
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "world_size": self.world_size,
            "rows": list(self.rows),
            "dims": list(self.dims),
            "shards": [asdict(s) for s in self.shards],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ShardingPlan":
        return cls(d["world_size"], d["rows"], d["dims"], [Shard(**s) for s in d["shards"]])


def all_to_all_bytes(plan: ShardingPlan, batch_size: int, elem_bytes: int = 4) -> int:
    """Bytes all ranks together send to other ranks in one all-to-all of
    pooled vectors for a global batch (the backward's, of their gradients,
    is as large): each rank sends every other rank that rank's slice of the
    batch at the width of its own shards, a row-wise table's width counted
    on every rank that holds a shard of it."""
    cuts = even_bounds(batch_size, plan.world_size)
    total = 0
    for r in range(plan.world_size):
        width = sum(plan.dims[s.table] for s in plan.on(r))
        total += width * (batch_size - (cuts[r + 1] - cuts[r]))
    return total * elem_bytes


def bytes_per_row(dims: Sequence[int], optimizer: Optional[str], elem_bytes: int = 4) -> List[int]:
    """Bytes a row of each table takes with its optimizer state (fp32)."""
    spec = optimizers.spec(optimizer) if optimizer else None
    out = []
    for d in dims:
        state = 0
        if spec is not None:
            state = sum(4 * spec.state_numel(w, d, 1) for w in (1, 2))
        out.append(d * elem_bytes + state)
    return out


def plan_sharding(
    rows: Sequence[int],
    dims: Sequence[int],
    world_size: int,
    row_wise: Union[str, Sequence[int]] = "auto",
    pooling: Optional[Sequence[float]] = None,
    optimizer: Optional[str] = None,
    elem_bytes: int = 4,
) -> ShardingPlan:
    """A plan balancing memory and lookup cost over ``world_size`` ranks.

    ``row_wise`` names the tables cut over all ranks by rows: "auto" (those
    whose memory alone exceeds an even share, total / world_size: no
    table-wise placement can balance them), "none", "all", or a list of
    table ids. The other tables go whole, largest cost first, each to the
    rank with the least cost so far (greedy, as NVIDIA's DLRM places them),
    the cost of a table being its share of all tables' memory (rows x
    bytes per row, optimizer state included) plus its share of the lookup
    work (pooling factor x dim, ``pooling`` defaulting to one index per bag).
    """
    rows, dims = [int(n) for n in rows], [int(d) for d in dims]
    T = len(rows)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if len(dims) != T:
        raise ValueError(f"dims lists {len(dims)} tables, rows {T}")
    pooling = [1.0] * T if pooling is None else [float(p) for p in pooling]
    if len(pooling) != T:
        raise ValueError(f"pooling lists {len(pooling)} tables, rows {T}")
    memory = [n * b for n, b in zip(rows, bytes_per_row(dims, optimizer, elem_bytes))]
    if row_wise == "auto":
        share = sum(memory) / world_size
        cut = {t for t in range(T) if world_size > 1 and memory[t] > share}
    elif row_wise == "none":
        cut = set()
    elif row_wise == "all":
        cut = set(range(T))
    else:
        cut = {int(t) for t in row_wise}
        bad = sorted(t for t in cut if not 0 <= t < T)
        if bad:
            raise ValueError(f"row_wise names tables {bad}; there are {T} (0..{T - 1})")
    lookups = [p * d for p, d in zip(pooling, dims)]
    cost = [
        memory[t] / max(sum(memory), 1) + lookups[t] / max(sum(lookups), 1e-30) for t in range(T)
    ]
    load = [0.0] * world_size
    owner = {}
    for t in sorted(cut):
        for r in range(world_size):
            load[r] += cost[t] / world_size
    for t in sorted((t for t in range(T) if t not in cut), key=lambda t: (-cost[t], t)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[t] = r
        load[r] += cost[t]
    shards = []
    for t in range(T):
        if t in cut:
            b = even_bounds(rows[t], world_size)
            shards += [Shard(t, r, b[r], b[r + 1]) for r in range(world_size)]
        else:
            shards.append(Shard(t, owner[t], 0, rows[t]))
    return ShardingPlan(world_size, rows, dims, shards)
