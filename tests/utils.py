"""Helpers shared by the tests: random table-major batches, bad offsets,
tolerances per dtype, transparent-huge-page probes."""

import torch


def make_bags(rows, B, max_len, index_dtype=torch.int64, empty_frac=0.2, generator=None):
    """Random table-major indices/offsets for tables of `rows` rows each."""
    g = generator or torch.Generator().manual_seed(0)
    lengths = torch.randint(0, max_len + 1, (len(rows) * B,), generator=g)
    lengths[torch.rand(lengths.shape, generator=g) < empty_frac] = 0
    idx = []
    for t, n in enumerate(rows):
        cnt = int(lengths[t * B : (t + 1) * B].sum())
        idx.append(
            torch.randint(0, max(n, 1), (cnt,), generator=g)
            if n > 0
            else torch.zeros(0, dtype=torch.int64)
        )
    indices = torch.cat(idx).to(index_dtype)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(index_dtype)
    return indices, offsets


def first_bags(indices, offsets, T, B, n):
    """The batch of the first n bags of each table of a table-major batch of B
    bags: (indices, offsets, positions of its lookups in the whole batch)."""
    pos, off = [], [torch.zeros(1, dtype=torch.int64)]
    for t in range(T):
        lo, hi = int(offsets[t * B]), int(offsets[t * B + n])
        pos.append(torch.arange(lo, hi))
        off.append(offsets[t * B + 1 : t * B + n + 1].long() - lo + int(off[-1][-1]))
    pos = torch.cat(pos)
    return indices[pos], torch.cat(off).to(offsets.dtype), pos


def offsets_dropping_at(pos, dtype, bags=100):
    """Indices and offsets of `bags` one-index bags whose offsets drop at `pos`."""
    offsets = torch.arange(bags + 1, dtype=dtype)
    offsets[pos] = offsets[pos - 1] - 1
    return torch.zeros(bags, dtype=dtype), offsets


def anon_huge_kib():
    """KiB of this process's anonymous memory on transparent huge pages."""
    with open("/proc/self/smaps_rollup") as f:
        return int(f.read().split("AnonHugePages:")[1].split()[0])


def huge_kib_in(t):
    """KiB of t's memory mapped on transparent huge pages."""
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    kib, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                a, b = (int(x, 16) for x in head.split("-"))
                inside = a < hi and b > lo
            elif inside and head == "AnonHugePages:":
                kib += int(line.split()[1])
    return kib


def thp_available():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
        anon_huge_kib()
    except (OSError, IndexError, ValueError):
        return False
    return "[never]" not in mode


TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=5e-2, rtol=2e-2),
}
