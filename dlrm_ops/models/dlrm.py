"""DLRM (Naumov et al., 2019) on the dlrm_ops kernels."""

import math
from typing import Iterator, List, Optional, Sequence

import torch
from torch import nn

from ..nn import DotInteraction, EmbeddingBagCollection
from ..nn.mlp import mlp

QR_OPERATIONS = ("mult", "add", "concat")


def mixed_dims(rows: Sequence[int], base: int, temperature: float, round_pow2: bool) -> List[int]:
    """facebookresearch/dlrm's mixed-dimension rule (Ginart et al. 2019,
    ``md_solver`` with ``d0``): dims proportional to rows**-temperature, the
    smallest table getting ``base``; at least 1; optionally rounded to a power
    of two."""
    order = sorted(range(len(rows)), key=lambda t: rows[t])
    n = torch.tensor([rows[t] for t in order], dtype=torch.float)
    d = torch.round(base * n[0] ** temperature * n ** (-temperature)).clamp(min=1)
    d[0] = base
    if round_pow2:
        d = 2 ** torch.round(torch.log2(d))
    out = [0] * len(rows)
    for i, t in enumerate(order):
        out[t] = int(d[i])
    return out


def projections(dims: Sequence[int], embedding_dim: int) -> nn.ModuleDict:
    """Mixed dimensions: a bias-free Linear to ``embedding_dim`` for every
    table narrower than it, keyed by table, Xavier-initialised."""
    proj = nn.ModuleDict(
        {
            str(t): nn.Linear(d, embedding_dim, bias=False)
            for t, d in enumerate(dims)
            if d < embedding_dim
        }
    )
    for p in proj.values():
        nn.init.xavier_uniform_(p.weight)
    return proj


def project(proj: nn.ModuleDict, dims: Sequence[int], pooled: torch.Tensor) -> torch.Tensor:
    """Pooled vectors ``[B, sum(dims)]`` with the narrow tables projected."""
    if not len(proj):
        return pooled
    out = list(pooled.split(dims, 1))
    for t, p in proj.items():
        out[int(t)] = p(out[int(t)])
    return torch.cat(out, 1)


