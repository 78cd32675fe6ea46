"""Training checkpoints: plain types and tensors only (loaded with
``torch.load(weights_only=True)``, so a crafted file cannot run code), a
SHA-256 of every stored value verified on load, and atomic writes."""

import hashlib
import os
import pickle
from pathlib import Path
from typing import Any, Dict, Optional

import torch

KEYS = ("model", "optimizer", "step", "args")


class CheckpointError(ValueError):
    pass


def _digest(obj: Any, h) -> None:
    """Feeds every value of a nest of dicts, lists, tensors and scalars to h,
    in order, with its type and shape: any changed byte changes the digest."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            _digest(k, h)
            _digest(v, h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _digest(v, h)
    else:
        h.update(f"S{type(obj).__name__}:{obj!r}".encode())


def checksum(payload: Dict[str, Any]) -> str:
    h = hashlib.sha256()
    _digest({k: v for k, v in payload.items() if k != "sha256"}, h)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: str) -> None:
    """Removes ``path.tmp.<pid>`` files of saves that were killed (their
    process is gone)."""
    p = Path(path)
    for tmp in p.parent.glob(p.name + ".tmp.*"):
        pid = tmp.name.rsplit(".", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _pid_alive(int(pid))):
            tmp.unlink(missing_ok=True)


def save(
    path: str,
    model_state: dict,
    optimizer_state: dict,
    step: int,
    args: dict,
    run: Optional[dict] = None,
) -> None:
    """Written to a temporary file and renamed: a crash never leaves half a
    checkpoint, and the next save removes what a killed one left. ``run``
    holds what resuming needs beyond the model and optimizer (positions,
    schedule, RNG states)."""
    remove_stale_temporaries(path)
    payload = {"model": model_state, "optimizer": optimizer_state, "step": int(step), "args": args}
    if run is not None:
        payload["run"] = run
    payload["sha256"] = checksum(payload)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def load(path: str) -> Dict[str, Any]:
    """The checkpoint at ``path``, verified; raises CheckpointError with the
    reason for anything else."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler names a refused object on a line of its own.
        refused = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
        if refused:
            raise CheckpointError(
                f"{path} holds objects other than tensors and plain types, and is not loaded "
                f"(only dlrm_ops checkpoints are): {refused[0]}"
            ) from None
        raise CheckpointError(f"{path} is not a readable checkpoint") from None
    except Exception as e:  # a truncated or corrupted archive
        raise CheckpointError(f"{path} is not a readable checkpoint: {e}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"{path} is not a dlrm_ops checkpoint (it holds a {type(payload).__name__}, not a dict)"
        )
    missing = [k for k in KEYS + ("sha256",) if k not in payload]
    if missing:
        raise CheckpointError(
            f"{path} is not a dlrm_ops checkpoint: it lacks {', '.join(repr(k) for k in missing)}"
        )
    if checksum(payload) != payload["sha256"]:
        raise CheckpointError(f"{path} is corrupted: its contents do not match their checksum")
    return payload
