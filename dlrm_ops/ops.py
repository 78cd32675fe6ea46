"""The public functional API over the native ops, with their autograd and fake
(meta) kernels. Schemas live in csrc/ops.cpp; kernels in csrc/cpu, csrc/cuda."""

import contextlib
import enum
import threading
from typing import Optional

import torch

from . import _load, errors, optimizers

_load.load()
_ops = torch.ops.dlrm_ops


class Pooling(enum.IntEnum):
    """csrc/kernel_common.h's Pooling."""

    SUM = 0
    MEAN = 1


class InteractionOrder(enum.IntEnum):
    """csrc/kernel_common.h's InteractionOrder."""

    TRIL = 0
    TRIU = 1


POOLING = {"sum": Pooling.SUM, "mean": Pooling.MEAN}
ORDERS = {"tril": InteractionOrder.TRIL, "triu": InteractionOrder.TRIU}
OPTIMIZERS = {name: s.id for name, s in optimizers.OPTIMIZERS.items()}


class _Args:
    """Argument positions of an op's schema, by name: what an autograd
    backward returns and `needs_input_grad` are indexed so."""

    def __init__(self, op):
        self.pos = {a.name: i for i, a in enumerate(op._schema.arguments)}

    def __getitem__(self, name: str) -> int:
        return self.pos[name]

    def grads(self, **named):
        """One entry per argument: None but those named."""
        out = [None] * len(self.pos)
        for name, g in named.items():
            out[self.pos[name]] = g
        return tuple(out)


_EB = _Args(_ops.embedding_bag_forward.default)
_EB_OPT = _Args(_ops.embedding_bag_forward_with_optimizer.default)
_DOT = _Args(_ops.dot_interaction.default)


def _pooling(mode: str) -> int:
    if mode not in POOLING:
        raise ValueError(f"mode must be one of {sorted(POOLING)}, got {mode!r}")
    return POOLING[mode]


# Dispatch below the autograd keys, as torch.library's own autograd layer does
# when it calls the kernel (torch/_library/autograd.py).
_below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", contextlib.nullcontext)


def _autograd_function(op, setup, backward):
    """The autograd registered for `op` (`setup`, `backward`) as a plain
    torch.autograd.Function, whose per-call cost is less than half of
    torch.library's registered-autograd layers. The Function and calls
    without grad reach the kernel below the autograd keys, past those layers'
    Python (docs/architecture.md, "Measured choices of the CPU kernels").
    torch.compile and direct op calls use the registered autograd."""

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            with _below_autograd():
                out = op(*inputs)
            setup(ctx, inputs, out)
            return out

        @staticmethod
        def backward(ctx, grad):
            return backward(ctx, grad)

    def call(*inputs):
        if torch.compiler.is_compiling():
            return op(*inputs)
        if torch.is_grad_enabled():
            return Fn.apply(*inputs)
        with _below_autograd():
            return op(*inputs)

    return call


def table_batched_embedding_bag(
    weights: torch.Tensor,
    weights_offsets: torch.Tensor,
    dim_offsets: torch.Tensor,
    rows: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    *,
    mode: str = "sum",
    per_sample_weights: Optional[torch.Tensor] = None,
    sparse: bool = False,
    total_dim: Optional[int] = None,
    check: Optional[str] = None,
) -> torch.Tensor:
    """Pooled embedding lookups over T tables stored in one flat buffer.

    Table t is the ``rows[t] x D_t`` block of ``weights.view(-1)`` starting at
    element ``weights_offsets[t]``, with ``D_t = dim_offsets[t+1] - dim_offsets[t]``.
    ``indices`` (int32 or int64) holds all tables' indices table-major;
    ``offsets`` (same dtype, T*B+1 entries) delimits the bags: bag b of table t
    is ``indices[offsets[t*B+b]:offsets[t*B+b+1]]``. Returns ``[B, dim_offsets[-1]]``
    with table t's pooled vectors in columns ``dim_offsets[t]:dim_offsets[t+1]``;
    empty bags give zeros. ``sparse`` makes the weight gradient a sparse COO
    tensor, as ``nn.EmbeddingBag(sparse=True)``. ``check`` is when a bad lookup
    is reported on CUDA (``dlrm_ops.errors``; None: the global mode). Pass
    ``total_dim`` on CUDA: reading it from ``dim_offsets`` waits for the GPU.
    """
    if total_dim is None:
        total_dim = int(dim_offsets[-1])
    return _embedding_bag(
        weights,
        weights_offsets,
        dim_offsets,
        rows,
        indices,
        offsets,
        _pooling(mode),
        per_sample_weights,
        total_dim,
        sparse,
        errors.resolve(check),
    )


