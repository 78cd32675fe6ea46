"""Data for DLRM training: built-in generators and the Criteo click logs."""

from .batch import Batch, batch_from_arrays
from .criteo import CriteoDataset, MalformedLineError, preprocess_criteo
from .mlperf_bin import MLPerfBinDataset
from .multihot import MLPERF_SIZES, MultiHot
from .synthetic import RandomData, SyntheticData
from .torchrec_npy import TorchrecNpyDataset, write_torchrec_npy

__all__ = [
    "Batch",
    "batch_from_arrays",
    "RandomData",
    "SyntheticData",
    "CriteoDataset",
    "MLPerfBinDataset",
    "MLPERF_SIZES",
    "MultiHot",
    "preprocess_criteo",
    "TorchrecNpyDataset",
    "write_torchrec_npy",
    "MalformedLineError",
]
