"""Embedding-bag modules over the table-batched native op."""

import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .. import errors, ops, optimizers
from ..optimizers import HParam
from ._memory import empty_table
from .embedding_list import EmbeddingBagList
from .in_backward import InBackward, fused_lookup


class EmbeddingBagCollection(nn.Module):
    in_backward: Optional[InBackward] = None  # set by apply_optimizer_in_backward

    """T embedding tables pooled in one native call.

    All tables live in one parameter ``weight`` (FBGEMM's table-batched layout):
    ``[sum(rows), D]`` when every table has the same dim D, else a flat buffer.
    ``forward(indices, offsets)`` takes all tables' indices table-major and
    ``offsets`` with T*B+1 entries (bag b of table t is
    ``indices[offsets[t*B+b]:offsets[t*B+b+1]]``) and returns ``[B, sum(D)]``.
    Tables are initialised uniform in ``±sqrt(1/rows)`` as in facebookresearch/dlrm.

    With ``optimizer`` set (a name of ``dlrm_ops.optimizers.OPTIMIZERS``: "sgd",
    "adagrad", "rowwise_adagrad", "adam", "rowwise_adam") the optimizer runs
    inside the backward: ``loss.backward()`` updates the touched
    rows in place, ``weight.grad`` stays None and no optimizer step is needed.
    Duplicate rows in a batch are summed first; every rule is in
    ``csrc/optimizers.h``. ``check`` is when a bad lookup is reported on CUDA
    (``dlrm_ops.errors``; None: the global mode). The fp32 state (``momentum1``,
    ``momentum2``, ``step``) and ``hparams`` are buffers in the state_dict;
    ``lr`` may be changed between steps (not between a forward and its backward).
    ``stochastic_rounding`` rounds updated fp16/bf16 weights stochastically
    (reproducibly: the random bits hash the step and element).
    """

    def __init__(
        self,
        num_embeddings: Sequence[int],
        embedding_dim: Union[int, Sequence[int]],
        mode: str = "sum",
        dtype: torch.dtype = torch.float32,
        sparse: bool = False,
        device: Optional[torch.device] = None,
        optimizer: Optional[str] = None,
        lr: float = 0.01,
        eps: Optional[float] = None,
        weight_decay: float = 0.0,
        betas: Tuple[float, float] = (0.9, 0.999),
        stochastic_rounding: bool = False,
        feature_names: Optional[Sequence[Sequence[str]]] = None,
        check: Optional[str] = None,
    ):
        super().__init__()
        errors.resolve(check)
        rows = [int(n) for n in num_embeddings]
        if not rows:
            raise ValueError("num_embeddings must list at least one table")
        if any(n < 0 for n in rows):
            raise ValueError(f"num_embeddings must be non-negative, got {rows}")
        dims = (
            [int(embedding_dim)] * len(rows)
            if isinstance(embedding_dim, int)
            else [int(d) for d in embedding_dim]
        )
        if len(dims) != len(rows):
            raise ValueError(f"embedding_dim lists {len(dims)} dims for {len(rows)} tables")
        if any(d < 1 for d in dims):
            raise ValueError(f"embedding_dim must be >= 1, got {dims}")
        ops._pooling(mode)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.num_embeddings = rows
        self.embedding_dims = dims
        self.feature_names = _check_feature_names(feature_names, len(rows))
        self.mode = mode
        self.sparse = sparse
        self.check = check
        self.total_dim = sum(dims)
        sizes = [r * d for r, d in zip(rows, dims)]
        woff = [0] + list(torch.tensor(sizes).cumsum(0)[:-1].tolist()) if len(sizes) > 1 else [0]
        doff = [0] + torch.tensor(dims).cumsum(0).tolist()
        kw = dict(dtype=torch.int64, device=device)
        self.register_buffer("weights_offsets", torch.tensor(woff, **kw), persistent=False)
        self.register_buffer("dim_offsets", torch.tensor(doff, **kw), persistent=False)
        self.register_buffer("rows", torch.tensor(rows, **kw), persistent=False)
        shape = (sum(rows), dims[0]) if len(set(dims)) == 1 else (sum(sizes),)
        self.weight = nn.Parameter(empty_table(shape, dtype, device))
        self._woff = woff
        self.optimizer = optimizer
        self.stochastic_rounding = stochastic_rounding
        if optimizer is not None:
            self._init_optimizer(optimizer, lr, eps, weight_decay, betas, device)
        self.reset_parameters()

    def _init_optimizer(self, optimizer, lr, eps, weight_decay, betas, device):
        if optimizer not in optimizers.OPTIMIZERS:
            raise ValueError(
                f"optimizer must be None or one of {sorted(optimizers.OPTIMIZERS)}, "
                f"got {optimizer!r}"
            )
        if self.sparse:
            raise ValueError(
                "sparse=True and a fused optimizer exclude each other: the fused "
                "optimizer produces no weight gradient"
            )
        spec = optimizers.spec(optimizer)
        hparams = optimizers.hparams(optimizer, lr, eps, weight_decay, betas)
        n_elem, n_rows = self.weight.numel(), sum(self.num_embeddings)
        for which in (1, 2):
            n = spec.state_numel(which, n_elem, n_rows)
            self.register_buffer(f"momentum{which}", empty_table(n, torch.float32, device).zero_())
        self.register_buffer("step", torch.zeros(1, dtype=torch.int64, device=device))
        self.register_buffer("hparams", torch.tensor(hparams, dtype=torch.float64, device=device))

    @property
    def lr(self) -> float:
        return float(self.hparams[HParam.LR])

    @lr.setter
    def lr(self, value: float) -> None:
        optimizers.hparams(self.optimizer, value)  # checks it
        with torch.no_grad():
            self.hparams[HParam.LR] = value

    @property
    def num_tables(self) -> int:
        return len(self.num_embeddings)

    def weight_of(self, t: int) -> torch.Tensor:
        """View of table t, ``[rows_t, D_t]``."""
        n, d = self.num_embeddings[t], self.embedding_dims[t]
        return self.weight.view(-1)[self._woff[t] : self._woff[t] + n * d].view(n, d)

    @torch.no_grad()
    def reset_parameters(self, seed: Optional[int] = None) -> None:
        """Uniform in ``±sqrt(1/rows)``; with ``seed``, table t's rows are
        drawn as ``seeded_init_`` draws them (independent of the global RNG
        and of the other tables)."""
        for t, n in enumerate(self.num_embeddings):
            if seed is None:
                bound = math.sqrt(1.0 / max(n, 1))
                self.weight_of(t).uniform_(-bound, bound)
            else:
                seeded_init_(self.weight_of(t), seed, t, 0, n)

    def forward(
        self,
        indices,
        offsets: Optional[torch.Tensor] = None,
        per_sample_weights: Optional[torch.Tensor] = None,
        keyed: bool = False,
    ):
        if offsets is None and hasattr(indices, "keys") and hasattr(indices, "values"):
            return self._forward_kjt(indices, keyed)
        # Tensors read from the module's dicts, as its __getattr__ would, at a
        # thirtieth of its cost.
        b = self._buffers
        tables = (self._parameters["weight"], b["weights_offsets"], b["dim_offsets"], b["rows"])
        if self.in_backward is not None and torch.is_grad_enabled():
            return fused_lookup(
                self.in_backward,
                tables,
                sum(self.num_embeddings),
                indices,
                offsets,
                self.mode,
                per_sample_weights,
                self.total_dim,
                self.check,
            )
        if self.optimizer is not None:
            return ops.table_batched_embedding_bag_with_optimizer(
                *tables,
                indices,
                offsets,
                optimizer=self.optimizer,
                momentum1=b["momentum1"],
                momentum2=b["momentum2"],
                step=b["step"],
                hparams=b["hparams"],
                mode=self.mode,
                per_sample_weights=per_sample_weights,
                total_dim=self.total_dim,
                stochastic_rounding=self.stochastic_rounding,
                check=self.check,
            )
        return ops.table_batched_embedding_bag(
            *tables,
            indices,
            offsets,
            mode=self.mode,
            per_sample_weights=per_sample_weights,
            sparse=self.sparse,
            total_dim=self.total_dim,
            check=self.check,
        )

    def _forward_kjt(self, kjt, keyed: bool):
        """torchrec's KeyedJaggedTensor in (feature_names map its keys to tables;
        features sharing a table are its bags one batch after another, so their
        gradients meet in one update); out [B, sum of the features' dims] in
        feature order, or a torchrec KeyedTensor with ``keyed``."""
        if self.feature_names is None:
            raise ValueError("a KeyedJaggedTensor needs the collection's feature_names")
        if getattr(kjt, "variable_stride_per_key", lambda: False)():
            raise NotImplementedError("KeyedJaggedTensors with a batch size per feature")
        B, keys = kjt.stride(), list(kjt.keys())
        where = {k: i for i, k in enumerate(keys)}
        missing = [f for names in self.feature_names for f in names if f not in where]
        if missing:
            raise ValueError(f"the KeyedJaggedTensor lacks features {missing} (has {keys})")
        values, lengths = kjt.values(), kjt.lengths().view(len(keys), B)
        weights = kjt.weights_or_none()
        starts = [0] + torch.tensor(kjt.length_per_key()).cumsum(0).tolist()
        slots = max(len(names) for names in self.feature_names)
        idx, lens, psw = [], [], []
        for names in self.feature_names:  # table-major, then slot, then bag
            for j in range(slots):
                if j < len(names):
                    k = where[names[j]]
                    idx.append(values[starts[k] : starts[k + 1]])
                    lens.append(lengths[k])
                    if weights is not None:
                        psw.append(weights[starts[k] : starts[k + 1]])
                else:  # a table with fewer features: empty bags
                    lens.append(lengths.new_zeros(B))
        indices = torch.cat(idx).long() if idx else values.new_zeros(0, dtype=torch.long)
        offsets = torch.cat([lengths.new_zeros(1), torch.cat(lens).cumsum(0)]).long()
        out = self.forward(indices, offsets, torch.cat(psw) if weights is not None else None)
        pooled = out.view(slots, B, self.total_dim)  # bag j*B + b of a table: its slot j
        parts, names_out, dims_out = [], [], []
        for t, names in enumerate(self.feature_names):
            d0, d1 = int(self.dim_offsets[t]), int(self.dim_offsets[t + 1])
            for j, name in enumerate(names):
                parts.append(pooled[j, :, d0:d1])
                names_out.append(name)
                dims_out.append(d1 - d0)
        result = torch.cat(parts, 1)
        if not keyed:
            return result
        from torchrec.sparse.jagged_tensor import KeyedTensor

        return KeyedTensor(keys=names_out, length_per_key=dims_out, values=result)

    def extra_repr(self) -> str:
        return (
            f"tables={self.num_tables}, rows={self.num_embeddings}, "
            f"dims={self.embedding_dims}, mode={self.mode!r}, sparse={self.sparse}, "
            f"optimizer={self.optimizer!r}"
        )