def table_batched_embedding_bag_with_optimizer(
    weights: torch.Tensor,
    weights_offsets: torch.Tensor,
    dim_offsets: torch.Tensor,
    rows: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    *,
    optimizer: str,
    momentum1: torch.Tensor,
    momentum2: torch.Tensor,
    step: torch.Tensor,
    hparams: torch.Tensor,
    mode: str = "sum",
    per_sample_weights: Optional[torch.Tensor] = None,
    total_dim: Optional[int] = None,
    stochastic_rounding: bool = False,
    check: Optional[str] = None,
) -> torch.Tensor:
    """`table_batched_embedding_bag` whose backward updates ``weights`` in place
    with ``optimizer`` (a name of ``dlrm_ops.optimizers.OPTIMIZERS``; the exact
    rules are in ``csrc/optimizers.h``) instead of producing a weight gradient.
    ``momentum1``/``momentum2`` are the fp32 optimizer state (sized by
    ``OptimizerSpec.state_numel``), ``step`` an int64 counter, ``hparams``
    float64 in ``HParam`` order (``optimizers.hparams`` makes them); all are
    updated or read in the backward. ``per_sample_weights`` still get their
    gradient. ``check``: as in `table_batched_embedding_bag`."""
    optimizers.spec(optimizer)
    if total_dim is None:
        total_dim = int(dim_offsets[-1])
    return _embedding_bag_with_optimizer(
        weights,
        weights_offsets,
        dim_offsets,
        rows,
        indices,
        offsets,
        _pooling(mode),
        per_sample_weights,
        total_dim,
        momentum1,
        momentum2,
        step,
        hparams,
        OPTIMIZERS[optimizer],
        stochastic_rounding,
        errors.resolve(check),
    )


_LOOKUP_ARGS = ("weights_offsets", "dim_offsets", "rows", "indices", "offsets")


def _same_device(ref_name, ref, names, tensors):
    """The fake kernels' device check. They also run, as the Meta kernels, when
    a meta tensor is mixed with real ones (Meta outranks CPU in dispatch), so
    without it such a call would return uninitialised memory."""
    for name, t in zip(names, tensors):
        if isinstance(t, torch.Tensor) and t.device != ref.device:
            raise RuntimeError(
                f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}"
            )


def _fake_lookups(ref_name, ref, lookups, per_sample_weights=None):
    _same_device(
        ref_name,
        ref,
        _LOOKUP_ARGS + ("per_sample_weights",),
        tuple(lookups) + (per_sample_weights,),
    )
    rows, indices, offsets = lookups[2], lookups[3], lookups[4]
    # The kernels' shape and dtype checks, so that traced graphs fail alike.
    torch._check(rows.numel() >= 1, lambda: "rows must list at least one table")
    torch._check(
        indices.dtype in (torch.int32, torch.int64),
        lambda: f"indices must have dtype int32 or int64, got {indices.dtype}",
    )
    torch._check(
        offsets.dtype == indices.dtype,
        lambda: f"offsets must have the dtype of indices ({indices.dtype})",
    )
    torch._check(
        indices.dim() == 1 and offsets.dim() == 1, lambda: "indices and offsets must be 1-D"
    )
    torch._check(
        (offsets.numel() - 1) % rows.numel() == 0,
        lambda: f"offsets must have T*B+1 entries for T = {rows.numel()} tables",
    )
    if per_sample_weights is not None:
        torch._check(
            per_sample_weights.numel() == indices.numel(),
            lambda: "per_sample_weights must have one entry per index",
        )
    return (offsets.numel() - 1) // rows.numel()


