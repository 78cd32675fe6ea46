"""pytest-benchmark suites: fused training step, dot interaction, quantized
lookups and the DLRM train step, each against its PyTorch counterpart.

    python -m pytest benchmarks --benchmark-only --benchmark-columns=median,ops
"""

import pytest

from dlrm_ops.benchmark import (
    interaction_contenders,
    make_tbe_inputs,
    quantized_contenders,
    training_contenders,
)


def run(benchmark, fns, impl, group):
    if impl not in fns:
        pytest.skip(f"{impl} not available")
    benchmark.group = group
    benchmark(fns[impl])


@pytest.fixture(scope="module")
def kaggle_like():
    return make_tbe_inputs(26, 50_000, 64, 2048, 1)


@pytest.mark.parametrize("impl", ["dlrm_ops fused", "torch sparse+SGD", "fbgemm TBE"])
def test_train_sgd(benchmark, kaggle_like, impl):
    run(benchmark, training_contenders(kaggle_like, "sgd"), impl, "fwd+bwd+SGD, 26x50k, D=64, L=1")


@pytest.mark.parametrize("impl", ["dlrm_ops", "torch eager", "torch.compile"])
@pytest.mark.parametrize("backward", [False, True])
def test_interaction(benchmark, impl, backward):
    fns = interaction_contenders(2048, 26, 64, backward)
    run(
        benchmark, fns, impl, f"dot interaction {'fwd+bwd' if backward else 'fwd'} B=2048 T=26 D=64"
    )


@pytest.mark.parametrize("impl", ["dlrm_ops int8", "torch int8 loop", "dlrm_ops fp32"])
def test_quantized_int8(benchmark, kaggle_like, impl):
    run(benchmark, quantized_contenders(kaggle_like, 8), impl, "int8 lookup 26x50k D=64 L=1")
