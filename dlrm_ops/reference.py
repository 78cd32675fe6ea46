"""Pure-PyTorch references of every dlrm_ops op.

Written for clarity with plain tensor ops and autograd, never calling the native
library: the tests check kernels against these, and they are the fallback where
a kernel does not exist.
"""

from typing import Optional, Sequence

import torch

from . import optimizers


def bag_ids(offsets: torch.Tensor, num_indices: int) -> torch.Tensor:
    """Bag number of every index, from offsets with the final end offset."""
    lengths = (offsets[1:] - offsets[:-1]).long()
    return torch.repeat_interleave(
        torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=num_indices
    )


def table_batched_embedding_bag(
    tables: Sequence[torch.Tensor],
    indices: torch.Tensor,
    offsets: torch.Tensor,
    mode: str = "sum",
    per_sample_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Pooled lookups over T tables; bag b of table t is
    indices[offsets[t*B+b]:offsets[t*B+b+1]]. Returns [B, sum(D_t)] in the
    tables' dtype, accumulated in fp32."""
    T = len(tables)
    B = (offsets.numel() - 1) // T
    outs = []
    for t, w in enumerate(tables):
        lo, hi = int(offsets[t * B]), int(offsets[(t + 1) * B])
        idx = indices[lo:hi].long()
        bag_off = offsets[t * B : (t + 1) * B + 1] - lo
        rows = w.float().index_select(0, idx)
        if per_sample_weights is not None:
            rows = rows * per_sample_weights[lo:hi].float().unsqueeze(1)
        pooled = torch.zeros(B, w.shape[1], dtype=torch.float32, device=w.device)
        pooled = pooled.index_add(0, bag_ids(bag_off, idx.numel()), rows)
        if mode == "mean":
            lengths = (bag_off[1:] - bag_off[:-1]).clamp(min=1).float().unsqueeze(1)
            pooled = pooled / lengths
        outs.append(pooled.to(w.dtype))
    return torch.cat(outs, dim=1)


def sparse_optimizer_step(
    optimizer: str,
    weight: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    lr: float,
    eps: float = 1e-8,
    betas=(0.9, 0.999),
    weight_decay: float = 0.0,
) -> None:
    """One step of the optimizers fused into the embedding backward, applied in
    place to the rows of ``weight`` ([R, D], any float dtype, math in fp32)
    that ``grad`` (sparse COO, duplicates allowed) touches. ``state`` holds the
    fp32 state between calls: "momentum1" and "momentum2", [R, D] or [R] as
    ``optimizers.OPTIMIZERS`` lays them out, and "step"."""
    spec = optimizers.spec(optimizer)
    g = grad.coalesce()
    rows = g.indices()[0]
    vals = g.values().float()
    w = weight.detach()
    wr = w[rows].float()
    vals = vals + weight_decay * wr
    shapes = {optimizers.State.ELEMENT: w.shape, optimizers.State.ROW: w.shape[:1]}
    m1, m2 = (
        state.setdefault(f"momentum{i}", torch.zeros(shapes[layout], dtype=torch.float32))
        if layout != optimizers.State.NONE
        else None
        for i, layout in ((1, spec.momentum1), (2, spec.momentum2))
    )
    state["step"] = step = state.get("step", 0) + 1
    b1, b2 = betas
    adam_step = lr * (1 - b2**step) ** 0.5 / (1 - b1**step)
    if optimizer == "sgd":
        new = wr - lr * vals
    elif optimizer == "adagrad":
        m1[rows] += vals * vals
        new = wr - lr * vals / (m1[rows].sqrt() + eps)
    elif optimizer == "rowwise_adagrad":
        m1[rows] += (vals * vals).mean(1)
        new = wr - lr * vals / (m1[rows].sqrt() + eps).unsqueeze(1)
    elif optimizer == "adam":
        m1[rows] += (vals - m1[rows]) * (1 - b1)
        m2[rows] += (vals * vals - m2[rows]) * (1 - b2)
        new = wr - adam_step * (m1[rows] / (m2[rows].sqrt() + eps))
    elif optimizer == "rowwise_adam":
        m1[rows] += (vals - m1[rows]) * (1 - b1)
        m2[rows] += ((vals * vals).mean(1) - m2[rows]) * (1 - b2)
        new = wr - adam_step * m1[rows] / (m2[rows].sqrt() + eps).unsqueeze(1)
    w[rows] = new.to(w.dtype)


def pair_indices(F: int, self_interaction: bool, order: str, device=None):
    """(i, j) of the kept pairs in output order: tril is facebookresearch/dlrm's
    interact_features (i > j, row-major), triu torchrec's InteractionArch."""
    if order == "tril":
        return torch.tril_indices(F, F, 0 if self_interaction else -1, device=device)
    if order == "triu":
        return torch.triu_indices(F, F, 0 if self_interaction else 1, device=device)
    raise ValueError(f"order must be 'tril' or 'triu', got {order!r}")


def dot_interaction(
    dense: torch.Tensor, sparse: torch.Tensor, self_interaction: bool = False, order: str = "tril"
) -> torch.Tensor:
    """[dense, pairwise dots of (dense, sparse_1..sparse_T)] with torch.bmm and
    a gather, as the DLRM reference implementations do (fp32 accumulation)."""
    B, D = dense.shape
    T = sparse.shape[1] if sparse.dim() == 3 else sparse.shape[1] // D
    x = torch.cat([dense.unsqueeze(1), sparse.reshape(B, T, D)], 1).float()
    z = torch.bmm(x, x.transpose(1, 2))
    li, lj = pair_indices(x.shape[1], self_interaction, order, dense.device)
    return torch.cat([dense, z[:, li, lj].to(dense.dtype)], 1)


def quantize_rowwise(weight: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Row-wise quantization in the layout of torch.ops.quantized
    embedding_bag_byte_prepack (8-bit: [q][fp32 scale][fp32 bias]) and
    embedding_bag_4bit_prepack (4-bit: [q pairs, even column low][fp16 scale][fp16 bias])."""
    w = weight.float()
    mn, mx = w.min(1).values, w.max(1).values
    if bits == 8:
        rng = mx - mn
        q = torch.round((w - mn[:, None]) * (255.0 / (rng + 1e-8))[:, None]).to(torch.uint8)
        sb = torch.stack([rng / 255.0, mn], 1).contiguous().view(torch.uint8)
        return torch.cat([q, sb], 1)
    mn = mn.half().float()
    rng = mx - mn
    scale = torch.where(rng == 0, torch.ones_like(rng), rng / 15.0).half().float()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    inv = 1.0 / scale
    bad = torch.isinf(inv)
    scale, inv = torch.where(bad, 1.0, scale), torch.where(bad, 1.0, inv)
    q = torch.round((w - mn[:, None]) * inv[:, None]).clamp(0, 15).to(torch.uint8)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    sb = torch.stack([scale.half(), mn.half()], 1).contiguous().view(torch.uint8)
    return torch.cat([packed, sb], 1)


def dequantize_rowwise(
    packed: torch.Tensor, bits: int = 8, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of quantize_rowwise: scale * q + bias per row."""
    if bits == 8:
        q = packed[:, :-8].float()
        sb = packed[:, -8:].reshape(-1).clone().view(torch.float32).view(-1, 2)
    else:
        b = packed[:, :-4]
        q = torch.stack([b & 0xF, b >> 4], 2).reshape(b.shape[0], 2 * b.shape[1]).float()
        sb = packed[:, -4:].reshape(-1).clone().view(torch.float16).view(-1, 2).float()
    return (q * sb[:, :1] + sb[:, 1:]).to(dtype)


class ReferenceDLRM(torch.nn.Module):
    """DLRM in plain PyTorch, as facebookresearch/dlrm builds it: one
    ``nn.EmbeddingBag(sparse=True)`` per table, bmm + gather interaction, the
    same MLPs. Same forward convention as ``dlrm_ops.models.DLRM``; the tests
    compare against it and the benchmarks race it."""

    def __init__(
        self,
        num_embeddings,
        embedding_dim,
        bottom_mlp,
        top_mlp,
        interaction="dot",
        self_interaction=False,
    ):
        super().__init__()
        from .nn.mlp import mlp

        T = len(num_embeddings)
        self.interaction, self.self_interaction = interaction, self_interaction
        self.bottom = mlp(bottom_mlp, final_relu=True)
        self.tables = torch.nn.ModuleList(
            torch.nn.EmbeddingBag(
                n, embedding_dim, mode="sum", sparse=True, include_last_offset=True
            )
            for n in num_embeddings
        )
        F = T + 1
        pairs = F * (F + 1) // 2 if self_interaction else F * (F - 1) // 2
        width = embedding_dim + pairs if interaction == "dot" else embedding_dim * F
        self.top = mlp([width] + list(top_mlp), final_relu=False)

    @torch.no_grad()
    def load_from(self, dlrm) -> "ReferenceDLRM":
        """Copies the weights of a ``dlrm_ops.models.DLRM`` (without QR)."""
        self.bottom.load_state_dict(dlrm.bottom.state_dict())
        self.top.load_state_dict(dlrm.top.state_dict())
        for t, m in enumerate(self.tables):
            m.weight.copy_(dlrm.embeddings.weight_of(t))
        return self

    def embedding_parameters(self):
        return self.tables.parameters()

    def dense_parameters(self):
        yield from self.bottom.parameters()
        yield from self.top.parameters()

    def forward(self, dense, indices, offsets):
        T = len(self.tables)
        B = (offsets.numel() - 1) // T
        x = self.bottom(dense)
        ly = []
        for t, m in enumerate(self.tables):
            lo, hi = int(offsets[t * B]), int(offsets[(t + 1) * B])
            ly.append(m(indices[lo:hi], offsets[t * B : (t + 1) * B + 1] - lo))
        if self.interaction == "dot":
            z = dot_interaction(x, torch.stack(ly, 1), self.self_interaction, "tril")
        else:
            z = torch.cat([x] + ly, 1)
        return self.top(z).squeeze(1)
