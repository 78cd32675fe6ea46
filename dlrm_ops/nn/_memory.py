"""Table buffers backed by transparent huge pages (Linux). Random row lookups
into a table larger than the TLB's reach page-walk on nearly every access with
4 KiB pages; with 2 MiB pages a few hundred TLB entries cover gigabytes. Where
THP is in "madvise" mode (a common default) the buffer must ask for it before
its pages are touched: memory the allocator hands back after an earlier
tensor used it (tcmalloc and jemalloc keep freed spans) already has its
4 KiB pages, so those are dropped first and come back huge on first touch."""

import ctypes
import sys

import torch

_HUGE = 2 << 20
_MADV_DONTNEED = 4
_MADV_HUGEPAGE = 14
_MIN_BYTES = 4 * _HUGE  # smaller tables fit the TLB anyway


def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()


def empty_table(shape, dtype: torch.dtype, device=None) -> torch.Tensor:
    """``torch.empty`` whose memory, for large CPU tensors, is backed by huge
    pages where the kernel has them (best effort: a refusal, e.g. THP "never",
    leaves ordinary pages)."""
    return on_huge_pages(torch.empty(shape, dtype=dtype, device=device))


def on_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """t, its contents discarded, with the 2 MiB-aligned part of its memory
    advised onto huge pages and any pages it already had dropped, so that
    first touch maps huge ones."""
    nbytes = t.numel() * t.element_size()
    if _MADVISE is None or t.device.type != "cpu" or nbytes < _MIN_BYTES:
        return t
    start = (t.data_ptr() + _HUGE - 1) & ~(_HUGE - 1)
    end = (t.data_ptr() + nbytes) & ~(_HUGE - 1)
    if end > start and _MADVISE(start, end - start, _MADV_HUGEPAGE) == 0:
        _MADVISE(start, end - start, _MADV_DONTNEED)  # only t's own pages: inside its bytes
    return t