@torch.library.register_fake("dlrm_ops::embedding_bag_forward")
def _(
    weights,
    weights_offsets,
    dim_offsets,
    rows,
    indices,
    offsets,
    pooling,
    per_sample_weights,
    total_dim,
    sparse=False,
    check=0,
):
    B = _fake_lookups(
        "weights",
        weights,
        (weights_offsets, dim_offsets, rows, indices, offsets),
        per_sample_weights,
    )
    return weights.new_empty((B, total_dim))


@torch.library.register_fake("dlrm_ops::embedding_bag_forward_with_optimizer")
def _(
    weights,
    weights_offsets,
    dim_offsets,
    rows,
    indices,
    offsets,
    pooling,
    per_sample_weights,
    total_dim,
    *state,
):
    B = _fake_lookups(
        "weights",
        weights,
        (weights_offsets, dim_offsets, rows, indices, offsets),
        per_sample_weights,
    )
    _same_device("weights", weights, ("momentum1", "momentum2", "step", "hparams"), state[:4])
    return weights.new_empty((B, total_dim))


@torch.library.register_fake("dlrm_ops::embedding_bag_update_")
def _(
    grad_output,
    weights,
    momentum1,
    momentum2,
    step,
    weights_offsets,
    dim_offsets,
    rows,
    indices,
    offsets,
    pooling,
    per_sample_weights,
    hparams,
    optimizer,
    stochastic_rounding,
    check=0,
):
    _fake_lookups(
        "weights",
        weights,
        (weights_offsets, dim_offsets, rows, indices, offsets),
        per_sample_weights,
    )
    _same_device(
        "weights",
        weights,
        ("grad_output", "momentum1", "momentum2", "step", "hparams"),
        (grad_output, momentum1, momentum2, step, hparams),
    )
    return None


def _fake_grad(
    grad_output,
    weights,
    weights_offsets,
    dim_offsets,
    rows,
    indices,
    offsets,
    pooling,
    per_sample_weights=None,
    check=0,
):
    """The checks of the backward ops' fake kernels (any mix of positional and
    keyword arguments, as the call gave them)."""
    lookups = (weights_offsets, dim_offsets, rows, indices, offsets)
    _fake_lookups("weights", weights, lookups, per_sample_weights)
    _same_device("weights", weights, ("grad_output",), (grad_output,))
    return indices


@torch.library.register_fake("dlrm_ops::embedding_bag_backward_dense")
def _(grad_output, weights, *args, **kwargs):
    _fake_grad(grad_output, weights, *args, **kwargs)
    return torch.empty_like(weights)


@torch.library.register_fake("dlrm_ops::embedding_bag_backward_sparse")
def _(grad_output, weights, *args, **kwargs):
    _fake_grad(grad_output, weights, *args, **kwargs)
    n = torch.library.get_ctx().new_dynamic_size()
    return weights.new_empty((n,))


@torch.library.register_fake("dlrm_ops::embedding_bag_per_sample_weights_grad")
def _(grad_output, weights, weights_offsets, dim_offsets, rows, indices, offsets, pooling, check=0):
    lookups = (weights_offsets, dim_offsets, rows, indices, offsets)
    _fake_grad(grad_output, weights, *lookups, pooling)
    return weights.new_empty(indices.shape, dtype=torch.float32)


@torch.library.register_fake("dlrm_ops::take_lookup_error")
def _(device):
    return torch.empty(9, dtype=torch.long)


