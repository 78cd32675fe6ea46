"""Sharded checkpoints: a directory with ``meta.pt`` (the dense layers, their
optimizer, the run, the sharding plan; written by rank 0) and one
``tables-<rank>.pt`` per rank holding its shards keyed by global table id and
row range. Any number of ranks loads it, one process included, each rank
copying the rows it now holds out of the pieces that overlap them; a
one-process checkpoint file loads into any number of ranks the same way.
Every file is a ``dlrm_ops.checkpoint`` file (checksummed, weights only)."""

import os
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .. import checkpoint, optimizers
from ..optimizers import State

META = "meta.pt"
FORMAT = "dlrm_ops.sharded/1"
STATES = ("weight", "momentum1", "momentum2")
TABLES = "sparse.tables."  # the one-process DLRM's table buffers

# (table, lo, hi, {"weight": [n, d], "momentum1": ..., "momentum2": ...})
Piece = Tuple[int, int, int, Dict[str, torch.Tensor]]


def table_views(buffers: Dict[str, Optional[torch.Tensor]], rows, dims, optimizer) -> List[dict]:
    """Per table, views ``[rows, dim]`` of the weight and of element-wise
    optimizer state and ``[rows]`` of row-wise state, in an
    ``EmbeddingBagCollection``'s layout (tables one after another)."""
    spec = optimizers.spec(optimizer) if optimizer else None
    where = {
        "weight": State.ELEMENT,
        "momentum1": spec.momentum1 if spec else State.NONE,
        "momentum2": spec.momentum2 if spec else State.NONE,
    }
    out, elem, row = [], 0, 0
    for n, d in zip(rows, dims):
        views = {}
        for name, kind in where.items():
            buf = buffers.get(name)
            if buf is None or kind == State.NONE:
                continue
            flat = buf.view(-1)
            views[name] = (
                flat[elem : elem + n * d].view(n, d)
                if kind == State.ELEMENT
                else flat[row : row + n]
            )
        out.append(views)
        elem, row = elem + n * d, row + n
    return out


def _shard_views(tables) -> List[dict]:
    """Views of each local shard of a ShardedEmbeddingBagCollection."""
    ebc = tables.tables
    if ebc is None:
        return []
    bufs = {"weight": ebc.weight.data}
    for name in ("momentum1", "momentum2"):
        bufs[name] = getattr(ebc, name, None)
    return table_views(bufs, ebc.num_embeddings, ebc.embedding_dims, ebc.optimizer)


def save(path: str, model, optimizer_state: dict, step: int, args: dict, run: dict) -> None:
    """Every rank writes its shards, rank 0 the rest; written into
    ``path.tmp`` and renamed once complete (collective: every rank calls it)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tmp, old = Path(f"{path}.tmp"), Path(f"{path}.old")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # what a killed save left
        tmp.mkdir(parents=True)
    dist.barrier()
    tables = model.embeddings
    pieces = {}
    for s, views in zip(tables.shards, _shard_views(tables)):
        for name, v in views.items():
            pieces[f"{s.table}:{s.lo}:{s.hi}:{name}"] = v.detach().cpu().clone()
    ebc = tables.tables
    extra = {} if ebc is None else {"step": ebc.step.cpu(), "hparams": ebc.hparams.cpu()}
    checkpoint.save(
        str(tmp / f"tables-{rank}.pt"), pieces, extra, step, {"rank": rank, "world_size": world}
    )
    if rank == 0:
        dense = {k: v for k, v in model.state_dict().items() if not k.startswith(TABLES)}
        meta_run = dict(run, format=FORMAT, plan=tables.plan.to_dict())
        checkpoint.save(str(tmp / META), dense, optimizer_state, step, args, meta_run)
    dist.barrier()
    if rank == 0:  # the previous checkpoint goes only once the new one is whole
        if os.path.lexists(path):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    dist.barrier()


def load_meta(path: str) -> dict:
    """``meta.pt`` of a sharded checkpoint, verified."""
    meta = checkpoint.load(str(Path(path) / META))
    if (meta.get("run") or {}).get("format") != FORMAT:
        raise checkpoint.CheckpointError(f"{path} is not a sharded dlrm_ops checkpoint")
    missing = [
        r
        for r in range(meta["run"]["plan"]["world_size"])
        if not (Path(path) / f"tables-{r}.pt").is_file()
    ]
    if missing:
        raise checkpoint.CheckpointError(f"{path} lacks the tables of ranks {missing}")
    return meta


def pieces_of_directory(path: str) -> Tuple[Iterator[Piece], dict]:
    """The table pieces of a sharded checkpoint (one rank's file in memory
    at a time) and the tables' optimizer step and hyperparameters."""
    world = load_meta(path)["run"]["plan"]["world_size"]
    extra = {}
    for r in range(world):
        c = checkpoint.load(str(Path(path) / f"tables-{r}.pt"))
        if c["optimizer"]:
            extra = c["optimizer"]
            break

    def pieces():
        for r in range(world):
            c = checkpoint.load(str(Path(path) / f"tables-{r}.pt"))
            grouped: Dict[Tuple[int, int, int], dict] = {}
            for key, v in c["model"].items():
                t, lo, hi, name = key.split(":")
                grouped.setdefault((int(t), int(lo), int(hi)), {})[name] = v
            for (t, lo, hi), views in grouped.items():
                yield t, lo, hi, views

    return pieces(), extra


