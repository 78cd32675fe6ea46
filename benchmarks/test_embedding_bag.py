"""pytest-benchmark suite: table-batched embedding bag against torch.

    python -m pytest benchmarks/test_embedding_bag.py --benchmark-only \
        --benchmark-group-by=param:shape --benchmark-columns=median,ops

Every contender gets the same inputs, threads and allocator. The command
`python -m dlrm_ops benchmark` prints the same comparison with GB/s and ratios.
"""

import pytest
import torch

from dlrm_ops.benchmark import embedding_bag_contenders, make_tbe_inputs

SHAPES = {  # T, rows, D, B, L
    "kaggle-like D64 L1": (26, 100_000, 64, 2048, 1),
    "kaggle-like D64 L20": (26, 100_000, 64, 2048, 20),
    "kaggle-like D128 L1": (26, 100_000, 128, 2048, 1),
}
IMPLS = ["dlrm_ops", "torch loop", "torch stacked", "fbgemm TBE"]


@pytest.fixture(scope="module", params=list(SHAPES))
def contenders(request):
    inp = make_tbe_inputs(*SHAPES[request.param])
    return request.param, embedding_bag_contenders(inp, torch.get_num_threads())


@pytest.mark.parametrize("impl", IMPLS)
def test_forward(benchmark, contenders, impl):
    shape, fns = contenders
    if impl not in fns:
        pytest.skip(f"{impl} not available")
    benchmark.group = f"embedding_bag forward {shape}"
    benchmark.extra_info["shape"] = shape
    benchmark(fns[impl])
