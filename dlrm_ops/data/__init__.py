"""Data for DLRM training: built-in generators and the Criteo click logs."""

from .batch import Batch, batch_from_arrays
from .criteo import CriteoDataset, MalformedLineError, preprocess_criteo
from .mlperf_bin import MLPerfBinDataset
from .synthetic import RandomData, SyntheticData

__all__ = [
    "Batch",
    "batch_from_arrays",
    "RandomData",
    "SyntheticData",
    "CriteoDataset",
    "MLPerfBinDataset",
    "preprocess_criteo",
    "MalformedLineError",
]