def pieces_of_state(state: dict, rows, dims, optimizer) -> Tuple[Iterator[Piece], dict]:
    """The table pieces of a one-process DLRM state dict."""
    bufs = {n: state.get(TABLES + n) for n in STATES}
    views = table_views(bufs, rows, dims, optimizer)
    extra = {k: state[TABLES + k] for k in ("step", "hparams") if TABLES + k in state}
    return ((t, 0, n, v) for t, (n, v) in enumerate(zip(rows, views))), extra


def fill(targets: Sequence[Piece], pieces: Iterator[Piece], where: str) -> None:
    """Copies into each target (table, lo, hi, views) the overlapping rows of
    the pieces; every target row must be covered."""
    covered = [0] * len(targets)
    by_table: Dict[int, List[int]] = {}
    for k, (t, _, _, _) in enumerate(targets):
        by_table.setdefault(t, []).append(k)
    for t, lo, hi, src in pieces:
        for k in by_table.get(t, []):
            _, tlo, thi, dst = targets[k]
            a, b = max(lo, tlo), min(hi, thi)
            if a >= b:
                continue
            for name, v in dst.items():
                if name not in src:
                    raise checkpoint.CheckpointError(
                        f"{where}: table {t} has no {name} (saved with another optimizer?)"
                    )
                piece = src[name]
                if piece.shape[1:] != v.shape[1:]:
                    raise checkpoint.CheckpointError(
                        f"{where}: table {t}'s {name} is {tuple(piece.shape[1:])} wide, "
                        f"this model's {tuple(v.shape[1:])}"
                    )
                v[a - tlo : b - tlo].copy_(piece[a - lo : b - lo])
            covered[k] += b - a
    for k, (t, lo, hi, _) in enumerate(targets):
        if covered[k] != hi - lo:
            raise checkpoint.CheckpointError(
                f"{where}: rows {lo}..{hi} of table {t} are not all in the checkpoint"
            )


def load_tables(tables, pieces: Iterator[Piece], extra: dict, where: str) -> None:
    """Loads this rank's shards of a ShardedEmbeddingBagCollection."""
    views = _shard_views(tables)
    with torch.no_grad():
        fill([(s.table, s.lo, s.hi, v) for s, v in zip(tables.shards, views)], pieces, where)
        ebc = tables.tables
        if ebc is not None and extra:
            ebc.step.copy_(extra["step"])
            ebc.hparams.copy_(extra["hparams"])


def one_process_state(path: str, model_state: dict, rows, dims, optimizer) -> dict:
    """A sharded checkpoint as the state dict of a one-process DLRM whose
    state dict is ``model_state`` (its buffers are filled, keys replaced)."""
    meta = load_meta(path)
    state = dict(model_state)
    state.update(meta["model"])
    bufs = {n: state[TABLES + n].clone() for n in STATES if TABLES + n in state}
    views = table_views(bufs, rows, dims, optimizer)
    pieces, extra = pieces_of_directory(path)
    fill([(t, 0, n, v) for t, (n, v) in enumerate(zip(rows, views))], pieces, path)
    for n, b in bufs.items():
        state[TABLES + n] = b
    for k, v in extra.items():
        state[TABLES + k] = v
    return state
