"""The DLRM, its tables sharded over ranks and its MLPs replicated."""

from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from ..models.dlrm import DenseLayers, project, projections
from .embedding import ShardedEmbeddingBagCollection
from .plan import ShardingPlan


class ShardedSparseArch(nn.Module):
    """The sharded tables and, as ``SparseArch``, the mixed-dimension
    projections (replicated: they are dense)."""

    def __init__(self, plan: ShardingPlan, rank: int, embedding_dim: int, **tables):
        super().__init__()
        self.tables = ShardedEmbeddingBagCollection(plan, rank, **tables)
        self.dims = list(plan.dims)
        self.proj = projections(plan.dims, embedding_dim)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return project(self.proj, self.dims, pooled)


class DistributedDLRM(DenseLayers):
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
        if not all(1 <= d <= embedding_dim for d in plan.dims):
            raise ValueError(f"the plan's dims must be in 1..{embedding_dim}, got {plan.dims}")
        self.build(
            len(plan.rows),
            embedding_dim,
            bottom_mlp,
            top_mlp,
            interaction,
            self_interaction,
            precision,
            lambda: ShardedSparseArch(
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
            ),
        )

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
        # The bottom MLP runs while the pooled vectors travel.
        return self.run(dense, lambda: self.sparse.project(pending.wait()))
