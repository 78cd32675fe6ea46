"""A training step replayed from a CUDA graph (torch.cuda.graphs).

Launching a DLRM step's few hundred small kernels one by one costs the host
more than the GPU spends running them at the usual batch sizes. Captured once
in a CUDA graph, a step is one launch. The dlrm_ops CUDA ops never wait for
the GPU (bad lookups are recorded on the device, ``dlrm_ops.errors``) and
take their scratch from PyTorch's caching allocator, so a whole step (the
forward, the backward with the fused embedding update, the dense optimizer)
can be captured.
"""

from typing import Callable, List, Optional

import torch


class CapturedStep:
    """``step(*inputs)`` (forward, backward, optimizer step; returns a tensor,
    e.g. the loss) run from a CUDA graph.

    The first ``warmup`` calls run eagerly on a side stream (lazy state: the
    optimizer's buffers, cuBLAS workspaces); the next call captures the step on
    its inputs and replays it, and later calls copy their inputs into the
    captured ones and replay. Every call trains on its own inputs: none is run
    twice. A call whose inputs differ in shape or dtype from the captured ones
    (a last, smaller batch) runs eagerly. What the graph replays is fixed at
    capture: Python-side state the step reads (a learning rate held as a
    float, a changed module) is not seen again, so hold the step to tensors
    the graph owns or capture anew. The returned tensor is the captured
    output, overwritten by the next replay.
    """

    def __init__(self, step: Callable[..., torch.Tensor], warmup: int = 3):
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {warmup}")
        self.step, self.warmup = step, warmup
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.calls = self.replays = self.eager = 0
        self._static: Optional[List[torch.Tensor]] = None
        self._out: Optional[torch.Tensor] = None

    def _fits(self, inputs) -> bool:
        return len(inputs) == len(self._static) and all(
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            for a, b in zip(inputs, self._static)
        )

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for i, x in enumerate(inputs):
            if not isinstance(x, torch.Tensor) or x.device.type != "cuda":
                raise ValueError(f"inputs[{i}] must be a CUDA tensor to be captured")
        self.calls += 1
        if self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self._static = [x.clone() for x in inputs]
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._out = self.step(*self._static)
        elif not self._fits(inputs):
            self.eager += 1
            return self.step(*inputs)
        else:
            for dst, src in zip(self._static, inputs):
                dst.copy_(src, non_blocking=True)
        self.graph.replay()
        self.replays += 1
        return self._out
