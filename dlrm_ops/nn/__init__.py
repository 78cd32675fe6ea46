"""torch.nn modules backed by dlrm_ops kernels."""
from .embedding import EmbeddingBag, EmbeddingBagCollection, convert
from .interaction import DotInteraction

__all__ = ["EmbeddingBag", "EmbeddingBagCollection", "DotInteraction", "convert"]
