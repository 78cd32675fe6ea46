"""Batches made ahead of the training step on a background thread: the
step never waits on memory-mapped reads or index layout (numpy releases the
GIL for both), and on a GPU they arrive in pinned memory."""

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

from .batch import Batch


def _pinned(b: Batch) -> Batch:
    return Batch(*(t.pin_memory() for t in (b.dense, b.indices, b.offsets, b.labels)))


def prefetch(data, start: int, stop: int, depth: int = 4, pin: bool = False) -> Iterator[Batch]:
    """data.batch(start), ..., data.batch(stop - 1), in order, up to
    ``depth`` made ahead."""
    make = (lambda i: _pinned(data.batch(i))) if pin else data.batch
    with ThreadPoolExecutor(1) as pool:
        ahead = [pool.submit(make, i) for i in range(start, min(start + depth, stop))]
        for i in range(start, stop):
            b = ahead.pop(0).result()
            if i + depth < stop:
                ahead.append(pool.submit(make, i + depth))
            yield b