class SparseArch(nn.Module):
    """The embedding tables of a DLRM in one ``EmbeddingBagCollection``, with
    the options of the DLRM papers and of facebookresearch/dlrm:

    - hashing trick: ``max_ind_range`` caps every table at that many rows and
      takes indices modulo it;
    - quotient-remainder embeddings (Shi et al. 2019): a feature with more than
      ``qr_threshold`` rows gets two tables, ``ceil(n/qr_collisions)`` rows
      looked up with ``i // qr_collisions`` and ``qr_collisions`` rows looked up
      with ``i % qr_collisions``, their pooled vectors combined by
      ``qr_operation`` (mult, add, or concat of two D/2 halves);
    - mixed dimensions (Ginart et al. 2019): ``dims[t] < embedding_dim`` gives
      feature t a narrower table whose pooled vector a bias-free Linear
      projects to ``embedding_dim``;
    - ``weighted_pooling="learned"``: a trained weight per row of every table
      scales each looked-up row before pooling (``"fixed"``, weights of one,
      is plain sum pooling).

    ``init_seed`` draws every table from its own generator (``seeded_init_``),
    as ``dlrm_ops.distributed`` draws its shards: the same model on any number
    of ranks.

    ``forward(indices, offsets) -> [B, T*D]`` with the collection's convention.
    """

    def __init__(
        self,
        num_embeddings: Sequence[int],
        embedding_dim: int,
        optimizer: Optional[str] = "sgd",
        lr: float = 0.1,
        max_ind_range: Optional[int] = None,
        qr_collisions: int = 0,
        qr_operation: str = "mult",
        qr_threshold: int = 200,
        dims: Optional[Sequence[int]] = None,
        weighted_pooling: Optional[str] = None,
        dtype: torch.dtype = torch.float32,
        init_seed: Optional[int] = None,
    ):
        super().__init__()
        if qr_operation not in QR_OPERATIONS:
            raise ValueError(f"qr_operation must be one of {QR_OPERATIONS}, got {qr_operation!r}")
        if qr_collisions and qr_operation == "concat" and embedding_dim % 2:
            raise ValueError("qr_operation='concat' needs an even embedding_dim")
        if weighted_pooling not in (None, "fixed", "learned"):
            raise ValueError(
                f"weighted_pooling must be None, 'fixed' or 'learned', got {weighted_pooling!r}"
            )
        rows = [int(n) for n in num_embeddings]
        if max_ind_range:
            rows = [min(n, max_ind_range) for n in rows]
        dims = [embedding_dim] * len(rows) if dims is None else [int(d) for d in dims]
        if len(dims) != len(rows) or not all(1 <= d <= embedding_dim for d in dims):
            raise ValueError(
                f"dims must give each of the {len(rows)} features a dim in 1..{embedding_dim}, "
                f"got {dims}"
            )
        if qr_collisions and any(d != embedding_dim for d in dims):
            raise ValueError("quotient-remainder and mixed-dimension tables exclude each other")
        self.num_features, self.dim = len(rows), embedding_dim
        self.max_ind_range = max_ind_range
        self.qr_collisions, self.qr_operation = qr_collisions, qr_operation
        self.qr = [bool(qr_collisions) and n > qr_threshold for n in rows]
        self.dims = dims
        table_rows: List[int] = []
        table_dims: List[int] = []
        half = embedding_dim // 2 if qr_operation == "concat" else embedding_dim
        for n, q, d in zip(rows, self.qr, dims):
            if q:
                table_rows += [math.ceil(n / qr_collisions), qr_collisions]
                table_dims += [half, half]
            else:
                table_rows.append(n)
                table_dims.append(d)
        # Without a fused optimizer the tables give sparse gradients, for torch.optim.
        # With init_seed the tables leave the global RNG alone (the dense layers
        # draw the same numbers however the tables are sharded).
        with torch.random.fork_rng(devices=[], enabled=init_seed is not None):
            self.tables = EmbeddingBagCollection(
                table_rows,
                table_dims,
                optimizer=optimizer,
                lr=lr,
                sparse=optimizer is None,
                dtype=dtype,
                stochastic_rounding=dtype != torch.float32 and optimizer is not None,
            )
        if init_seed is not None:
            self.tables.reset_parameters(init_seed)
        self.proj = projections(dims, embedding_dim)
        self.weighted_pooling = weighted_pooling
        self.pooling_weights = nn.ParameterList(
            [nn.Parameter(torch.ones(n)) for n in rows] if weighted_pooling == "learned" else []
        )

    def _row_weights(self, indices: torch.Tensor, offsets: torch.Tensor) -> Optional[torch.Tensor]:
        if not len(self.pooling_weights):
            return None
        B = (offsets.numel() - 1) // self.num_features
        starts = offsets[::B].tolist()
        return torch.cat(
            [w[indices[starts[t] : starts[t + 1]]] for t, w in enumerate(self.pooling_weights)]
        )

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if self.max_ind_range:
            indices = torch.remainder(indices, self.max_ind_range)
        psw = self._row_weights(indices, offsets)
        if not any(self.qr):
            return project(self.proj, self.dims, self.tables(indices, offsets, psw))
        T = self.num_features
        B = (offsets.numel() - 1) // T
        starts = offsets[::B].tolist()
        parts, offs, base, weights = [], [offsets[:1]], offsets[:1], []
        for t in range(T):
            idx = indices[starts[t] : starts[t + 1]]
            bag_ends = offsets[t * B + 1 : (t + 1) * B + 1] - starts[t]
            for sub in (
                (idx // self.qr_collisions, idx % self.qr_collisions) if self.qr[t] else (idx,)
            ):
                parts.append(sub)
                offs.append(bag_ends + base)
                base = base + idx.numel()
                if psw is not None:
                    weights.append(psw[starts[t] : starts[t + 1]])
        pooled = self.tables(
            torch.cat(parts), torch.cat(offs), torch.cat(weights) if weights else None
        )
        out, col = [], 0
        for t in range(T):
            if not self.qr[t]:
                out.append(pooled[:, col : col + self.dim])
                col += self.dim
                continue
            d = self.dim // 2 if self.qr_operation == "concat" else self.dim
            q, r = pooled[:, col : col + d], pooled[:, col + d : col + 2 * d]
            col += 2 * d
            out.append(
                q * r
                if self.qr_operation == "mult"
                else q + r
                if self.qr_operation == "add"
                else torch.cat([q, r], 1)
            )
        return torch.cat(out, 1)


class DenseLayers(nn.Module):
    """The layers of a DLRM around its tables, for ``DLRM`` and
    ``distributed.DistributedDLRM``: ``build`` checks the architecture and
    makes the bottom MLP, the tables (``make_sparse``: between the two MLPs,
    so the dense layers draw the same random numbers whatever the tables
    are), the interaction and the top MLP; ``run`` is the forward."""

    def build(
        self,
        num_tables: int,
        embedding_dim: int,
        bottom_mlp: Sequence[int],
        top_mlp: Sequence[int],
        interaction: str,
        self_interaction: bool,
        precision: str,
        make_sparse,
    ) -> None:
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
        self.precision, self.interaction = precision, interaction
        self.bottom = mlp(bottom_mlp, final_relu=True, fused=True)
        self.sparse = make_sparse()
        self.dot = DotInteraction(self_interaction, order="tril")
        width = (
            DotInteraction.output_dim(num_tables, embedding_dim, self_interaction)
            if interaction == "dot"
            else embedding_dim * (num_tables + 1)
        )
        self.top = mlp([width] + list(top_mlp), final_relu=False, fused=True)

    def run(self, dense: torch.Tensor, pooled) -> torch.Tensor:
        """Logits of ``dense``; ``pooled()`` gives the tables' vectors and is
        called after the bottom MLP."""
        if self.precision == "bf16":
            # bf16 GEMMs (forward and backward) on fp32 master weights, the
            # interaction in bf16, fp32 logits for the loss. Each weight is cast
            # once per forward, so the cast cache saves nothing; without it the
            # forward can be captured in a CUDA graph (torch.cuda.graphs' rule).
            with torch.autocast(dense.device.type, dtype=torch.bfloat16, cache_enabled=False):
                return self._layers(dense, pooled).float()
        return self._layers(dense, pooled)

    def _layers(self, dense: torch.Tensor, pooled) -> torch.Tensor:
        x = self.bottom(dense)
        ly = pooled().to(x.dtype)
        z = self.dot(x, ly) if self.interaction == "dot" else torch.cat([x, ly], 1)
        return self.top(z).squeeze(1)


class DLRM(DenseLayers):
    """Bottom MLP on the dense features, embedding tables for the sparse ones
    (their optimizer fused into the backward), the pairwise ``dot`` interaction
    (or ``cat``), and a top MLP. ``forward(dense [B, F_dense], indices,
    offsets) -> logits [B]`` (BCE-with-logits; sigmoid for probabilities),
    ``indices``/``offsets`` as ``EmbeddingBagCollection`` takes them.

    ``bottom_mlp`` runs from the dense input size to ``embedding_dim`` (e.g.
    ``[13, 512, 256, 64, 16]``), ``top_mlp`` lists the layer sizes after the
    interaction and ends in 1 (e.g. ``[512, 256, 1]``). Train the MLPs with a
    torch optimizer over ``dense_parameters()`` (with the mixed-dimension
    projections and learned pooling weights); the tables update themselves.
    ``max_ind_range``, ``qr_*``, ``embedding_dims`` (mixed dimensions) and
    ``weighted_pooling`` are ``SparseArch``'s options. ``precision="bf16"``
    runs the MLPs' GEMMs (forward and backward) and the interaction in bf16
    under autocast, with fp32 master weights, optimizer state and logits;
    ``embedding_dtype=torch.bfloat16`` keeps the tables in bf16 (updated with
    stochastic rounding). ``init_seed``: ``SparseArch``'s.
    """

    def __init__(
        self,
        num_embeddings: Sequence[int],
        embedding_dim: int,
        bottom_mlp: Sequence[int],
        top_mlp: Sequence[int],
        interaction: str = "dot",
        self_interaction: bool = False,
        embedding_optimizer: Optional[str] = "sgd",
        embedding_lr: float = 0.1,
        max_ind_range: Optional[int] = None,
        qr_collisions: int = 0,
        qr_operation: str = "mult",
        qr_threshold: int = 200,
        embedding_dims: Optional[Sequence[int]] = None,
        weighted_pooling: Optional[str] = None,
        precision: str = "fp32",
        embedding_dtype: torch.dtype = torch.float32,
        init_seed: Optional[int] = None,
    ):
        super().__init__()
        self.build(
            len(num_embeddings),
            embedding_dim,
            bottom_mlp,
            top_mlp,
            interaction,
            self_interaction,
            precision,
            lambda: SparseArch(
                num_embeddings,
                embedding_dim,
                embedding_optimizer,
                embedding_lr,
                max_ind_range,
                qr_collisions,
                qr_operation,
                qr_threshold,
                embedding_dims,
                weighted_pooling,
                embedding_dtype,
                init_seed,
            ),
        )

    @property
    def embeddings(self) -> EmbeddingBagCollection:
        return self.sparse.tables

    def dense_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.bottom.parameters()
        yield from self.sparse.proj.parameters()
        yield from self.sparse.pooling_weights.parameters()
        yield from self.top.parameters()

    def forward(
        self, dense: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor
    ) -> torch.Tensor:
        return self.run(dense, lambda: self.sparse(indices, offsets))
