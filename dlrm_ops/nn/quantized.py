"""Inference modules over row-wise int8/int4 quantized tables."""

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch import nn

from .. import errors, ops
from ._memory import empty_table
from .embedding import EmbeddingBag, EmbeddingBagCollection, bags_from_embedding_bag_args


class QuantizedEmbeddingBagCollection(nn.Module):
    """Packed row-wise quantized tables (8 or 4 bits) pooled in one native
    call, with the indices/offsets convention of ``EmbeddingBagCollection``.
    All tables' packed rows live in the uint8 buffer ``packed``; rows are
    dequantized inside the kernel. Output fp32 unless ``output_dtype`` says
    otherwise. ``check``: when CUDA reports a bad lookup (``dlrm_ops.errors``)."""

    def __init__(
        self,
        num_embeddings: Sequence[int],
        embedding_dims: Sequence[int],
        bits: int = 8,
        mode: str = "sum",
        output_dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
        check: Optional[str] = None,
    ):
        super().__init__()
        errors.resolve(check)
        self.check = check
        if bits not in (8, 4):
            raise ValueError(f"bits must be 8 or 4, got {bits}")
        if bits == 4 and any(d % 2 for d in embedding_dims):
            raise ValueError(f"4-bit tables need even dims, got {list(embedding_dims)}")
        ops._pooling(mode)
        self.num_embeddings = [int(n) for n in num_embeddings]
        self.embedding_dims = [int(d) for d in embedding_dims]
        self.bits, self.mode, self.output_dtype = bits, mode, output_dtype
        self.total_dim = sum(self.embedding_dims)
        sizes = [
            n * ops._packed_row_bytes(d, bits)
            for n, d in zip(self.num_embeddings, self.embedding_dims)
        ]
        starts = [0]
        for s in sizes[:-1]:
            starts.append(starts[-1] + s)
        self._starts, self._sizes = starts, sizes
        kw = dict(dtype=torch.int64, device=device)
        dims = torch.tensor(self.embedding_dims)
        self.register_buffer("weights_offsets", torch.tensor(starts, **kw), persistent=False)
        self.register_buffer(
            "dim_offsets",
            torch.cat([torch.zeros(1, dtype=torch.int64), dims.cumsum(0)]).to(device),
            persistent=False,
        )
        self.register_buffer("rows", torch.tensor(self.num_embeddings, **kw), persistent=False)
        self.register_buffer("packed", empty_table(sum(sizes), torch.uint8, device).zero_())

    @classmethod
    def from_float(
        cls, ebc: EmbeddingBagCollection, bits: int = 8, output_dtype: torch.dtype = torch.float32
    ) -> "QuantizedEmbeddingBagCollection":
        q = cls(
            ebc.num_embeddings, ebc.embedding_dims, bits, ebc.mode, output_dtype, ebc.weight.device
        )
        with torch.no_grad():
            for t in range(ebc.num_tables):
                q.packed_of(t).copy_(ops.quantize_rowwise(ebc.weight_of(t).detach(), bits))
        return q

    def packed_of(self, t: int) -> torch.Tensor:
        """View of table t's packed rows, ``[rows_t, bytes per row]``."""
        n = self.num_embeddings[t]
        return self.packed[self._starts[t] : self._starts[t] + self._sizes[t]].view(n, -1)

    def dequantized_weight_of(self, t: int) -> torch.Tensor:
        return ops.dequantize_rowwise(self.packed_of(t), self.bits)

    def forward(
        self,
        indices: torch.Tensor,
        offsets: torch.Tensor,
        per_sample_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        return ops.quantized_table_batched_embedding_bag(
            self.packed,
            self.weights_offsets,
            self.dim_offsets,
            self.rows,
            indices,
            offsets,
            bits=self.bits,
            mode=self.mode,
            per_sample_weights=per_sample_weights,
            total_dim=self.total_dim,
            output_dtype=self.output_dtype,
            check=self.check,
        )

    def extra_repr(self) -> str:
        return (
            f"tables={len(self.num_embeddings)}, bits={self.bits}, "
            f"dims={self.embedding_dims}, mode={self.mode!r}"
        )


class QuantizedEmbeddingBag(nn.Module):
    """A quantized ``nn.EmbeddingBag`` for inference: same forward arguments."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bits: int = 8,
        mode: str = "mean",
        include_last_offset: bool = False,
        device=None,
    ):
        super().__init__()
        self.include_last_offset = include_last_offset
        self.tables = QuantizedEmbeddingBagCollection(
            [num_embeddings], [embedding_dim], bits, mode, device=device
        )

    @classmethod
    def from_float(cls, m: nn.EmbeddingBag, bits: int = 8) -> "QuantizedEmbeddingBag":
        if m.mode == "max" or m.padding_idx is not None:
            raise NotImplementedError(
                "quantized embedding bags support sum and mean pooling without padding_idx"
            )
        q = cls(
            m.num_embeddings, m.embedding_dim, bits, m.mode, m.include_last_offset, m.weight.device
        )
        with torch.no_grad():
            q.tables.packed_of(0).copy_(ops.quantize_rowwise(m.weight.detach(), bits))
        return q

    def forward(self, input, offsets=None, per_sample_weights=None):
        input, offsets, per_sample_weights = bags_from_embedding_bag_args(
            input, offsets, per_sample_weights, self.include_last_offset
        )
        return self.tables(input, offsets, per_sample_weights)


@dataclass
class QuantizationReport:
    bits: int
    modules: List[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def __str__(self) -> str:
        return (
            f"quantized {len(self.modules)} embedding modules to {self.bits} bits: "
            f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB "
            f"({self.bytes_saved / 2**20:.1f} MiB saved)"
        )


def quantize(model: nn.Module, bits: int = 8) -> QuantizationReport:
    """Converts, in place, every ``EmbeddingBagCollection`` and
    ``nn.EmbeddingBag`` (torch's or dlrm_ops') in ``model`` to its quantized
    inference module, and reports the bytes saved. A bare collection or bag
    cannot be replaced in place: quantize its parent, or use ``from_float``."""
    report = QuantizationReport(bits)
    for name, parent in list(model.named_modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, EmbeddingBagCollection):
                q = QuantizedEmbeddingBagCollection.from_float(child, bits)
            elif isinstance(child, (nn.EmbeddingBag, EmbeddingBag)):
                q = QuantizedEmbeddingBag.from_float(child, bits)
            else:
                continue
            report.modules.append(f"{name}.{attr}" if name else attr)
            report.bytes_before += child.weight.numel() * child.weight.element_size()
            report.bytes_after += sum(
                b.numel() * b.element_size() for b in q.buffers() if b.dtype == torch.uint8
            )
            setattr(parent, attr, q)
    return report