def _sparse_weight_grad(values, weights, weights_offsets, dim_offsets, rows, indices, offsets):
    """Sparse COO gradient of `weights` from one gradient row per lookup."""
    T = rows.numel()
    B = (offsets.numel() - 1) // T
    counts = (
        (offsets[B::B] - offsets[:-1:B]).long()
        if B > 0
        else torch.zeros(T, dtype=torch.long, device=offsets.device)
    )
    dims = dim_offsets[1:] - dim_offsets[:-1]
    n = indices.numel()
    if weights.dim() == 2:  # all tables share D: one COO row per lookup
        D = weights.shape[1]
        row_base = torch.repeat_interleave(weights_offsets // D, counts, output_size=n)
        coo = (indices.long() + row_base).unsqueeze(0)
        return torch.sparse_coo_tensor(
            coo, values.view(n, D), weights.shape, check_invariants=False
        )
    # Mixed dims over a flat buffer: one COO entry per element.
    d_per = torch.repeat_interleave(dims, counts, output_size=n)
    start = torch.repeat_interleave(weights_offsets, counts, output_size=n) + indices.long() * d_per
    first = torch.cumsum(d_per, 0) - d_per
    total = values.numel()
    elem = torch.repeat_interleave(start - first, d_per, output_size=total) + torch.arange(
        total, device=values.device
    )
    return torch.sparse_coo_tensor(elem.unsqueeze(0), values, weights.shape, check_invariants=False)


def _embedding_bag_setup(ctx, inputs, output):
    (
        weights,
        weights_offsets,
        dim_offsets,
        rows,
        indices,
        offsets,
        pooling,
        per_sample_weights,
        total_dim,
        sparse,
        check,
    ) = inputs
    ctx.save_for_backward(
        weights, weights_offsets, dim_offsets, rows, indices, offsets, per_sample_weights
    )
    ctx.pooling = pooling
    ctx.sparse = sparse
    ctx.check = check


def _embedding_bag_backward(ctx, grad):
    weights, woff, doff, rows, indices, offsets, psw = ctx.saved_tensors
    grad = grad.contiguous()
    grad_weights = grad_psw = None
    meta = (woff, doff, rows, indices, offsets, ctx.pooling)
    if ctx.needs_input_grad[_EB["weights"]]:
        if ctx.sparse:
            values = _ops.embedding_bag_backward_sparse(grad, weights, *meta, psw, ctx.check)
            grad_weights = _sparse_weight_grad(values, weights, woff, doff, rows, indices, offsets)
        else:
            grad_weights = _ops.embedding_bag_backward_dense(grad, weights, *meta, psw, ctx.check)
    if psw is not None and ctx.needs_input_grad[_EB["per_sample_weights"]]:
        grad_psw = _ops.embedding_bag_per_sample_weights_grad(grad, weights, *meta, ctx.check)
        grad_psw = grad_psw.to(psw.dtype)
    return _EB.grads(weights=grad_weights, per_sample_weights=grad_psw)


torch.library.register_autograd(
    "dlrm_ops::embedding_bag_forward", _embedding_bag_backward, setup_context=_embedding_bag_setup
)
_embedding_bag = _autograd_function(
    _ops.embedding_bag_forward.default, _embedding_bag_setup, _embedding_bag_backward
)


_update_lock = threading.Lock()


def _with_optimizer_setup(ctx, inputs, output):
    (
        weights,
        woff,
        doff,
        rows,
        indices,
        offsets,
        pooling,
        psw,
        total_dim,
        m1,
        m2,
        step,
        hparams,
        optimizer,
        stochastic_rounding,
        check,
    ) = inputs
    # The weights' values at the forward are read back only for the gradient of
    # per_sample_weights: only then are they saved, so that an update of them
    # in between (another fused backward) fails the unpacking, as an in-place
    # change of a saved tensor does. The update itself works on them as they are.
    ctx.reads_weights = psw is not None and ctx.needs_input_grad[_EB_OPT["per_sample_weights"]]
    if not ctx.reads_weights:
        ctx.weights = weights
    ctx.save_for_backward(
        weights if ctx.reads_weights else None,
        woff,
        doff,
        rows,
        indices,
        offsets,
        psw,
        m1,
        m2,
        step,
        hparams,
    )
    ctx.pooling = pooling
    ctx.optimizer = optimizer
    ctx.stochastic_rounding = stochastic_rounding
    ctx.check = check


def _with_optimizer_backward(ctx, grad):
    weights, woff, doff, rows, indices, offsets, psw, m1, m2, step, hparams = ctx.saved_tensors
    grad = grad.contiguous()
    meta = (woff, doff, rows, indices, offsets, ctx.pooling)
    grad_psw = None
    if ctx.reads_weights:  # before the weights change
        grad_psw = _ops.embedding_bag_per_sample_weights_grad(grad, weights, *meta, ctx.check)
        grad_psw = grad_psw.to(psw.dtype)
    else:
        weights = ctx.weights
    # One fused update at a time: backward passes from several Python threads
    # would otherwise lose each other's updates of the rows they share.
    with contextlib.nullcontext() if torch.compiler.is_compiling() else _update_lock:
        _ops.embedding_bag_update_(
            grad,
            weights,
            m1,
            m2,
            step,
            *meta,
            psw,
            hparams,
            ctx.optimizer,
            ctx.stochastic_rounding,
            ctx.check,
        )
    # In place: autograd's checks of saved tensors must see the change.
    torch.autograd.graph.increment_version(weights)
    return _EB_OPT.grads(per_sample_weights=grad_psw)


torch.library.register_autograd(
    "dlrm_ops::embedding_bag_forward_with_optimizer",
    _with_optimizer_backward,
    setup_context=_with_optimizer_setup,
)
_embedding_bag_with_optimizer = _autograd_function(
    _ops.embedding_bag_forward_with_optimizer.default,
    _with_optimizer_setup,
    _with_optimizer_backward,
)


def dot_interaction(
    dense: torch.Tensor,
    sparse: torch.Tensor,
    *,
    self_interaction: bool = False,
    order: str = "tril",
) -> torch.Tensor:
    """DLRM's pairwise dot interaction in one native op.

    Features are ``[dense, sparse_1, ..., sparse_T]`` (``dense [B, D]``,
    ``sparse [B, T, D]`` or the ``[B, T*D]`` output of an
    ``EmbeddingBagCollection``, read in place, or a list of T ``[B, D]``
    tensors, read in place when they are an ``EmbeddingBagList``'s output).
    Returns ``[B, D + P]``: ``dense`` followed by the P dot products of
    distinct feature pairs (and each feature with itself if
    ``self_interaction``), ordered as facebookresearch/dlrm
    (``order="tril"``: i > j, row-major) or torchrec (``"triu"``: i < j).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {sorted(ORDERS)}, got {order!r}")
    if isinstance(sparse, (list, tuple)):
        sparse = _features(sparse)
    return _dot_interaction(dense, sparse, self_interaction, ORDERS[order])


def _features(ly) -> torch.Tensor:
    """A list of [B, D] features as one [B, T*D] tensor: the tensor they are
    consecutive column blocks of (an EmbeddingBagList's output), read in
    place, or else their concatenation."""
    base = ly[0]._base if len(ly) else None
    if base is not None and base.dim() == 2 and all(t._base is base for t in ly):
        D = ly[0].shape[1]
        if base.shape[1] == D * len(ly) and all(
            t.shape == ly[0].shape and t.storage_offset() == base.storage_offset() + k * D
            for k, t in enumerate(ly)
        ):
            return base
    return torch.cat(ly, 1)


def _interaction_pairs(F, self_interaction):
    return F * (F + 1) // 2 if self_interaction else F * (F - 1) // 2


@torch.library.register_fake("dlrm_ops::dot_interaction")
def _(dense, sparse, self_interaction=False, order=0):
    _same_device("dense", dense, ("sparse",), (sparse,))
    torch._check(dense.dim() == 2, lambda: f"dense must be 2-D, got {dense.dim()}-D")
    torch._check(sparse.dtype == dense.dtype, lambda: "sparse must have the dtype of dense")
    torch._check(sparse.dim() in (2, 3), lambda: "sparse must be [B, T, D] or [B, T*D]")
    B, D = dense.shape
    T = sparse.shape[1] if sparse.dim() == 3 else sparse.shape[1] // D
    return dense.new_empty((B, D + _interaction_pairs(T + 1, self_interaction)))


@torch.library.register_fake("dlrm_ops::dot_interaction_backward")
def _(grad_output, dense, sparse, self_interaction, order):
    _same_device("dense", dense, ("grad_output", "sparse"), (grad_output, sparse))
    return torch.empty_like(dense), torch.empty_like(sparse, memory_format=torch.contiguous_format)


def _interaction_setup(ctx, inputs, output):
    dense, sparse, self_interaction, order = inputs
    ctx.save_for_backward(dense, sparse)
    ctx.self_interaction = self_interaction
    ctx.order = order


def _interaction_backward(ctx, grad):
    dense, sparse = ctx.saved_tensors
    grad_dense, grad_sparse = _ops.dot_interaction_backward(
        grad, dense, sparse, ctx.self_interaction, ctx.order
    )
    return _DOT.grads(dense=grad_dense, sparse=grad_sparse)


torch.library.register_autograd(
    "dlrm_ops::dot_interaction", _interaction_backward, setup_context=_interaction_setup
)
_dot_interaction = _autograd_function(
    _ops.dot_interaction.default, _interaction_setup, _interaction_backward
)


def quantize_rowwise(weight: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Row-wise quantizes ``weight [R, D]`` (fp32/fp16/bf16) to packed uint8 rows,
    byte-identical to ``torch.ops.quantized.embedding_bag_byte_prepack`` (8-bit,
    ``[D x uint8][fp32 scale][fp32 bias]``) or ``embedding_bag_4bit_prepack``
    (4-bit, D even, ``[D/2 bytes][fp16 scale][fp16 bias]``) for fp32 input.
    A row holding inf or NaN gets NaN scale or bias: it dequantizes to NaN."""
    return _ops.quantize_rowwise(weight, bits)


def dequantize_rowwise(
    packed: torch.Tensor, bits: int = 8, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of ``quantize_rowwise``: ``scale * q + bias`` per row."""
    return _ops.dequantize_rowwise(packed, bits, dtype)


def quantized_table_batched_embedding_bag(
    packed: torch.Tensor,
    weights_offsets: torch.Tensor,
    dim_offsets: torch.Tensor,
    rows: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    *,
    bits: int = 8,
    mode: str = "sum",
    per_sample_weights: Optional[torch.Tensor] = None,
    total_dim: Optional[int] = None,
    output_dtype: torch.dtype = torch.float32,
    check: Optional[str] = None,
) -> torch.Tensor:
    """``table_batched_embedding_bag`` over packed quantized tables: table t's
    packed rows start at byte ``weights_offsets[t]`` of the flat uint8
    ``packed``; rows are dequantized inside the kernel, never copied.
    ``check``: as in `table_batched_embedding_bag`."""
    if total_dim is None:
        total_dim = int(dim_offsets[-1])
    return _ops.quantized_embedding_bag_forward(
        packed,
        weights_offsets,
        dim_offsets,
        rows,
        indices,
        offsets,
        _pooling(mode),
        per_sample_weights,
        total_dim,
        bits,
        output_dtype,
        errors.resolve(check),
    )


def _packed_row_bytes(D, bits):
    return D + 8 if bits == 8 else D // 2 + 4


@torch.library.register_fake("dlrm_ops::quantize_rowwise")
def _(weight, bits):
    torch._check(bits in (8, 4), lambda: f"bits must be 8 or 4, got {bits}")
    torch._check(weight.dim() == 2, lambda: f"weight must be 2-D, got {weight.dim()}-D")
    return weight.new_empty(
        (weight.shape[0], _packed_row_bytes(weight.shape[1], bits)), dtype=torch.uint8
    )


@torch.library.register_fake("dlrm_ops::dequantize_rowwise")
def _(packed, bits, dtype=None):
    torch._check(bits in (8, 4), lambda: f"bits must be 8 or 4, got {bits}")
    torch._check(packed.dtype == torch.uint8, lambda: "packed must have dtype uint8")
    D = packed.shape[1] - 8 if bits == 8 else (packed.shape[1] - 4) * 2
    return packed.new_empty((packed.shape[0], D), dtype=dtype or torch.float32)


@torch.library.register_fake("dlrm_ops::quantized_embedding_bag_forward")
def _(
    packed,
    weights_offsets,
    dim_offsets,
    rows,
    indices,
    offsets,
    pooling,
    per_sample_weights,
    total_dim,
    bits,
    output_dtype=None,
    check=0,
):
    B = _fake_lookups(
        "packed", packed, (weights_offsets, dim_offsets, rows, indices, offsets), per_sample_weights
    )
    return packed.new_empty((B, total_dim), dtype=output_dtype or torch.float32)
