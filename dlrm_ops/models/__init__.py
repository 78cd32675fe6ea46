"""Recommendation models built on the dlrm_ops kernels."""

from .dlrm import DLRM, SparseArch

__all__ = ["DLRM", "SparseArch"]
