"""torch.nn modules backed by dlrm_ops kernels."""

from .embedding import EmbeddingBag, EmbeddingBagCollection, convert
from .in_backward import apply_optimizer_in_backward
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
    "apply_optimizer_in_backward",
    "QuantizedEmbeddingBagCollection",
    "QuantizedEmbeddingBag",
    "QuantizationReport",
    "quantize",
]
