"""The optimizers fused into the embedding backward, as Python sees them: one
entry each, mirroring csrc/optimizers.h (its id, where its two fp32 state
tensors live, the hyperparameters it reads, the default eps, and the
torch.optim class the command line gives the dense parameters alongside).
tests/test_structure.py checks this table against the C++ one."""

import enum
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch


class HParam(enum.IntEnum):
    """Positions in the float64 ``hparams`` tensor (csrc/kernel_common.h)."""

    LR = 0
    EPS = 1
    BETA1 = 2
    BETA2 = 3
    WEIGHT_DECAY = 4


class State(enum.IntEnum):
    """Where a state tensor lives (csrc/optimizers.h)."""

    NONE = 0
    ELEMENT = 1  # the weights' layout
    ROW = 2  # one value per table row, tables in order


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    id: int
    momentum1: State
    momentum2: State
    hparams: Tuple[HParam, ...]  # those it reads (and checks)
    eps: float = 1e-8  # default, as the matching torch.optim class
    dense: type = torch.optim.SGD

    def state_numel(self, which: int, numel: int, rows: int) -> int:
        """Elements of momentum1 (which=1) or momentum2 (which=2)."""
        s = self.momentum1 if which == 1 else self.momentum2
        return {State.NONE: 0, State.ELEMENT: numel, State.ROW: rows}[s]


_ADAM_HPARAMS = (HParam.LR, HParam.EPS, HParam.BETA1, HParam.BETA2, HParam.WEIGHT_DECAY)
OPTIMIZERS: Dict[str, OptimizerSpec] = {
    s.name: s
    for s in (
        OptimizerSpec("sgd", 1, State.NONE, State.NONE, (HParam.LR, HParam.WEIGHT_DECAY)),
        OptimizerSpec(
            "adagrad",
            2,
            State.ELEMENT,
            State.NONE,
            (HParam.LR, HParam.EPS, HParam.WEIGHT_DECAY),
            1e-10,
            torch.optim.Adagrad,
        ),
        OptimizerSpec(
            "rowwise_adagrad",
            3,
            State.ROW,
            State.NONE,
            (HParam.LR, HParam.EPS, HParam.WEIGHT_DECAY),
            1e-8,
            torch.optim.Adagrad,
        ),
        OptimizerSpec(
            "adam", 4, State.ELEMENT, State.ELEMENT, _ADAM_HPARAMS, 1e-8, torch.optim.Adam
        ),
        OptimizerSpec(
            "rowwise_adam", 5, State.ELEMENT, State.ROW, _ADAM_HPARAMS, 1e-8, torch.optim.Adam
        ),
    )
}


def spec(name: str) -> OptimizerSpec:
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    return OPTIMIZERS[name]


_CHECKS = {
    HParam.LR: ("learning rate", lambda v: v >= 0),
    HParam.EPS: ("epsilon value", lambda v: v >= 0),
    HParam.BETA1: ("beta parameter at index 0", lambda v: 0 <= v < 1),
    HParam.BETA2: ("beta parameter at index 1", lambda v: 0 <= v < 1),
    HParam.WEIGHT_DECAY: ("weight_decay value", lambda v: v >= 0),
}


def hparams(
    name: str,
    lr: float,
    eps: Optional[float] = None,
    weight_decay: float = 0.0,
    betas: Tuple[float, float] = (0.9, 0.999),
) -> Tuple[float, ...]:
    """The ``hparams`` values of optimizer ``name`` (eps defaulting as its
    torch.optim class), in HParam order; ValueError for those torch.optim would
    refuse, and for NaN or infinite ones (the CPU kernels check them again)."""
    s = spec(name)
    values = {
        HParam.LR: lr,
        HParam.EPS: s.eps if eps is None else eps,
        HParam.BETA1: betas[0],
        HParam.BETA2: betas[1],
        HParam.WEIGHT_DECAY: weight_decay,
    }
    for p in s.hparams:
        what, ok = _CHECKS[p]
        if not (math.isfinite(values[p]) and ok(values[p])):
            raise ValueError(f"Invalid {what}: {values[p]}")
    return tuple(float(values[p]) for p in HParam)
