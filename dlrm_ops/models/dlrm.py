"""DLRM (Naumov et al., 2019) on the dlrm_ops kernels."""

import math
from typing import Iterator, List, Optional, Sequence

import torch
from torch import nn

from ..nn import DotInteraction, EmbeddingBagCollection
from ..nn.mlp import mlp

QR_OPERATIONS = ("mult", "add", "concat")


class SparseArch(nn.Module):
    """The embedding tables of a DLRM in one ``EmbeddingBagCollection``, with
    the memory-saving options of the DLRM papers:

    - hashing trick: ``max_ind_range`` caps every table at that many rows and
      takes indices modulo it;
    - quotient-remainder embeddings (Shi et al. 2019): a feature with more than
      ``qr_threshold`` rows gets two tables, ``ceil(n/qr_collisions)`` rows
      looked up with ``i // qr_collisions`` and ``qr_collisions`` rows looked up
      with ``i % qr_collisions``, their pooled vectors combined by
      ``qr_operation`` (mult, add, or concat of two D/2 halves).

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
    ):
        super().__init__()
        if qr_operation not in QR_OPERATIONS:
            raise ValueError(f"qr_operation must be one of {QR_OPERATIONS}, got {qr_operation!r}")
        if qr_collisions and qr_operation == "concat" and embedding_dim % 2:
            raise ValueError("qr_operation='concat' needs an even embedding_dim")
        rows = [int(n) for n in num_embeddings]
        if max_ind_range:
            rows = [min(n, max_ind_range) for n in rows]
        self.num_features, self.dim = len(rows), embedding_dim
        self.max_ind_range = max_ind_range
        self.qr_collisions, self.qr_operation = qr_collisions, qr_operation
        self.qr = [bool(qr_collisions) and n > qr_threshold for n in rows]
        table_rows: List[int] = []
        table_dims: List[int] = []
        half = embedding_dim // 2 if qr_operation == "concat" else embedding_dim
        for n, q in zip(rows, self.qr):
            if q:
                table_rows += [math.ceil(n / qr_collisions), qr_collisions]
                table_dims += [half, half]
            else:
                table_rows.append(n)
                table_dims.append(embedding_dim)
        self.tables = EmbeddingBagCollection(table_rows, table_dims, optimizer=optimizer, lr=lr)

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if self.max_ind_range:
            indices = torch.remainder(indices, self.max_ind_range)
        if not any(self.qr):
            return self.tables(indices, offsets)
        T = self.num_features
        B = (offsets.numel() - 1) // T
        starts = offsets[::B].tolist()
        parts, offs, base = [], [offsets[:1]], offsets[:1]
        for t in range(T):
            idx = indices[starts[t] : starts[t + 1]]
            bag_ends = offsets[t * B + 1 : (t + 1) * B + 1] - starts[t]
            for sub in (
                (idx // self.qr_collisions, idx % self.qr_collisions) if self.qr[t] else (idx,)
            ):
                parts.append(sub)
                offs.append(bag_ends + base)
                base = base + idx.numel()
        pooled = self.tables(torch.cat(parts), torch.cat(offs))
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


class DLRM(nn.Module):
    """Bottom MLP on the dense features, embedding tables for the sparse ones
    (their optimizer fused into the backward), the pairwise ``dot`` interaction
    (or ``cat``), and a top MLP. ``forward(dense [B, F_dense], indices,
    offsets) -> logits [B]`` (BCE-with-logits; sigmoid for probabilities),
    ``indices``/``offsets`` as ``EmbeddingBagCollection`` takes them.

    ``bottom_mlp`` runs from the dense input size to ``embedding_dim`` (e.g.
    ``[13, 512, 256, 64, 16]``), ``top_mlp`` lists the layer sizes after the
    interaction and ends in 1 (e.g. ``[512, 256, 1]``). Train the MLPs with a
    torch optimizer over ``dense_parameters()``; the tables update themselves.
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
    ):
        super().__init__()
        if bottom_mlp[-1] != embedding_dim:
            raise ValueError(
                f"bottom_mlp must end in embedding_dim = {embedding_dim}, got {list(bottom_mlp)}"
            )
        if top_mlp[-1] != 1:
            raise ValueError(f"top_mlp must end in 1, got {list(top_mlp)}")
        if interaction not in ("dot", "cat"):
            raise ValueError(f"interaction must be 'dot' or 'cat', got {interaction!r}")
        T = len(num_embeddings)
        self.interaction = interaction
        self.bottom = mlp(bottom_mlp, final_relu=True, fused=True)
        self.sparse = SparseArch(
            num_embeddings,
            embedding_dim,
            embedding_optimizer,
            embedding_lr,
            max_ind_range,
            qr_collisions,
            qr_operation,
        )
        self.dot = DotInteraction(self_interaction, order="tril")
        width = (
            DotInteraction.output_dim(T, embedding_dim, self_interaction)
            if interaction == "dot"
            else embedding_dim * (T + 1)
        )
        self.top = mlp([width] + list(top_mlp), final_relu=False, fused=True)

    @property
    def embeddings(self) -> EmbeddingBagCollection:
        return self.sparse.tables

    def dense_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.bottom.parameters()
        yield from self.top.parameters()

    def forward(
        self, dense: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor
    ) -> torch.Tensor:
        x = self.bottom(dense)
        ly = self.sparse(indices, offsets)
        z = self.dot(x, ly) if self.interaction == "dot" else torch.cat([x, ly], 1)
        return self.top(z).squeeze(1)
