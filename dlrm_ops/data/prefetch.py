"""Batches made ahead of the training step on a background thread, for a
GPU step: the CPU is idle while the GPU computes, and the batches arrive in
pinned memory. A CPU step uses every core itself: there the thread competed
with it (the main job 0.85x as fast on 2 cores), so ``depth=0`` makes the
batches inline."""

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

from .batch import Batch


def _pinned(b: Batch) -> Batch:
    names = ("dense", "indices", "offsets", "labels")
    return dataclasses.replace(b, **{k: getattr(b, k).pin_memory() for k in names})


def prefetch(data, start: int, stop: int, depth: int = 4, pin: bool = False) -> Iterator[Batch]:
    """data.batch(start), ..., data.batch(stop - 1), in order, up to
    ``depth`` made ahead (0: each when it is asked for)."""
    make = (lambda i: _pinned(data.batch(i))) if pin else data.batch
    if depth == 0:
        yield from (make(i) for i in range(start, stop))
        return
    with ThreadPoolExecutor(1) as pool:
        ahead = [pool.submit(make, i) for i in range(start, min(start + depth, stop))]
        for i in range(start, stop):
            b = ahead.pop(0).result()
            if i + depth < stop:
                ahead.append(pool.submit(make, i + depth))
            yield b
