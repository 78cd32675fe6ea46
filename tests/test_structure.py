"""Python's mirrors of the kernels' enums and optimizer table agree with the
C++ ones (csrc/kernel_common.h, csrc/optimizers.h)."""

from dlrm_ops import _C, errors, ops, optimizers


def test_enums_match_the_kernels():
    e = _C.enums()
    assert e["pooling"] == {k: int(v) for k, v in ops.POOLING.items()}
    assert e["order"] == {k: int(v) for k, v in ops.ORDERS.items()}
    assert e["check"] == {k: int(v) for k, v in errors.CHECKS.items()}
    assert e["error_kind"] == errors.ERROR_KINDS
    assert e["hparam"] == {p.name.lower(): int(p) for p in optimizers.HParam}


def test_optimizer_table_matches_the_kernels():
    cpp = {o["name"]: o for o in _C.optimizers()}
    assert sorted(cpp) == sorted(optimizers.OPTIMIZERS)
    for name, spec in optimizers.OPTIMIZERS.items():
        o = cpp[name]
        assert (o["id"], o["momentum1"], o["momentum2"]) == (
            spec.id,
            spec.momentum1,
            spec.momentum2,
        ), name
        assert o["hparams"] == sum(1 << p for p in spec.hparams), name
        assert ops.OPTIMIZERS[name] == spec.id
