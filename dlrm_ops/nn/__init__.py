"""torch.nn modules backed by dlrm_ops kernels."""

from .embedding import EmbeddingBag, EmbeddingBagCollection, convert
from .interaction import DotInteraction
from .mlp import FusedMLP
from .quantized import (
    QuantizationReport,
    QuantizedEmbeddingBag,
    QuantizedEmbeddingBagCollection,
    quantize,
)

__all__ = [
    "EmbeddingBag",
    "EmbeddingBagCollection",
    "DotInteraction",
    "FusedMLP",
    "convert",
    "QuantizedEmbeddingBagCollection",
    "QuantizedEmbeddingBag",
    "QuantizationReport",
    "quantize",
]
