"""torch.nn modules backed by dlrm_ops kernels."""
from .embedding import EmbeddingBag, EmbeddingBagCollection, convert

__all__ = ["EmbeddingBag", "EmbeddingBagCollection", "convert"]
