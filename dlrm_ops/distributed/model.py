"""The DLRM, its tables sharded over ranks and its MLPs replicated."""

from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from ..nn import DotInteraction
from ..nn.mlp import mlp
from .embedding import ShardedEmbeddingBagCollection
from .plan import ShardingPlan


class ShardedSparseArch(nn.Module):
    """The sharded tables and, as ``SparseArch``, the mixed-dimension
    projections (replicated: they are dense)."""

    def __init__(self, plan: ShardingPlan, rank: int, embedding_dim: int, **tables):
        super().__init__()
        self.tables = ShardedEmbeddingBagCollection(plan, rank, **tables)
        self.dims = list(plan.dims)
        self.proj = nn.ModuleDict(
            {
                str(t): nn.Linear(d, embedding_dim, bias=False)
                for t, d in enumerate(plan.dims)
                if d < embedding_dim
            }
        )
        for p in self.proj.values():
            nn.init.xavier_uniform_(p.weight)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        if not len(self.proj):
            return pooled
        out = list(pooled.split(self.dims, 1))
        for t, p in self.proj.items():
            out[int(t)] = p(out[int(t)])
        return torch.cat(out, 1)


class DistributedDLRM(nn.Module):
    """``models.DLRM`` over ranks (hybrid parallel, as in the DLRM paper):
    each rank holds its shards of the tables (``plan``) and a replica of the
    MLPs (to be wrapped in DistributedDataParallel with the tables left
    out: ``ddp_ignored()``).

    ``forward(dense, indices, offsets, batch_size)`` takes this rank's slice
    of the dense features (``even_bounds(batch_size, world_size)``) and the
    indices of this rank's tables (``input_tables``) for the whole global
    batch; it starts the lookups and their all-to-all, runs the bottom MLP
    while the vectors travel, then the interaction and the top MLP, and
    returns the logits of its slice.

    Built in the order ``DLRM`` builds its layers, with every table drawn
    from (seed, table id), after ``torch.manual_seed(s)`` it is the model
    ``DLRM(..., init_seed=seed)`` builds after the same call, on any number
    of ranks; ``dense_parameters()`` come in the same order, so dense
    optimizer states carry over too.
    """

    def __init__(
        self,
        plan: ShardingPlan,
        rank: int,
        embedding_dim: int,
        bottom_mlp: Sequence[int],
        top_mlp: Sequence[int],
        interaction: str = "dot",
        self_interaction: bool = False,
        embedding_optimizer: Optional[str] = "sgd",
        embedding_lr: float = 0.1,
        max_ind_range: Optional[int] = None,
        precision: str = "fp32",
        embedding_dtype: torch.dtype = torch.float32,
        seed: int = 0,
        group=None,
        comm_precision: str = "fp32",
        device: Optional[torch.device] = None,
    ):
        super().__init__()
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        if bottom_mlp[-1] != embedding_dim:
            raise ValueError(
                f"bottom_mlp must end in embedding_dim = {embedding_dim}, got {list(bottom_mlp)}"
            )
        if top_mlp[-1] != 1:
            raise ValueError(f"top_mlp must end in 1, got {list(top_mlp)}")
        if interaction not in ("dot", "cat"):
            raise ValueError(f"interaction must be 'dot' or 'cat', got {interaction!r}")
        if not all(1 <= d <= embedding_dim for d in plan.dims):
            raise ValueError(f"the plan's dims must be in 1..{embedding_dim}, got {plan.dims}")
        T = len(plan.rows)
        self.precision, self.interaction = precision, interaction
        self.bottom = mlp(bottom_mlp, final_relu=True, fused=True)
        self.sparse = ShardedSparseArch(
            plan,
            rank,
            embedding_dim,
            optimizer=embedding_optimizer,
            lr=embedding_lr,
            dtype=embedding_dtype,
            seed=seed,
            group=group,
            comm_precision=comm_precision,
            max_ind_range=max_ind_range,
            device=device,
        )
        self.dot = DotInteraction(self_interaction, order="tril")
        width = (
            DotInteraction.output_dim(T, embedding_dim, self_interaction)
            if interaction == "dot"
            else embedding_dim * (T + 1)
        )
        self.top = mlp([width] + list(top_mlp), final_relu=False, fused=True)

    @property
    def embeddings(self) -> ShardedEmbeddingBagCollection:
        return self.sparse.tables

    @property
    def input_tables(self):
        return self.embeddings.input_tables

    def dense_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.bottom.parameters()
        yield from self.sparse.proj.parameters()
        yield from self.top.parameters()

    def ddp_ignored(self) -> list:
        """Names of the sharded tables' parameters and buffers, for
        ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``."""
        prefix = "sparse.tables."
        names = [n for n, _ in self.named_parameters() if n.startswith(prefix)]
        return names + [n for n, _ in self.named_buffers() if n.startswith(prefix)]

    def forward(self, dense, indices, offsets, batch_size: int) -> torch.Tensor:
        pending = self.embeddings.start(indices, offsets, batch_size)
        with torch.autocast(dense.device.type, torch.bfloat16, enabled=self.precision == "bf16"):
            x = self.bottom(dense)  # while the pooled vectors travel
            ly = self.sparse.project(pending.wait()).to(x.dtype)
            z = self.dot(x, ly) if self.interaction == "dot" else torch.cat([x, ly], 1)
            return self.top(z).squeeze(1).float()
