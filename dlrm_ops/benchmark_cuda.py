"""CUDA benchmarks: each dlrm_ops kernel against the best PyTorch way on the
same GPU, in one process. Times are medians of CUDA-event-timed calls,
measured in interleaved rounds; ``ours_speedup`` is the other side's time over
ours. Run by ``python -m dlrm_ops benchmark --device cuda``."""

import gc
import statistics
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from . import ops, reference
from .benchmark import DLRM_CONFIGS, make_tbe_inputs
from .graphs import CapturedStep
from .nn import EmbeddingBagCollection, QuantizedEmbeddingBagCollection


def cuda_time_all(
    fns: Dict[str, Callable[[], object]], reps: int = 20, rounds: int = 5
) -> Dict[str, float]:
    """Median seconds per call of each contender (CUDA events around each call)."""
    for f in fns.values():  # warm-up: allocator, cuBLAS handles, compilation
        f()
        f()
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            for s, e in zip(start, end):
                s.record()
                f()
                e.record()
            torch.cuda.synchronize()
            samples[k] += [s.elapsed_time(e) / 1e3 for s, e in zip(start, end)]
    return {k: statistics.median(v) for k, v in samples.items()}


def _rows(op, times, ours, **shape):
    return [
        dict(op=op, threads=0, impl=k, ms=t * 1e3, ours_speedup=t / times[ours], **shape)
        for k, t in times.items()
    ]


def _shifted_indices(rows: int, idx, off, T, B):
    """Indices into all tables stacked as one (for a single
    nn.functional.embedding_bag call; computed once, outside the timing)."""
    shift = torch.repeat_interleave(
        torch.arange(T, device=idx.device) * rows, (off[B::B] - off[:-1:B])
    )
    return idx + shift


def run_embedding_bag(T, rows, dims, B, lengths, train: bool) -> List[dict]:
    res = []
    for D in dims:
        for L in lengths:
            inp = make_tbe_inputs(T, rows, D, B, L)
            dev = torch.device("cuda")
            idx, off = inp.indices.to(dev), inp.offsets.to(dev)
            gathered = idx.numel() * D * 4
            shifted = _shifted_indices(rows, idx, off, T, B)
            grad = torch.randn(B, T * D, device=dev)
            if not train:  # inference: no autograd on either side
                ebc = inp.ebc.to(dev)
                w = ebc.weight.detach()
                fns = {
                    "dlrm_ops": torch.no_grad()(lambda: ebc(idx, off)),
                    "torch embedding_bag (1 call)": lambda: (
                        F.embedding_bag(shifted, w, off, mode="sum", include_last_offset=True)
                        .view(T, B, D)
                        .transpose(0, 1)
                        .reshape(B, T * D)
                    ),
                }
                op = "forward, no grad (CUDA)"
            else:
                fused = EmbeddingBagCollection([rows] * T, D, optimizer="sgd", lr=0.01).to(dev)
                del inp.ebc
                w_t = torch.nn.Parameter(fused.weight.detach().clone())
                opt = torch.optim.SGD([w_t], lr=0.01)

                def torch_step(sparse):
                    opt.zero_grad()
                    F.embedding_bag(
                        shifted, w_t, off, mode="sum", include_last_offset=True, sparse=sparse
                    ).view(T, B, D).transpose(0, 1).reshape(B, T * D).backward(grad)
                    opt.step()

                fns = {
                    "dlrm_ops fused SGD": lambda: fused(idx, off).backward(grad),
                    "torch sparse grad+SGD": lambda: torch_step(True),
                    "torch dense grad+SGD": lambda: torch_step(False),
                }
                op = "train SGD (CUDA)"
            times = cuda_time_all(fns)
            for r in _rows(op, times, next(iter(fns)), T=T, rows=rows, D=D, B=B, L=L):
                r["gbs"] = gathered / (r["ms"] / 1e3) / 1e9
                res.append(r)
            del fns, inp
            gc.collect()
            torch.cuda.empty_cache()
    return res


