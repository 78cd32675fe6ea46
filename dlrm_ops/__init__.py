"""dlrm_ops: native CPU/CUDA kernels for DLRM-style recommendation models."""

from . import errors, nn, ops, reference
from .errors import check_errors, check_mode, get_check_mode, set_check_mode
from .nn import apply_optimizer_in_backward, convert, quantize
from .ops import dequantize_rowwise, dot_interaction, quantize_rowwise, table_batched_embedding_bag

__version__ = "0.1.0"


def build_info() -> dict:
    """Version, the torch it was built with and runs on, CPU ISA in use, CUDA."""
    import torch

    from . import _C

    info = dict(_C.build_info())
    info["torch_running"] = torch.__version__
    info["threads"] = torch.get_num_threads()
    return info


__all__ = [
    "ops",
    "reference",
    "nn",
    "convert",
    "apply_optimizer_in_backward",
    "quantize",
    "table_batched_embedding_bag",
    "dot_interaction",
    "quantize_rowwise",
    "dequantize_rowwise",
    "build_info",
    "errors",
    "check_errors",
    "check_mode",
    "get_check_mode",
    "set_check_mode",
]
