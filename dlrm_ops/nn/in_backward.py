"""The optimizer inside the backward for users' own models: after
``dlrm_ops.convert(model)`` and building their torch optimizer, one call,
``dlrm_ops.apply_optimizer_in_backward(optimizer, model)``, makes every
converted embedding module whose weight the optimizer holds update its rows
inside the backward with the fused kernels (as torchrec's
``apply_optimizer_in_backward``). The state lives in ``optimizer.state[weight]``
under torch.optim's own keys, so the optimizer's state_dict round-trips, and
the hyperparameters are read from the weight's param group at every step, so
LR schedulers and edits of ``param_group["lr"]`` keep working."""

from typing import List, Optional

import torch
from torch import nn

from .. import optimizers

# torch.optim state keys of each rule's momentum1 / momentum2.
_STATE_KEYS = {
    "sgd": (),
    "adagrad": ("sum",),
    "rowwise_adagrad": ("sum",),
    "adam": ("exp_avg", "exp_avg_sq"),
}


def _rule(optimizer: torch.optim.Optimizer, group: dict, rowwise_adagrad: bool) -> str:
    """The fused rule standing for ``optimizer``'s update of this group;
    ValueError naming what it cannot honour."""
    kind = type(optimizer)

    def refuse(what):
        raise ValueError(
            f"apply_optimizer_in_backward: {kind.__name__} with {what} has no fused "
            "equivalent; keep these weights out of it or leave the optimizer unfused"
        )

    if group.get("maximize"):
        refuse("maximize=True")
    if kind is torch.optim.SGD:
        if group["momentum"] != 0 or group.get("nesterov"):
            refuse(f"momentum={group['momentum']}")
        if group["weight_decay"] != 0:
            refuse("weight_decay (torch applies it to every row, the fused step to the touched)")
        return "sgd"
    if kind is torch.optim.Adagrad:
        if group["lr_decay"] != 0:
            refuse(f"lr_decay={group['lr_decay']}")
        if group["weight_decay"] != 0:
            refuse("weight_decay (torch refuses it with sparse gradients)")
        return "rowwise_adagrad" if rowwise_adagrad else "adagrad"
    if kind in (torch.optim.SparseAdam, torch.optim.Adam):
        if group.get("amsgrad"):
            refuse("amsgrad=True")
        if group.get("weight_decay", 0) != 0:
            refuse("weight_decay")
        return "adam"
    raise ValueError(
        f"apply_optimizer_in_backward supports torch.optim.SGD, Adagrad, SparseAdam and Adam "
        f"(lazy, as SparseAdam), not {kind.__name__}"
    )


class InBackward:
    """One embedding weight's fused optimizer: its torch optimizer and param
    group, and the rule standing for them."""

    def __init__(self, optimizer: torch.optim.Optimizer, group: dict, rule: str):
        self.optimizer, self.group, self.rule = optimizer, group, rule
        self.spec = optimizers.spec(rule)

    def hparams(self, device) -> torch.Tensor:
        """The group's hyperparameters now, in HParam order."""
        g = self.group
        betas = g.get("betas", (0.9, 0.999))
        eps = g.get("eps", self.spec.eps)
        values = optimizers.hparams(self.rule, float(g["lr"]), eps, 0.0, tuple(betas))
        return torch.tensor(values, dtype=torch.float64, device=device)

    def state(self, weight: torch.Tensor, rows: int):
        """(momentum1, momentum2, step) in ``optimizer.state[weight]``, made on
        first use (or kept from a state_dict) in fp32 with the fused layout."""
        st = self.optimizer.state[weight]
        out = []
        keys = _STATE_KEYS[self.rule]
        for which in (1, 2):
            n = self.spec.state_numel(which, weight.numel(), rows)
            if n == 0:
                out.append(weight.new_empty(0, dtype=torch.float32))
                continue
            key = keys[which - 1]
            t = st.get(key)
            if t is None or t.dtype != torch.float32 or t.numel() != n or not t.is_contiguous():
                init = self.group.get("initial_accumulator_value", 0.0) if key == "sum" else 0.0
                fresh = torch.full((n,), float(init), dtype=torch.float32, device=weight.device)
                if t is not None and t.numel() == n:  # e.g. fp16 state of torch's: kept, in fp32
                    fresh.copy_(t.reshape(-1))
                per_element = getattr(self.spec, f"momentum{which}") == optimizers.State.ELEMENT
                st[key] = t = fresh.view(weight.shape) if per_element else fresh
            out.append(t.view(-1))
        step = st.get("step")
        if not (isinstance(step, torch.Tensor) and step.dtype == torch.int64 and step.numel() == 1):
            st["step"] = step = torch.tensor(
                [int(step) if step is not None else 0], dtype=torch.int64, device=weight.device
            )
        out.append(step)
        return out


def apply_optimizer_in_backward(
    optimizer: torch.optim.Optimizer, model: nn.Module, rowwise_adagrad: bool = False
) -> List[str]:
    """Fuses ``optimizer``'s update of every ``dlrm_ops.nn.EmbeddingBag`` and
    ``EmbeddingBagCollection`` of ``model`` whose weight it holds into their
    backward; returns their names. Supported: ``torch.optim.SGD`` (no
    momentum), ``Adagrad`` (``rowwise_adagrad=True``: one accumulator per row),
    ``SparseAdam`` and ``Adam`` (lazy, as SparseAdam); none with weight decay.
    Those weights then get no ``.grad``: ``optimizer.step()`` and
    ``zero_grad()`` leave them alone. Modules that run PyTorch's kernel (an
    option the kernels lack, e.g. padding_idx) stay with the optimizer. It
    converts the model first (``dlrm_ops.convert``, a no-op on a converted
    one); call it after building the optimizer (and again after replacing it)."""
    from .embedding import EmbeddingBag, EmbeddingBagCollection, convert, torch_only_options

    convert(model)  # a no-op on a converted model
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    fused = []
    for name, m in model.named_modules():
        weight = getattr(m, "weight", None)
        if weight is None or id(weight) not in groups:
            continue
        if not isinstance(m, (EmbeddingBag, EmbeddingBagCollection)):
            continue
        if isinstance(m, EmbeddingBag) and torch_only_options(m):
            continue  # PyTorch's kernel runs it; its sparse gradient goes to the optimizer
        if isinstance(m, EmbeddingBagCollection) and m.optimizer is not None:
            raise ValueError(f"{name}: the collection already has its own fused optimizer")
        group = groups[id(weight)]
        m.in_backward = InBackward(optimizer, group, _rule(optimizer, group, rowwise_adagrad))
        fused.append(name)
    if not fused:
        raise ValueError(
            "apply_optimizer_in_backward: no dlrm_ops embedding module of the model has its "
            "weight in the optimizer"
        )
    return fused


def fused_lookup(
    update: Optional[InBackward],
    tables,
    rows: int,
    indices,
    offsets,
    mode,
    per_sample_weights,
    total_dim,
    check=None,
):
    """The forward whose backward applies `update` to tables[0] (the weight)."""
    from .. import ops

    weight = tables[0]
    m1, m2, step = update.state(weight, rows)
    return ops.table_batched_embedding_bag_with_optimizer(
        *tables,
        indices,
        offsets,
        optimizer=update.rule,
        momentum1=m1,
        momentum2=m2,
        step=step,
        hparams=update.hparams(weight.device),
        mode=mode,
        per_sample_weights=per_sample_weights,
        total_dim=total_dim,
        check=check,
    )


__all__ = ["apply_optimizer_in_backward"]
