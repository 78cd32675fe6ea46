"""When a bad lookup (an index outside its table, bad offsets, bad table
metadata) is reported on CUDA, and `check_errors`, which reports it.

Checking a lookup on the GPU is cheap; waiting for the verdict on the host is
not: it stalls the CPU every call and rules out CUDA graphs. So the CUDA ops
check on the device and, by default ("deferred"), record the first error
there; `check_errors()` raises it where the host waits anyway (the training
loop calls it when it reads the loss). In every mode a bad lookup reads and
writes nothing: it adds nothing to its bag and updates no row, and a call
with bad offsets or metadata outputs zeros and updates nothing. The CPU ops
raise at the call in every mode (there the host runs the check).

Modes (csrc/kernel_common.h's Check), globally with `set_check_mode` or the
`check_mode` context, or per call and module with ``check=``:
  deferred   recorded, raised by check_errors() (the default);
  immediate  the host waits for the check and raises at the call (debugging;
             not capturable in a CUDA graph);
  warn       recorded, check_errors() warns and goes on;
  off        not recorded.
The environment variable DLRM_OPS_CHECK sets the starting mode.
"""

import contextlib
import enum
import os
import warnings
from typing import Iterator, Optional, Union

import torch

from . import _load

_load.load()


class Check(enum.IntEnum):
    """csrc/kernel_common.h's Check."""

    DEFERRED = 0
    IMMEDIATE = 1
    WARN = 2
    OFF = 3


CHECKS = {c.name.lower(): c for c in Check}


def _parse(mode: str, name: str = "check") -> Check:
    if mode not in CHECKS:
        raise ValueError(f"{name} must be one of {sorted(CHECKS)}, got {mode!r}")
    return CHECKS[mode]


_mode = _parse(os.environ.get("DLRM_OPS_CHECK", "deferred"), "DLRM_OPS_CHECK")


def set_check_mode(mode: str) -> None:
    """Sets the mode of every call that names none."""
    global _mode
    _mode = _parse(mode, "mode")


def get_check_mode() -> str:
    return _mode.name.lower()


@contextlib.contextmanager
def check_mode(mode: str) -> Iterator[None]:
    """The mode within a block (calls made there; a backward run later uses
    the mode of its forward)."""
    global _mode
    old, _mode = _mode, _parse(mode, "mode")
    try:
        yield
    finally:
        _mode = old


def resolve(check: Optional[str]) -> int:
    """The op argument for a call's ``check`` (None: the global mode)."""
    return int(_mode if check is None else _parse(check))


# take_lookup_error's record: [kind, source, table, bag, pos, value, limit,
# count, check] (csrc/cuda/lookups.cu).
ERROR_KINDS = {"tables": 1, "offsets": 2, "index": 3, "state_rows": 4}  # csrc's ErrorKind
_SOURCES = ("weights", "packed", "momentum1", "momentum2")


def message(record) -> str:
    """The CPU op's error message for a recorded error."""
    kind, source, table, bag, pos, value, limit, count = (int(x) for x in record[:8])
    if kind == ERROR_KINDS["index"]:
        return (
            f"indices[{pos}] = {value} is out of range for table {table} with {limit} rows "
            f"(bag {bag} of table {table})"
        )
    if kind == ERROR_KINDS["offsets"]:
        if pos == 0 and value != 0:
            return f"offsets[0] must be 0, got {value}"
        if value < limit:
            return (
                f"offsets must be non-decreasing, but offsets[{pos}] = {value} < "
                f"offsets[{pos - 1}] = {limit} (table {table}, bag {bag})"
            )
        return f"offsets[-1] must equal the number of indices ({count}), got {value}"
    if kind == ERROR_KINDS["state_rows"]:
        return f"{_SOURCES[source]} must have {limit} elements for this optimizer, got {value}"
    if table < 0:
        return (
            "dim_offsets[0] must be 0 and dim_offsets[-1] must equal total_dim "
            "(in a backward, grad_output's width)"
        )
    return (
        f"table {table} does not fit in {_SOURCES[source]} or has invalid metadata (dims must "
        "be >= 1, rows in [0, 2^32), weights_offsets >= 0, and tables must not share rows)"
    )


def check_errors(device: Union[torch.device, str, int, None] = None) -> None:
    """Raises (recorded in mode "warn": warns) the first bad lookup recorded on a CUDA
    device since the last check, as the CPU op's RuntimeError, and clears it.
    Waits for the device's current stream. `device`: a CUDA device (default:
    the current one); does nothing on the CPU or where CUDA is not in use."""
    if device is None:
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda":
        return
    record = torch.ops.dlrm_ops.take_lookup_error(torch.empty(0, device=device)).tolist()
    if record[0] == 0:
        return
    text = f"{message(record)} (the first bad lookup on {device} since the last check)"
    if record[8] == Check.WARN:
        warnings.warn(text, RuntimeWarning, stacklevel=2)
        return
    raise RuntimeError(text)
