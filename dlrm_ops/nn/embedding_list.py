"""A ModuleList of embedding bags whose tables share one buffer, so that all
of them can be looked up in one kernel call (what facebookresearch/dlrm's
``apply_emb`` loop does table by table)."""

from typing import List, Optional, Sequence

import torch
from torch import nn

from .. import errors, ops, optimizers
from ._memory import empty_table


class EmbeddingBagList(nn.ModuleList):
    """``dlrm_ops.convert``'s replacement of an ``nn.ModuleList`` of
    ``nn.EmbeddingBag`` of one dim, dtype and mode: the same items (modules,
    Parameters, state_dict keys; each still callable on its own), their
    tables moved into one buffer (the Parameters keep their identity, so the
    optimizer holding them keeps working). ``emb_l(offsets, indices)`` with
    per-table ``offsets`` (B starts each, as dlrm passes them) and
    ``indices`` returns the list of pooled ``[B, D]`` tensors from one call;
    with ``apply_optimizer_in_backward`` that call's backward is one fused
    update of all the tables."""

    check: Optional[str] = None  # when CUDA reports a bad lookup (dlrm_ops.errors)

    def __init__(self, items: Sequence[nn.Module]):
        super().__init__(items)
        first = items[0]
        self.dim, self.mode = first.embedding_dim, first.mode
        rows = [m.num_embeddings for m in items]
        starts = [0]
        for n in rows[:-1]:
            starts.append(starts[-1] + n * self.dim)
        w = first.weight
        self._pack(starts)
        kw = dict(dtype=torch.int64, device=w.device)
        self.register_buffer("_woff", torch.tensor(starts, **kw), persistent=False)
        self.register_buffer(
            "_doff",
            torch.arange(0, (len(items) + 1) * self.dim, self.dim, **kw),
            persistent=False,
        )
        self.register_buffer("_rows", torch.tensor(rows, **kw), persistent=False)

    def _pack(self, starts) -> None:
        """Moves the items' tables into one buffer (their Parameters keep
        their identity) and drops the fused state built for the old one."""
        w = self[0].weight
        flat = empty_table((sum(m.weight.numel() for m in self),), w.dtype, w.device)
        with torch.no_grad():
            for m, s in zip(self, starts):
                flat[s : s + m.weight.numel()].copy_(m.weight.view(-1))
        for m, s in zip(self, starts):
            m.weight.data = flat[s : s + m.weight.numel()].view(m.weight.shape)
        self._flat = flat.requires_grad_()  # the tables' storage, as one leaf
        self._state = {}  # the fused optimizer's state, one buffer per tensor

    def _apply(self, fn, recurse=True):
        # .to(), .half() and the like give every item a tensor of its own:
        # pack them again, so that the one-call path reads what they hold.
        super()._apply(fn, recurse)
        self._pack(self._woff.tolist())
        return self

    @staticmethod
    def batchable(items) -> bool:
        from .embedding import torch_only_options

        if not items or not all(isinstance(m, nn.EmbeddingBag) for m in items):
            return False
        f = items[0]
        return all(
            not torch_only_options(m)
            and not m.include_last_offset
            and (m.embedding_dim, m.mode, m.sparse, m.weight.dtype, m.weight.device)
            == (f.embedding_dim, f.mode, f.sparse, f.weight.dtype, f.weight.device)
            for m in items
        )

    def forward(self, offsets, indices, per_sample_weights=None) -> List[torch.Tensor]:
        items = list(self)
        if len(offsets) != len(items) or len(indices) != len(items):
            raise ValueError(
                f"offsets and indices must list one tensor per table ({len(items)}), got "
                f"{len(offsets)} and {len(indices)}"
            )
        sizes = {o.numel() for o in offsets}
        if len(sizes) != 1:
            raise ValueError(f"every table's offsets must hold the batch size, got {sorted(sizes)}")
        updates = {id(m.in_backward.group) if m.in_backward else None for m in items}
        if per_sample_weights is not None or len(updates) != 1:
            # Weighted bags, or tables under different optimizers: one call each.
            psw = per_sample_weights or [None] * len(items)
            return [m(i, o, p) for m, i, o, p in zip(items, indices, offsets, psw)]
        idx = torch.cat([i.reshape(-1) for i in indices]).long()
        counts = torch.tensor([i.numel() for i in indices], device=idx.device)
        starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        off = torch.cat(
            [o.reshape(-1).long() + s for o, s in zip(offsets, starts[:-1])] + [starts[-1:]]
        )
        tables = (self._flat, self._woff, self._doff, self._rows)
        total = self.dim * len(items)
        update = items[0].in_backward
        if update is not None and torch.is_grad_enabled():
            m1, m2, step = self._fused_state(update)
            out = ops.table_batched_embedding_bag_with_optimizer(
                *tables,
                idx,
                off,
                optimizer=update.rule,
                momentum1=m1,
                momentum2=m2,
                step=step,
                hparams=update.hparams(self._flat.device),
                mode=self.mode,
                total_dim=total,
                check=self.check,
            )
            if out.grad_fn is not None and not torch.compiler.is_compiling():
                # The update writes the items' tables through the shared
                # buffer: their own version counters must move too, so that a
                # graph that saved one of them fails as after any in-place change.
                weights = [m.weight for m in items]
                out.grad_fn.register_hook(
                    lambda *_: torch.autograd.graph.increment_version(weights)
                )
        elif torch.is_grad_enabled() and any(m.weight.requires_grad for m in items):
            out = _Lookup.apply(self, idx, off, *[m.weight for m in items])
        else:
            with torch.no_grad():
                out = ops.table_batched_embedding_bag(
                    *tables, idx, off, mode=self.mode, total_dim=total, check=self.check
                )
        return list(out.split(self.dim, dim=1))

    def _fused_state(self, update):
        """momentum1, momentum2, step as one buffer each, every table's part a
        view in ``optimizer.state[weight]`` (copied in first when the
        optimizer holds other tensors, e.g. after its load_state_dict)."""
        items = list(self)
        key = (id(update.optimizer), update.rule)
        if self._state.get("key") != key:
            n = self._flat.numel()
            rows = int(self._rows.sum())
            dev = self._flat.device
            self._state = dict(
                key=key,
                m=[torch.zeros(update.spec.state_numel(w, n, rows), device=dev) for w in (1, 2)],
                step=torch.zeros(1, dtype=torch.int64, device=dev),
            )
        m, step = self._state["m"], self._state["step"]
        views = self._state.get("views")
        if views is not None and all(
            update.optimizer.state.get(w) is st and all(st.get(k) is v for k, v in kv)
            for w, st, kv in views
        ):
            return m[0], m[1], step  # the optimizer still holds our views
        views = []
        row0 = 0
        for k, item in enumerate(items):
            own = update.state(item.weight, item.num_embeddings)  # (m1, m2, step) of torch's
            e0, n = int(self._woff[k]), item.weight.numel()
            for which in (0, 1):
                layout = getattr(update.spec, f"momentum{which + 1}")
                per_element = layout == optimizers.State.ELEMENT
                part = (
                    m[which][e0 : e0 + n]
                    if per_element
                    else m[which][row0 : row0 + item.num_embeddings]
                )
                if own[which].numel() and own[which].data_ptr() != part.data_ptr():
                    part.copy_(own[which])
                    st = update.optimizer.state[item.weight]
                    key_name = _state_key(update.rule, which)
                    st[key_name] = part.view(item.weight.shape) if per_element else part
            if own[2] is not step:
                if k == 0:
                    step.copy_(own[2])
                update.optimizer.state[item.weight]["step"] = step
            st = update.optimizer.state[item.weight]
            views.append((item.weight, st, list(st.items())))
            row0 += item.num_embeddings
        self._state["views"] = views
        return m[0], m[1], step