def run_interaction(batches, T, dims) -> List[dict]:
    res = []
    dev = torch.device("cuda")
    compiled = torch.compile(reference.dot_interaction)
    for B in batches:
        for D in dims:
            for backward in (False, True):
                dense = torch.randn(B, D, device=dev, requires_grad=backward)
                sparse = torch.randn(B, T, D, device=dev, requires_grad=backward)

                def run(f):
                    if not backward:
                        return lambda: f(dense, sparse)
                    g = torch.randn_like(f(dense, sparse))
                    return lambda: torch.autograd.grad(f(dense, sparse), (dense, sparse), g)

                fns = {
                    "dlrm_ops": run(ops.dot_interaction),
                    "torch eager (bmm+gather)": run(reference.dot_interaction),
                    "torch.compile": run(compiled),
                }
                times = cuda_time_all(fns)
                op = "interaction fwd+bwd (CUDA)" if backward else "interaction forward (CUDA)"
                moved = (B * (T + 1) * D + B * (D + (T + 1) * T // 2)) * 4 * (3 if backward else 1)
                for r in _rows(op, times, "dlrm_ops", T=T, rows=0, D=D, B=B, L=0):
                    r["gbs"] = moved / (r["ms"] / 1e3) / 1e9
                    res.append(r)
    return res


def run_quantized(T, rows, dims, B, lengths) -> List[dict]:
    res = []
    dev = torch.device("cuda")
    for D in dims:
        for L in lengths:
            inp = make_tbe_inputs(T, rows, D, B, L)
            idx, off = inp.indices.to(dev), inp.offsets.to(dev)
            ebc = inp.ebc.to(dev)
            q = QuantizedEmbeddingBagCollection.from_float(ebc, bits=8)
            packed = q.packed.view(T * rows, D + 8)
            shifted = _shifted_indices(rows, idx, off, T, B)
            bag = torch.repeat_interleave(torch.arange(T * B, device=dev), off[1:] - off[:-1])
            w = ebc.weight.detach()

            def torch_int8():  # gather packed rows, dequantize, sum per bag
                r = packed[shifted]
                sb = r[:, D:].contiguous().view(torch.float32)
                v = r[:, :D].float() * sb[:, :1] + sb[:, 1:]
                out = torch.zeros(T * B, D, device=dev).index_add_(0, bag, v)
                return out.view(T, B, D).transpose(0, 1).reshape(B, T * D)

            fns = {
                "dlrm_ops int8": lambda: q(idx, off),
                "torch int8 gather+dequant": torch_int8,
                "dlrm_ops fp32": torch.no_grad()(lambda: ebc(idx, off)),
                "torch fp32 embedding_bag": lambda: F.embedding_bag(
                    shifted, w, off, mode="sum", include_last_offset=True
                ),
            }
            times = cuda_time_all(fns)
            for r in _rows(
                "int8 lookup (CUDA)", times, "dlrm_ops int8", T=T, rows=rows, D=D, B=B, L=L
            ):
                r["gbs"] = idx.numel() * (D + 8) / (r["ms"] / 1e3) / 1e9
                res.append(r)
            del fns, inp, ebc, q, packed
            gc.collect()
            torch.cuda.empty_cache()
    w = torch.randn(1_000_000, 128, device=dev)
    times = cuda_time_all(
        {
            "dlrm_ops": lambda: ops.quantize_rowwise(w, 8),
            "torch ops (reference)": lambda: reference.quantize_rowwise(w, 8),
        }
    )
    for r in _rows(
        "quantize int8 (CUDA)", times, "dlrm_ops", T=1, rows=w.shape[0], D=128, B=0, L=0
    ):
        r["gbs"] = w.numel() * 4 / (r["ms"] / 1e3) / 1e9
        res.append(r)
    return res


def run_dlrm(configs, rows, B, T=26) -> List[dict]:
    """DLRM train step and inference on the GPU, against the pure-PyTorch reference."""
    from .data import RandomData
    from .models import DLRM
    from .reference import ReferenceDLRM

    res = []
    dev = torch.device("cuda")
    loss_fn = F.binary_cross_entropy_with_logits
    for name in configs:
        D, bot, top = DLRM_CONFIGS[name]
        tables = [rows] * T
        torch.manual_seed(0)
        ours = DLRM(tables, D, bot, top, embedding_optimizer="sgd", embedding_lr=0.01)
        ref = ReferenceDLRM(tables, D, bot, top).load_from(ours).to(dev)
        ours = ours.to(dev)
        b = RandomData(
            tables, bot[0], B, 1, num_indices_per_lookup=1, fixed_indices_per_lookup=True
        ).batch(0)
        x, idx, off, y = (t.to(dev) for t in (b.dense, b.indices, b.offsets, b.labels))
        opt_o = torch.optim.SGD(ours.dense_parameters(), lr=0.01)
        opts_r = [
            torch.optim.SGD(ref.dense_parameters(), lr=0.01),
            torch.optim.SGD(ref.embedding_parameters(), lr=0.01),
        ]

        def train(model, opts):
            def step(x, idx, off, y):
                for o in opts:
                    o.zero_grad()
                loss = loss_fn(model(x, idx, off), y)
                loss.backward()
                for o in opts:
                    o.step()
                return loss.detach()

            return step

        captured = CapturedStep(train(ours, [opt_o]))
        for _ in range(captured.warmup + 1):  # eager warm-up calls, then the capture
            captured(x, idx, off, y)
        parts = {
            "train step": {
                "dlrm_ops train step": lambda: train(ours, [opt_o])(x, idx, off, y),
                "dlrm_ops train step, CUDA graph": lambda: captured(x, idx, off, y),
                "reference train step": lambda: train(ref, opts_r)(x, idx, off, y),
            },
            "inference": {
                "dlrm_ops inference": torch.no_grad()(lambda: ours(x, idx, off)),
                "reference inference": torch.no_grad()(lambda: ref(x, idx, off)),
            },
        }
        for part, fns in parts.items():
            times = cuda_time_all(fns)
            for r in _rows(
                f"DLRM {name} (CUDA, B={B}, {T} tables x {rows} rows)",
                times,
                f"dlrm_ops {part}",
                T=T,
                rows=rows,
                D=D,
                B=B,
                L=1,
            ):
                r["gbs"] = B / (r["ms"] / 1e3) / 1e6
                res.append(r)
        del ours, ref, parts, captured
        gc.collect()
        torch.cuda.empty_cache()
    return res


def run_copy(gib: float = 1.0) -> List[dict]:
    """The GPU's device-to-device copy bandwidth (bytes read + written per
    second): what the memory-bound kernels' GB/s compare with."""
    src = torch.empty(int(gib * 2**30) // 4, device="cuda")
    dst = torch.empty_like(src)
    times = cuda_time_all({"torch copy_": lambda: dst.copy_(src)})
    rows = _rows("device copy (CUDA)", times, "torch copy_", T=0, rows=0, D=0, B=0, L=0)
    for r in rows:
        r["gbs"] = 2 * src.numel() * 4 / (r["ms"] / 1e3) / 1e9
    return rows


def run_all(ops_: List[str], T: int = 26, rows: int = 1_000_000, B: int = 2048) -> List[dict]:
    res = run_copy()
    if "forward" in ops_:
        res += run_embedding_bag(T, rows, [64, 128], B, [1, 20], train=False)
    if "train" in ops_:
        res += run_embedding_bag(T, rows, [64, 128], B, [1, 20], train=True)
    if "interaction" in ops_:
        res += run_interaction([2048, 16384], T, [64, 128])
    if "quantized" in ops_:
        res += run_quantized(T, rows, [64, 128], B, [1, 20])
    if "dlrm" in ops_:
        res += run_dlrm(["kaggle", "mlperf"], rows, B)
    return res