INIT_CHUNK_ROWS = 1 << 16


@torch.no_grad()
def seeded_init_(rows: torch.Tensor, seed: int, table: int, lo: int, table_rows: int) -> None:
    """Fills ``rows`` (rows ``lo..lo+len(rows)`` of table ``table``, which has
    ``table_rows`` rows) uniform in ``±sqrt(1/table_rows)``: each chunk of
    INIT_CHUNK_ROWS rows from its own generator seeded by (seed, table,
    chunk), so any row range of a table comes out the same wherever it lives,
    whole in one process or sharded over ranks."""
    n, d = rows.shape
    bound = math.sqrt(1.0 / max(table_rows, 1))
    g = torch.Generator()
    for c in range(lo // INIT_CHUNK_ROWS, -(-(lo + n) // INIT_CHUNK_ROWS)):
        c0 = c * INIT_CHUNK_ROWS
        c1 = min(c0 + INIT_CHUNK_ROWS, table_rows)
        state = np.random.SeedSequence([seed & (2**63 - 1), table, c]).generate_state(1)
        g.manual_seed(int(state[0]))
        chunk = torch.empty(c1 - c0, d).uniform_(-bound, bound, generator=g)
        a, b = max(c0, lo), min(c1, lo + n)
        rows[a - lo : b - lo].copy_(chunk[a - c0 : b - c0])


def _check_feature_names(feature_names, T):
    """Per table, the names of the features it serves (torchrec's
    EmbeddingBagConfig.feature_names), or None."""
    if feature_names is None:
        return None
    names = [[str(f) for f in fs] for fs in feature_names]
    if len(names) != T or any(not fs for fs in names):
        raise ValueError(f"feature_names must list at least one feature for each of {T} tables")
    flat = [f for fs in names for f in fs]
    if len(set(flat)) != len(flat):
        raise ValueError(f"feature_names has a feature twice: {flat}")
    return names


# Options the kernel does not implement: such modules run PyTorch's own kernel.
_TORCH_ONLY = {
    "max_norm": lambda m: m.max_norm is not None,
    "scale_grad_by_freq": lambda m: m.scale_grad_by_freq,
    "padding_idx": lambda m: m.padding_idx is not None,
    "mode='max'": lambda m: m.mode == "max",
    "float64 weights": lambda m: (
        m.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16)
    ),
}