def _state_key(rule: str, which: int) -> str:
    from .in_backward import _STATE_KEYS

    return _STATE_KEYS[rule][which]


class _Lookup(torch.autograd.Function):
    """One lookup over the list's buffer; the gradient goes to each table's
    own Parameter (sparse COO or dense, as the modules ask)."""

    @staticmethod
    def forward(ctx, lst, idx, off, *weights):
        ctx.lst, ctx.n = lst, len(weights)
        ctx.check = errors.resolve(lst.check)  # the backward's mode is the forward's
        ctx.save_for_backward(idx, off)
        with torch.no_grad():
            return ops.table_batched_embedding_bag(
                lst._flat,
                lst._woff,
                lst._doff,
                lst._rows,
                idx,
                off,
                mode=lst.mode,
                total_dim=lst.dim * len(weights),
                check=lst.check,
            )

    @staticmethod
    def backward(ctx, grad):
        lst = ctx.lst
        idx, off = ctx.saved_tensors
        items = list(lst)
        meta = (lst._woff, lst._doff, lst._rows, idx, off, ops.POOLING[lst.mode])
        grad = grad.contiguous()
        grads = []
        if items[0].sparse:
            values = ops._ops.embedding_bag_backward_sparse(grad, lst._flat, *meta, None, ctx.check)
            B = (off.numel() - 1) // len(items)
            for k, m in enumerate(items):
                lo, hi = int(off[k * B]), int(off[(k + 1) * B])
                grads.append(
                    torch.sparse_coo_tensor(
                        idx[lo:hi].unsqueeze(0),
                        values[lo * lst.dim : hi * lst.dim].view(hi - lo, lst.dim),
                        m.weight.shape,
                        check_invariants=False,
                    )
                )
        else:
            dense = ops._ops.embedding_bag_backward_dense(grad, lst._flat, *meta, None, ctx.check)
            for k, m in enumerate(items):
                e0 = int(lst._woff[k])
                grads.append(dense[e0 : e0 + m.weight.numel()].view(m.weight.shape))
        return (None, None, None, *grads)