def torch_only_options(module: nn.EmbeddingBag):
    """The options of an EmbeddingBag that only PyTorch's kernel honours."""
    return [name for name, test in _TORCH_ONLY.items() if test(module)]


class EmbeddingBag(nn.EmbeddingBag):
    in_backward: Optional[InBackward] = None  # set by apply_optimizer_in_backward
    check: Optional[str] = None  # when CUDA reports a bad lookup (dlrm_ops.errors)

    """Drop-in for ``torch.nn.EmbeddingBag`` running the native kernel.

    Same constructor, attributes, ``forward(input, offsets=None,
    per_sample_weights=None)`` (1-D input with offsets, or 2-D input of
    fixed-size bags; ``include_last_offset``), exceptions and state_dict. A
    module with an option the kernel does not implement (max_norm,
    scale_grad_by_freq, padding_idx, mode='max', float64 weights) runs
    PyTorch's own kernel, so a converted model works wherever it did.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        kw = dict(dtype=torch.int64, device=self.weight.device)
        self.register_buffer("_weights_offsets", torch.zeros(1, **kw), persistent=False)
        self.register_buffer(
            "_dim_offsets", torch.tensor([0, self.embedding_dim], **kw), persistent=False
        )
        self.register_buffer("_rows", torch.tensor([self.num_embeddings], **kw), persistent=False)

    def _torch_mean_quirk(self, input, offsets) -> bool:
        """With include_last_offset and indices past offsets[-1], torch's mean
        divides the last bag by the indices to the input's end: its kernel runs."""
        return (
            self.include_last_offset
            and self.mode == "mean"
            and offsets is not None
            and input.dim() == 1
            and offsets.numel() > 0
            and int(offsets[-1]) < input.numel()
        )

    def forward(
        self,
        input: torch.Tensor,
        offsets: Optional[torch.Tensor] = None,
        per_sample_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if torch_only_options(self) or self._torch_mean_quirk(input, offsets):
            return super().forward(input, offsets, per_sample_weights)
        if per_sample_weights is not None:  # torch's checks, in its order
            if per_sample_weights.shape != input.shape:
                raise ValueError(
                    f"embedding_bag: If per_sample_weights ({per_sample_weights.shape}) is not "
                    f"None, then it must have the same shape as the input ({input.shape})"
                )
            if self.mode != "sum":
                raise NotImplementedError(
                    "embedding_bag: per_sample_weights was not None. per_sample_weights is "
                    f"only supported for mode='sum' (got mode='{self.mode}')"
                )
            if per_sample_weights.dtype != self.weight.dtype:
                raise RuntimeError(
                    f"per_sample_weights must have the dtype of the weight ({self.weight.dtype}), "
                    f"got {per_sample_weights.dtype}"
                )
        input, offsets, per_sample_weights = bags_from_embedding_bag_args(
            input, offsets, per_sample_weights, self.include_last_offset
        )
        tables = (self.weight, self._weights_offsets, self._dim_offsets, self._rows)
        if self.in_backward is not None and torch.is_grad_enabled():
            return fused_lookup(
                self.in_backward,
                tables,
                self.num_embeddings,
                input,
                offsets,
                self.mode,
                per_sample_weights,
                self.embedding_dim,
                self.check,
            )
        return ops.table_batched_embedding_bag(
            self.weight,
            self._weights_offsets,
            self._dim_offsets,
            self._rows,
            input,
            offsets,
            mode=self.mode,
            per_sample_weights=per_sample_weights,
            sparse=self.sparse,
            total_dim=self.embedding_dim,
            check=self.check,
        )


def bags_from_embedding_bag_args(
    input: torch.Tensor,
    offsets: Optional[torch.Tensor],
    per_sample_weights: Optional[torch.Tensor],
    include_last_offset: bool,
):
    """torch.nn.EmbeddingBag's forward arguments (1-D input with offsets, or
    2-D input of fixed-size bags) as flat indices and B+1 offsets."""
    if input.dim() == 2:
        if offsets is not None:
            raise ValueError("offsets must be None when input is 2-D")
        B, L = input.shape
        offsets = (
            torch.arange(0, B * L + 1, L, dtype=input.dtype, device=input.device)
            if L > 0
            else torch.zeros(B + 1, dtype=input.dtype, device=input.device)
        )
        if per_sample_weights is not None:
            if per_sample_weights.shape != input.shape:
                raise ValueError(
                    f"per_sample_weights must have the shape of input "
                    f"{tuple(input.shape)}, got {tuple(per_sample_weights.shape)}"
                )
            per_sample_weights = per_sample_weights.reshape(-1)
        input = input.reshape(-1)
    elif input.dim() == 1:
        if offsets is None:
            raise ValueError("offsets must be given when input is 1-D")
        if offsets.dim() != 1:
            raise ValueError(f"offsets must be 1-D, got {offsets.dim()}-D")
        if offsets.dtype not in (torch.int32, torch.int64):
            raise RuntimeError(f"offsets must have dtype int32 or int64, got {offsets.dtype}")
        if offsets.dtype != input.dtype:  # as torch: both as int64, never narrowed
            input, offsets = input.long(), offsets.long()
        if not include_last_offset:
            offsets = torch.cat([offsets, offsets.new_full((1,), input.numel())])
        elif offsets.numel() > 0 and int(offsets[-1]) < input.numel():
            # torch's bags end at offsets[-1]: the indices after it take no part.
            end = max(int(offsets[-1]), 0)
            input = input[:end]
            if per_sample_weights is not None:
                per_sample_weights = per_sample_weights[:end]
    else:
        raise ValueError(f"input must be 1-D or 2-D, got {input.dim()}-D")
    return input.contiguous(), offsets.contiguous(), per_sample_weights


def convert(model: nn.Module) -> nn.Module:
    """Replaces every ``torch.nn.EmbeddingBag`` in ``model`` (in place, and
    returns it) by ``dlrm_ops.nn.EmbeddingBag`` sharing the same weight
    Parameter, so optimizers holding it keep working. A module registered
    under several names is converted once and shared as before. Subclasses of
    ``nn.EmbeddingBag`` (their forward may differ) are refused, naming them,
    before anything changes: conversion is all or nothing. An ``nn.ModuleList``
    of tables of one dim, dtype and mode becomes an ``EmbeddingBagList``: the
    same items on one buffer, which ``emb_l(offsets, indices)`` looks up in
    one call."""
    if type(model) is nn.EmbeddingBag:
        return _from_torch(model)
    places = [
        (parent, attr, sub)
        for parent in model.modules()
        for attr, sub in parent._modules.items()  # every name, repeats included
        if isinstance(sub, nn.EmbeddingBag) and not isinstance(sub, EmbeddingBag)
    ]
    subclasses = sorted(
        {
            f"{name} ({type(sub).__name__})"
            for name, sub in model.named_modules(remove_duplicate=False)
            if isinstance(sub, nn.EmbeddingBag)
            and type(sub) is not nn.EmbeddingBag
            and not isinstance(sub, EmbeddingBag)
        }
    )
    if subclasses:
        raise NotImplementedError(
            f"cannot convert subclasses of torch.nn.EmbeddingBag: {', '.join(subclasses)}; "
            "nothing was converted"
        )
    new = {}  # one conversion per module, wherever it is registered
    for parent, attr, sub in places:
        if id(sub) not in new:
            new[id(sub)] = _from_torch(sub)
        setattr(parent, attr, new[id(sub)])
    # A ModuleList of such tables: one buffer, and one call for all of them.
    for parent in list(model.modules()):
        for attr, sub in list(parent._modules.items()):
            if type(sub) is nn.ModuleList and EmbeddingBagList.batchable(list(sub)):
                setattr(parent, attr, EmbeddingBagList(list(sub)))
    return model


def _from_torch(m: nn.EmbeddingBag) -> EmbeddingBag:
    new = EmbeddingBag(
        m.num_embeddings,
        m.embedding_dim,
        max_norm=m.max_norm,
        norm_type=m.norm_type,
        scale_grad_by_freq=m.scale_grad_by_freq,
        mode=m.mode,
        sparse=m.sparse,
        include_last_offset=m.include_last_offset,
        padding_idx=m.padding_idx,
        _weight=m.weight.data,
        device=m.weight.device,
        dtype=m.weight.dtype,
    )
    new.weight = m.weight
    new.train(m.training)
    return new
