"""Benchmarks of dlrm_ops kernels against the best PyTorch way, in one process.

``python -m dlrm_ops benchmark`` prints, per shape and thread count, the time
of each contender, effective GB/s (bytes of embedding rows gathered / time) and
its ratio to dlrm_ops. The pytest-benchmark suites in benchmarks/ reuse the
input builders here.
"""

import ctypes
import gc
import itertools
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .nn import EmbeddingBagCollection
from .nn._memory import empty_table


def zipf_indices(
    rows: int, n: int, alpha: float = 1.05, seed: int = 0, draws: int = 1
) -> np.ndarray:
    """[draws, n] indices in [0, rows) with Zipf(alpha) popularity; the hot
    rows are scattered over the table (a random permutation), as real
    categories are, and shared by the draws, as a table's batches share them."""
    rng = np.random.default_rng(seed)
    ranks = [rng.zipf(alpha, n)]
    perm = rng.permutation(rows)
    ranks += [np.random.default_rng([seed, k]).zipf(alpha, n) for k in range(1, draws)]
    return perm[(np.stack(ranks) - 1) % rows]


# Batches cycled through by every contender: the 1-per-bag Kaggle batch
# touches ~11 MB of distinct rows, which a repeated batch would keep in the
# 48 MB L3 between calls; 16 batches touch ~140 MB, so rows come cold from
# memory as in training (the Zipf-hot rows stay cached, as they would).
DISTINCT_BATCHES = 16


@dataclass
class TBEInputs:
    ebc: EmbeddingBagCollection
    batches: List[torch.Tensor]  # each batch's indices; all share offsets
    offsets: torch.Tensor
    T: int
    B: int
    L: int

    @property
    def indices(self) -> torch.Tensor:
        return self.batches[0]

    def in_turn(self, fn: Callable, prepare: Callable = lambda idx: (idx,)) -> Callable:
        """A call of fn on the next batch each time, its arguments prepared
        up front so that a timing holds only the call. Every contender starts
        at batch 0."""
        args = itertools.cycle([prepare(idx) for idx in self.batches])
        return lambda: fn(*next(args))

    def per_table(self, idx: torch.Tensor) -> List[tuple]:
        """idx split by table, each part with its table's own offsets."""
        n = self.B * self.L
        return [
            (idx[t * n : (t + 1) * n], self.offsets[t * self.B : (t + 1) * self.B + 1] - t * n)
            for t in range(self.T)
        ]

    @property
    def gathered_bytes(self) -> int:
        return self.indices.numel() * self.ebc.embedding_dims[0] * self.ebc.weight.element_size()


def make_tbe_inputs(
    T: int,
    rows: int,
    D: int,
    B: int,
    L: int,
    dtype=torch.float32,
    dist: str = "zipf",
    seed: int = 0,
    batches: int = DISTINCT_BATCHES,
) -> TBEInputs:
    """T tables of `rows` x D; `batches` batches of B bags of exactly L
    indices per table."""
    if batches < 1:
        raise ValueError(f"batches must be at least 1, got {batches}")
    ebc = EmbeddingBagCollection([rows] * T, D, dtype=dtype)
    n = B * L
    if dist == "zipf":  # [T, batches, n]
        per_table = np.stack(
            [zipf_indices(rows, n, seed=seed + t, draws=batches) for t in range(T)]
        )
        idx = [per_table[:, k].reshape(-1) for k in range(batches)]
    else:
        idx = [
            np.random.default_rng([seed, k] if k else seed).integers(0, rows, T * n)
            for k in range(batches)
        ]
    offsets = torch.arange(0, T * n + 1, L, dtype=torch.int64)
    return TBEInputs(ebc, [torch.from_numpy(i.astype(np.int64)) for i in idx], offsets, T, B, L)


def time_fn(fn: Callable[[], object], min_time: float = 0.3, min_reps: int = 5) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return statistics.median(times)


def time_all(
    fns: Dict[str, Callable[[], object]], min_time: float = 0.3, rounds: int = 5
) -> Dict[str, float]:
    """Median seconds per call of each contender, measured in interleaved
    rounds so that drifting machine load hits all of them alike."""
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            samples[k].append(time_fn(f, min_time / rounds, min_reps=3))
    return {k: statistics.median(v) for k, v in samples.items()}


# A plain C gather-and-sum loop over the same rows: the random-gather ceiling
# that the targets are stated against; and the fused SGD step's
# algorithm in plain C with no framework around it (sgd_step, D <= 1024), the
# reference for what is overhead. Compiled at run time with cc.
_PROBE_SRC = r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
/* Table-major bags summed into out [B, T*D]; row r of STRIDE elements of
   type ROW is added into o by the statements after the third argument. */
#define POOL(NAME, ROW, STRIDE, ...)                                            \
  void NAME(const ROW* w, int64_t rows, int64_t D, int64_t T, int64_t B,       \
            const int64_t* idx, const int64_t* off, float* out, int nthreads) { \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")         \
    for (int64_t tb = 0; tb < T * B; ++tb) {                                    \
      int64_t t = tb / B, b = tb % B;                                           \
      float* o = out + b * T * D + t * D;                                       \
      memset(o, 0, D * sizeof(float));                                         \
      for (int64_t p = off[tb]; p < off[tb + 1]; ++p) {                         \
        const ROW* r = w + (t * rows + idx[p]) * (STRIDE);                      \
        __VA_ARGS__                                                             \
      }                                                                         \
    }                                                                           \
  }
POOL(pool, float, D, for (int64_t d = 0; d < D; ++d) o[d] += r[d];)
/* 8-bit rows [D x uint8][fp32 scale][fp32 bias] */
POOL(pool_int8, uint8_t, D + 8,
     float sb[2];
     memcpy(sb, r + D, sizeof(sb));
     for (int64_t d = 0; d < D; ++d) o[d] += sb[0] * r[d] + sb[1];)

/* Stable LSD radix sort of k[0, n) on bits [32, 32 + nbits), 11 per pass;
   returns the buffer (k or tmp) holding the result. */
static uint64_t* radix(uint64_t* k, uint64_t* tmp, int64_t n, int nbits) {
  for (int shift = 32; shift < 32 + nbits; shift += 11) {
    int64_t count[2049] = {0};
    for (int64_t i = 0; i < n; ++i) ++count[((k[i] >> shift) & 2047) + 1];
    for (int d = 0; d < 2048; ++d) count[d + 1] += count[d];
    for (int64_t i = 0; i < n; ++i) tmp[count[(k[i] >> shift) & 2047]++] = k[i];
    uint64_t* s = k; k = tmp; tmp = s;
  }
  return k;
}

/* The fused SGD step at its plainest: the forward (rows prefetched 128
   lookups ahead, output streamed when its rows are whole 32-byte vectors),
   then per table the lookups sorted by row and each touched row updated once
   with its summed gradient, w -= lr * g (weights and gradient rows
   prefetched). w [T*rows, D] as our buffer; keys and tmp hold N words;
   D <= 1024 (its stack rows). */
void sgd_step(float* w, int64_t rows, int64_t D, int64_t T, int64_t B, const int64_t* idx,
              const int64_t* off, const float* grad, float* out, float lr, uint64_t* keys,
              uint64_t* tmp, int nthreads) {
  const int stream = D % 8 == 0 && (uintptr_t)out % 32 == 0 && D <= 1024;
  _Pragma("omp parallel for num_threads(nthreads) schedule(static)")
  for (int64_t tb = 0; tb < T * B; ++tb) {
    const int64_t t = tb / B, b = tb % B, end = off[(t + 1) * B];
    const float* wt = w + t * rows * D;
    float acc[1024];
    float* o = out + b * T * D + t * D;
    float* sum = stream ? acc : o;
    memset(sum, 0, D * sizeof(float));
    for (int64_t p = off[tb]; p < off[tb + 1]; ++p) {
      if (p + 128 < end)
        for (int64_t l = 0; l < D * 4; l += 64) _mm_prefetch((const char*)(wt + idx[p + 128] * D) + l, _MM_HINT_T1);
      const float* r = wt + idx[p] * D;
      for (int64_t d = 0; d < D; ++d) sum[d] += r[d];
    }
    if (stream)
      for (int64_t d = 0; d < D; d += 8) _mm256_stream_ps(o + d, _mm256_loadu_ps(acc + d));
  }
  _mm_sfence();
  const int nbits = rows <= 1 ? 0 : 64 - __builtin_clzll((uint64_t)rows - 1);
  _Pragma("omp parallel for num_threads(nthreads) schedule(static)")
  for (int64_t t = 0; t < T; ++t) {
    const int64_t start = off[t * B], n = off[(t + 1) * B] - start;
    uint64_t* e = keys + start;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t p = off[t * B + b]; p < off[t * B + b + 1]; ++p)
        e[p - start] = ((uint64_t)idx[p] << 32) | (uint64_t)b;
    const uint64_t* s = radix(e, tmp + start, n, nbits);
    float* wt = w + t * rows * D;
    const float* gt = grad + t * D;
    float g[1024];
    for (int64_t p = 0; p < n;) {
      const uint64_t r = s[p] >> 32;
      int64_t q = p + 1;
      while (q < n && (s[q] >> 32) == r) ++q;
      if (q + 8 <= n)
        for (int64_t l = 0; l < D * 4; l += 64) _mm_prefetch((const char*)(wt + (s[q + 7] >> 32) * D) + l, _MM_HINT_T0);
      if (q + 64 <= n)
        for (int64_t l = 0; l < D * 4; l += 64) _mm_prefetch((const char*)(wt + (s[q + 63] >> 32) * D) + l, _MM_HINT_T1);
      for (int64_t k = p + 12; k < q + 12 && k < n; ++k)
        for (int64_t l = 0; l < D * 4; l += 64) _mm_prefetch((const char*)(gt + (s[k] & 0xffffffffu) * T * D) + l, _MM_HINT_T0);
      memcpy(g, gt + (s[p] & 0xffffffffu) * T * D, D * sizeof(float));
      for (int64_t k = p + 1; k < q; ++k) {
        const float* x = gt + (s[k] & 0xffffffffu) * T * D;
        for (int64_t d = 0; d < D; ++d) g[d] += x[d];
      }
      float* wr = wt + r * D;
      for (int64_t d = 0; d < D; ++d) wr[d] -= lr * g[d];
      p = q;
    }
  }
}

#define PREFETCH_LINES(p, bytes, hint) \
  for (int64_t l = 0; l < (bytes); l += 64) _mm_prefetch((const char*)(p) + l, hint)

/* floor_step's two passes over table t, inlined with D a constant where it is
   one, so that their loops unroll as the fused step's do (loops per row's
   lines cost the floor 1.3x at D=64). */
static inline __attribute__((always_inline)) void floor_gather(
    const float* w, int64_t rows, const int64_t D, int64_t T, int64_t B, const uint64_t* sorted,
    float* out, int64_t t) {
  const uint64_t* e = sorted + t * B;
  const float* wt = w + t * rows * D;
  for (int64_t k = 0; k < B; ++k) {
    PREFETCH_LINES(wt + (e[k + 128 < B ? k + 128 : B - 1] >> 32) * D, D * 4, _MM_HINT_T1);
    const float* r = wt + (e[k] >> 32) * D;
    float* o = out + (e[k] & 0xffffffffu) * T * D + t * D;
    for (int64_t d = 0; d < D; d += 8) _mm256_stream_ps(o + d, _mm256_loadu_ps(r + d));
  }
}

static inline __attribute__((always_inline)) void floor_walk(
    float* w, int64_t rows, const int64_t D, int64_t T, int64_t B, const uint64_t* sorted,
    const float* grad, float lr, float eps, float* state, int64_t t) {
  const uint64_t* e = sorted + t * B;
  float* wt = w + t * rows * D;
  float* st = state ? state + t * rows : 0;
  const float* gt = grad + t * D;
  __m256 g[128];
  for (int64_t p = 0; p < B;) {
    const uint64_t r = e[p] >> 32;
    int64_t q = p;
    for (; q < B && (e[q] >> 32) == r; ++q) {
      PREFETCH_LINES(gt + (e[q + 12 < B ? q + 12 : B - 1] & 0xffffffffu) * T * D, D * 4,
                     _MM_HINT_T0);
      const float* x = gt + (e[q] & 0xffffffffu) * T * D;
      for (int64_t j = 0; j < D / 8; ++j)
        g[j] = q == p ? _mm256_loadu_ps(x + 8 * j) : _mm256_add_ps(g[j], _mm256_loadu_ps(x + 8 * j));
    }
    const uint64_t rn = e[q + 7 < B ? q + 7 : B - 1] >> 32, rf = e[q + 63 < B ? q + 63 : B - 1] >> 32;
    PREFETCH_LINES(wt + rn * D, D * 4, _MM_HINT_T0);
    PREFETCH_LINES(wt + rf * D, D * 4, _MM_HINT_T1);
    float step = lr;
    if (st) {  /* row-wise Adagrad: s += mean(g * g), step lr / (sqrt(s) + eps) */
      _mm_prefetch((const char*)(st + rn), _MM_HINT_T0);
      _mm_prefetch((const char*)(st + rf), _MM_HINT_T1);
      __m256 sq = _mm256_mul_ps(g[0], g[0]);
      for (int64_t j = 1; j < D / 8; ++j) sq = _mm256_fmadd_ps(g[j], g[j], sq);
      float lanes[8], sum = 0.f;
      _mm256_storeu_ps(lanes, sq);
      for (int k = 0; k < 8; ++k) sum += lanes[k];
      st[r] += sum / (float)D;
      step = lr / (sqrtf(st[r]) + eps);
    }
    const __m256 s8 = _mm256_set1_ps(step);
    float* wr = wt + r * D;
    for (int64_t j = 0; j < D / 8; ++j)
      _mm256_storeu_ps(wr + 8 * j, _mm256_fnmadd_ps(s8, g[j], _mm256_loadu_ps(wr + 8 * j)));
    p = q;
  }
}

/* The parallel loops stay in the caller of the inlined passes, so that the
   constant DV reaches the code OpenMP outlines. */
#define FLOOR_WITH(DV)                                                               \
  {                                                                                  \
    _Pragma("omp parallel num_threads(nthreads)") {                                  \
      _Pragma("omp for schedule(static) nowait")                                     \
      for (int64_t t = 0; t < T; ++t) floor_gather(w, rows, DV, T, B, sorted, out, t); \
      _mm_sfence();                                                                  \
    }                                                                                \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")               \
    for (int64_t t = 0; t < T; ++t) floor_walk(w, rows, DV, T, B, sorted, grad, lr, eps, state, t); \
  }

/* One lookup per bag: the SGD step's memory traffic and nothing more, the
   floor of any step that gathers in row order. Each table's B lookups come
   sorted by row (`sorted` [T, B]: row << 32 | bag, sorted before the timing);
   the forward copies each row into its bag's output in that order, then the
   walk sums each row's gradient rows and updates it once, w -= lr * g. The
   prefetch distances are the fused step's. No sort, no checks, no framework.
   With `state` (one float per row, [T, rows]; NULL for SGD) the update is
   row-wise Adagrad's. D % 8 == 0, D <= 1024, out 32-byte aligned. */
void floor_step(float* w, int64_t rows, int64_t D, int64_t T, int64_t B,
                       const uint64_t* sorted, const float* grad, float* out, float lr, float eps,
                       float* state, int nthreads) {
  switch (D) {
    case 16: FLOOR_WITH(16) break;
    case 32: FLOOR_WITH(32) break;
    case 64: FLOOR_WITH(64) break;
    case 128: FLOOR_WITH(128) break;
    default: FLOOR_WITH(D)
  }
}
"""
_PROBE_ARGS = {  # ctypes argument types of each probe function
    "pool": ["p", "i64", "i64", "i64", "i64", "p", "p", "p", "int"],
    "pool_int8": ["p", "i64", "i64", "i64", "i64", "p", "p", "p", "int"],
    "sgd_step": ["p", "i64", "i64", "i64", "i64", "p", "p", "p", "p", "float", "p", "p", "int"],
    "floor_step": ["p", "i64", "i64", "i64", "i64", "p", "p", "p", "float", "float", "p", "int"],
}


def _load_probe(name: str = "pool") -> Optional[Callable]:
    try:
        d = tempfile.mkdtemp(prefix="dlrm_ops_probe_")
        src, lib = os.path.join(d, "probe.c"), os.path.join(d, "probe.so")
        with open(src, "w") as f:
            f.write(_PROBE_SRC)
        subprocess.run(
            ["cc", "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", src, "-o", lib],
            check=True,
            capture_output=True,
        )
        fn = getattr(ctypes.CDLL(lib), name)
    except (OSError, subprocess.CalledProcessError):
        return None
    types = {
        "p": ctypes.c_void_p,
        "i64": ctypes.c_int64,
        "int": ctypes.c_int,
        "float": ctypes.c_float,
    }
    fn.argtypes = [types[a] for a in _PROBE_ARGS[name]]
    fn.restype = None
    return fn


def _fbgemm_tbe(inp: TBEInputs):
    """FBGEMM's CPU table-batched embedding sharing our weights, if installed."""
    try:
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )
    except Exception:  # noqa: BLE001 - optional dependency, any import failure means absent
        return None
    rows, D = inp.ebc.num_embeddings[0], inp.ebc.embedding_dims[0]
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, D, EmbeddingLocation.HOST, ComputeDevice.CPU)] * inp.T
    )
    return _fbgemm_on_huge_pages(tbe, inp.ebc.weight)


def _huge_copy(src: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A copy of src (in dtype, src's by default) on huge pages, as our tables."""
    return empty_table(src.shape, dtype or src.dtype).copy_(src)


def _fbgemm_on_huge_pages(tbe, weights: torch.Tensor):
    """FBGEMM's host buffers (weights from ours, optimizer state as it set it)
    moved onto huge pages like ours and torch's: its constructor touches them
    first, so under THP "madvise" they would get 4 KiB pages and every random
    row a TLB miss (its training steps took 1.12-1.29x the time so)."""
    with torch.no_grad():
        for name in ("weights_host", "momentum1_host", "momentum2_host"):
            old = getattr(tbe, name, None)
            if old is None or old.numel() == 0:
                continue
            param = isinstance(old, torch.nn.Parameter)
            dtype, grad = old.dtype, old.requires_grad
            src = weights.detach().view(-1) if name == "weights_host" else old
            setattr(tbe, name, None)  # FBGEMM's weights freed first: one copy at a time
            del old
            new = _huge_copy(src, dtype)
            setattr(tbe, name, torch.nn.Parameter(new, requires_grad=grad) if param else new)
    return tbe


def embedding_bag_contenders(inp: TBEInputs, threads: int) -> Dict[str, Callable]:
    ebc, T, B = inp.ebc, inp.T, inp.B
    rows, D = ebc.num_embeddings[0], ebc.embedding_dims[0]
    off = inp.offsets
    tables = [ebc.weight_of(t).detach() for t in range(T)]
    table_base = torch.arange(T).repeat_interleave(B * inp.L) * rows
    stacked_w = ebc.weight.detach()
    out = {}
    with torch.no_grad():
        out["dlrm_ops"] = inp.in_turn(lambda i: ebc(i, off))
        out["torch loop"] = inp.in_turn(
            lambda per_table: torch.cat(
                [
                    F.embedding_bag(i, w, o, mode="sum", include_last_offset=True)
                    for w, (i, o) in zip(tables, per_table)
                ],
                1,
            ),
            lambda i: (inp.per_table(i),),
        )
        # One call over all tables stacked: bags in (table, batch) order, then
        # a transpose into [B, T*D].
        out["torch stacked"] = inp.in_turn(
            lambda stacked_idx: (
                F.embedding_bag(stacked_idx, stacked_w, off, mode="sum", include_last_offset=True)
                .view(T, B, D)
                .transpose(0, 1)
                .reshape(B, T * D)
            ),
            lambda i: (i + table_base,),
        )
    tbe = _fbgemm_tbe(inp)
    if tbe is not None and ebc.weight.dtype == torch.float32:
        out["fbgemm TBE"] = inp.in_turn(lambda i: tbe(i, off))
    probe = _load_probe() if ebc.weight.dtype == torch.float32 else None
    if probe is not None:
        res = torch.empty(B, T * D)
        out["C gather probe"] = inp.in_turn(
            lambda i: probe(
                stacked_w.data_ptr(),
                rows,
                D,
                T,
                B,
                i.data_ptr(),
                off.data_ptr(),
                res.data_ptr(),
                threads,
            )
        )
    return {k: torch.no_grad()(v) for k, v in out.items()}


def run_embedding_bag(
    T: int,
    rows: int,
    dims: List[int],
    B: int,
    lengths: List[int],
    threads: List[int],
    dtype=torch.float32,
    min_time: float = 0.3,
    batches: int = DISTINCT_BATCHES,
) -> List[dict]:
    results = []
    for D in dims:
        for L in lengths:
            inp = make_tbe_inputs(T, rows, D, B, L, dtype, batches=batches)
            for th in threads:
                torch.set_num_threads(th)
                fns = embedding_bag_contenders(inp, th)
                ref = fns["dlrm_ops"]()  # both on batch 0
                check = fns["torch loop"]()
                torch.testing.assert_close(ref, check, atol=1e-4, rtol=1e-4)
                times = time_all(fns, min_time)
                for k, t in times.items():
                    results.append(
                        dict(
                            op="embedding_bag",
                            T=T,
                            rows=rows,
                            D=D,
                            B=B,
                            L=L,
                            threads=th,
                            impl=k,
                            ms=t * 1e3,
                            gbs=inp.gathered_bytes / t / 1e9,
                            ours_speedup=t / times["dlrm_ops"],
                        )
                    )
                del fns, ref, check
                gc.collect()
            del inp
            gc.collect()
    return results


def _fbgemm_training_tbe(inp: TBEInputs, optimizer: str, lr: float, eps: float):
    try:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType as OptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )
    except Exception:  # noqa: BLE001 - optional dependency
        return None
    opt = {
        "sgd": OptimType.EXACT_SGD,
        "rowwise_adagrad": OptimType.EXACT_ROWWISE_ADAGRAD,
        "adagrad": OptimType.EXACT_ADAGRAD,
    }.get(optimizer)
    if opt is None:
        return None
    rows, D = inp.ebc.num_embeddings[0], inp.ebc.embedding_dims[0]
    return _fbgemm_on_huge_pages(
        SplitTableBatchedEmbeddingBagsCodegen(
            [(rows, D, EmbeddingLocation.HOST, ComputeDevice.CPU)] * inp.T,
            optimizer=opt,
            learning_rate=lr,
            eps=eps,
        ),
        inp.ebc.weight,
    )


def training_contenders(
    inp: TBEInputs, optimizer: str, lr: float = 0.01, dense: bool = False
) -> Dict[str, Callable]:
    """Forward + backward + update of one batch, by every way available."""
    T, B, D = inp.T, inp.B, inp.ebc.embedding_dims[0]
    rows = inp.ebc.num_embeddings[0]
    off = inp.offsets
    grad = torch.randn(B, T * D, dtype=inp.ebc.weight.dtype)
    fused = EmbeddingBagCollection(
        [rows] * T, D, dtype=inp.ebc.weight.dtype, optimizer=optimizer, lr=lr
    )
    fused.weight = inp.ebc.weight  # every contender updates the same rows: one copy in memory
    out = {"dlrm_ops fused": inp.in_turn(lambda i: fused(i, off).backward(grad))}
    out["dlrm_ops fused"].module = fused  # its state, for tests/test_benchmark.py

    torch_opt = {
        "sgd": torch.optim.SGD,
        "adagrad": torch.optim.Adagrad,
        "adam": torch.optim.SparseAdam,
    }.get(optimizer)
    if torch_opt is not None:
        tables = [
            torch.nn.EmbeddingBag.from_pretrained(
                inp.ebc.weight_of(t).detach(),
                freeze=False,
                mode="sum",
                sparse=True,
                include_last_offset=True,
            )
            for t in range(T)
        ]
        opt = torch_opt([m.weight for m in tables], lr=lr)
        with torch.no_grad():  # Adagrad's sums onto huge pages, as our state is
            for w in opt.state:
                for k, v in opt.state[w].items():
                    if torch.is_tensor(v) and v.shape == w.shape:
                        opt.state[w][k] = _huge_copy(v)

        def torch_step(per_table):
            opt.zero_grad()
            torch.cat([m(i, o) for m, (i, o) in zip(tables, per_table)], 1).backward(grad)
            opt.step()

        out[f"torch sparse+{torch_opt.__name__}"] = inp.in_turn(
            torch_step, lambda i: (inp.per_table(i),)
        )
    if optimizer == "sgd":  # one sparse gradient for all tables: faster than per table.
        # (Not for Adagrad: a second set of full-size sums would not fit at D=128.)
        stacked = torch.nn.Parameter(inp.ebc.weight.detach())  # our buffer
        stacked_opt = torch.optim.SGD([stacked], lr=lr)
        table_base = torch.arange(T).repeat_interleave(B * inp.L) * rows

        def stacked_step(stacked_idx):
            stacked_opt.zero_grad()
            F.embedding_bag(
                stacked_idx, stacked, off, mode="sum", include_last_offset=True, sparse=True
            ).view(T, B, D).transpose(0, 1).reshape(B, T * D).backward(grad)
            stacked_opt.step()

        out["torch stacked sparse+SGD"] = inp.in_turn(stacked_step, lambda i: (i + table_base,))
    if dense and optimizer == "sgd":
        dense_ebc = inp.ebc
        dense_opt = torch.optim.SGD(dense_ebc.parameters(), lr=lr)

        def dense_step(i):
            dense_opt.zero_grad()
            dense_ebc(i, off).backward(grad)
            dense_opt.step()

        out["dense grad+SGD"] = inp.in_turn(dense_step)
    probe = (
        _load_probe("sgd_step")
        if optimizer == "sgd" and inp.ebc.weight.dtype == torch.float32 and D <= 1024
        else None
    )
    if probe is not None:  # on our buffer, as the torch contenders
        w = inp.ebc.weight.detach()
        res = torch.empty(B, T * D)
        keys = torch.empty(2, inp.indices.numel(), dtype=torch.int64)
        out["C SGD step probe"] = inp.in_turn(
            lambda i: probe(
                w.data_ptr(),
                rows,
                D,
                T,
                B,
                i.data_ptr(),
                off.data_ptr(),
                grad.data_ptr(),
                res.data_ptr(),
                lr,
                keys[0].data_ptr(),
                keys[1].data_ptr(),
                torch.get_num_threads(),
            )
        )
    eps = float(fused.hparams[1])  # the fused module's default for this optimizer
    floors = {"sgd": "C SGD floor probe", "rowwise_adagrad": "C row-wise floor probe"}
    floor = (
        _load_probe("floor_step")
        if optimizer in floors
        and inp.ebc.weight.dtype == torch.float32
        and inp.L == 1
        and D % 8 == 0
        and D <= 1024
        else None
    )
    if floor is not None:  # each batch's lookups sorted by row up front: the floor's input
        w = inp.ebc.weight.detach()
        res = torch.empty(B, T * D)
        bags = torch.arange(B).expand(T, B)
        state = (
            None if optimizer == "sgd" else _huge_copy(fused.momentum1)
        )  # on huge pages, as ours
        state_args = (0.0, None) if state is None else (eps, state.data_ptr())

        def by_row(i):
            return (torch.sort((i.view(T, B) << 32) | bags, dim=1).values.contiguous(),)

        floor_step = inp.in_turn(
            lambda e: floor(
                w.data_ptr(),
                rows,
                D,
                T,
                B,
                e.data_ptr(),
                grad.data_ptr(),
                res.data_ptr(),
                lr,
                *state_args,
                torch.get_num_threads(),
            ),
            by_row,
        )
        floor_step.out = res  # its forward's output, for tests/test_benchmark.py
        floor_step.state = state
        out[floors[optimizer]] = floor_step
    tbe = (
        _fbgemm_training_tbe(inp, optimizer, lr, eps)
        if inp.ebc.weight.dtype == torch.float32
        else None
    )
    if tbe is not None:
        fbgemm_step = inp.in_turn(lambda i: tbe(i, off).backward(grad))
        fbgemm_step.tbe = tbe  # its own weights, for tests/test_benchmark.py
        out["fbgemm TBE"] = fbgemm_step
    return out


def run_training(
    T: int,
    rows: int,
    dims: List[int],
    B: int,
    lengths: List[int],
    threads: List[int],
    optimizers: List[str],
    dense: bool = False,
    min_time: float = 0.3,
    batches: int = DISTINCT_BATCHES,
) -> List[dict]:
    results = []
    for D in dims:
        for L in lengths:
            inp = make_tbe_inputs(T, rows, D, B, L, batches=batches)
            for optimizer in optimizers:
                fns = training_contenders(inp, optimizer, dense=dense)
                for th in threads:
                    torch.set_num_threads(th)
                    times = time_all(fns, min_time)
                    for k, t in times.items():
                        results.append(
                            dict(
                                op=f"train {optimizer}",
                                T=T,
                                rows=rows,
                                D=D,
                                B=B,
                                L=L,
                                threads=th,
                                impl=k,
                                ms=t * 1e3,
                                gbs=inp.gathered_bytes / t / 1e9,
                                ours_speedup=t / times["dlrm_ops fused"],
                            )
                        )
                del fns
                gc.collect()
            del inp
            gc.collect()
    return results


def interaction_contenders(B: int, T: int, D: int, backward: bool) -> Dict[str, Callable]:
    """Forward (or forward+backward) of the dot interaction, ours against the
    eager bmm+gather reference and torch.compile of it."""
    from . import ops, reference

    dense = torch.randn(B, D, requires_grad=backward)
    sparse = torch.randn(B, T * D, requires_grad=backward)  # as an EmbeddingBagCollection gives
    grad = torch.randn(B, D + (T + 1) * T // 2)
    compiled = torch.compile(reference.dot_interaction)
    impls = {
        "dlrm_ops": ops.dot_interaction,
        "torch eager": reference.dot_interaction,
        "torch.compile": compiled,
    }

    def make(f):
        if backward:  # gradients returned, not accumulated into .grad
            return lambda: torch.autograd.grad(f(dense, sparse), (dense, sparse), grad)
        return torch.no_grad()(lambda: f(dense, sparse))

    return {k: make(f) for k, f in impls.items()}


def run_interaction(
    batches: List[int], T: int, dims: List[int], threads: List[int], min_time: float = 0.3
) -> List[dict]:
    results = []
    for backward in (False, True):
        for B in batches:
            for D in dims:
                fns = interaction_contenders(B, T, D, backward)
                moved = 4 * B * ((T + 1) * D + D + (T + 1) * T // 2) * (2 if backward else 1)
                for th in threads:
                    torch.set_num_threads(th)
                    times = time_all(fns, min_time)
                    for k, t in times.items():
                        results.append(
                            dict(
                                op="interaction " + ("fwd+bwd" if backward else "fwd"),
                                T=T,
                                rows=0,
                                D=D,
                                B=B,
                                L=0,
                                threads=th,
                                impl=k,
                                ms=t * 1e3,
                                gbs=moved / t / 1e9,
                                ours_speedup=t / times["dlrm_ops"],
                            )
                        )
    return results


def quantized_contenders(inp: TBEInputs, bits: int) -> Dict[str, Callable]:
    """Pooled lookup over packed tables: ours, a loop of torch's quantized
    ops over the tables, and our fp32 collection on the same (float) tables."""
    from .nn import QuantizedEmbeddingBagCollection

    ebc, T, B = inp.ebc, inp.T, inp.B
    q = QuantizedEmbeddingBagCollection.from_float(ebc, bits)
    off = inp.offsets
    op = (
        torch.ops.quantized.embedding_bag_byte_rowwise_offsets
        if bits == 8
        else torch.ops.quantized.embedding_bag_4bit_rowwise_offsets
    )
    tables = [q.packed_of(t) for t in range(T)]
    probe = _load_probe("pool_int8") if bits == 8 else None
    fns = {
        f"dlrm_ops int{bits}": inp.in_turn(lambda i: q(i, off)),
        f"torch int{bits} loop": inp.in_turn(
            lambda per_table: torch.cat(
                [
                    op(w, i, o, False, 0, False, None, None, True)
                    for w, (i, o) in zip(tables, per_table)
                ],
                1,
            ),
            lambda i: (inp.per_table(i),),
        ),
        "dlrm_ops fp32": inp.in_turn(lambda i: ebc(i, off)),
    }
    if probe is not None:  # all tables' packed rows stacked on huge pages, as ours hold them
        stacked = empty_table((sum(len(w) for w in tables), tables[0].shape[1]), tables[0].dtype)
        torch.cat(tables, out=stacked)
        rows, D = ebc.num_embeddings[0], ebc.embedding_dims[0]
        res = torch.empty(B, T * D)
        fns["C gather probe"] = inp.in_turn(
            lambda i: probe(
                stacked.data_ptr(),
                rows,
                D,
                T,
                B,
                i.data_ptr(),
                off.data_ptr(),
                res.data_ptr(),
                torch.get_num_threads(),
            )
        )
    return {k: torch.no_grad()(f) for k, f in fns.items()}


def run_quantized(
    T: int,
    rows: int,
    dims: List[int],
    B: int,
    lengths: List[int],
    threads: List[int],
    bits_list: List[int],
    min_time: float = 0.3,
    batches: int = DISTINCT_BATCHES,
) -> List[dict]:
    results = []
    for D in dims:
        for L in lengths:
            inp = make_tbe_inputs(T, rows, D, B, L, batches=batches)
            for bits in bits_list:
                fns = quantized_contenders(inp, bits)
                row_bytes = D + 8 if bits == 8 else D // 2 + 4
                for th in threads:
                    torch.set_num_threads(th)
                    times = time_all(fns, min_time)
                    ours = times[f"dlrm_ops int{bits}"]
                    for k, t in times.items():
                        gathered = inp.indices.numel() * (D * 4 if "fp32" in k else row_bytes)
                        results.append(
                            dict(
                                op=f"quantized lookup int{bits}",
                                T=T,
                                rows=rows,
                                D=D,
                                B=B,
                                L=L,
                                threads=th,
                                impl=k,
                                ms=t * 1e3,
                                gbs=gathered / t / 1e9,
                                ours_speedup=t / ours,
                            )
                        )
                del fns
                gc.collect()
            del inp
            gc.collect()
    return results


def run_quantize(rows: int, D: int, threads: List[int], min_time: float = 0.3) -> List[dict]:
    """Quantizing one [rows, D] fp32 table: ours against torch's prepack."""
    from . import ops

    w = torch.randn(rows, D)
    results = []
    for bits in (8, 4):
        prepack = (
            torch.ops.quantized.embedding_bag_byte_prepack
            if bits == 8
            else torch.ops.quantized.embedding_bag_4bit_prepack
        )
        fns = {
            f"dlrm_ops int{bits}": lambda: ops.quantize_rowwise(w, bits),
            f"torch prepack int{bits}": lambda: prepack(w),
        }
        for th in threads:
            torch.set_num_threads(th)
            times = time_all(fns, min_time)
            for k, t in times.items():
                results.append(
                    dict(
                        op=f"quantize int{bits}",
                        T=1,
                        rows=rows,
                        D=D,
                        B=0,
                        L=0,
                        threads=th,
                        impl=k,
                        ms=t * 1e3,
                        gbs=w.numel() * 4 / t / 1e9,
                        ours_speedup=t / times[f"dlrm_ops int{bits}"],
                    )
                )
    return results


DLRM_CONFIGS = {  # dim, bottom MLP, top MLP
    "kaggle": (16, [13, 512, 256, 64, 16], [512, 256, 1]),
    "mlperf": (128, [13, 512, 256, 128], [1024, 1024, 512, 256, 1]),
}


def run_dlrm(
    configs: List[str],
    rows: int,
    B: int,
    threads: List[int],
    min_time: float = 0.3,
    T: int = 26,
    bf16: bool = False,
) -> List[dict]:
    """DLRM train step and inference, dlrm_ops against the pure-PyTorch
    reference, with the train step split into its parts (each part timed on
    its own, forward + backward). ``bf16``: also dlrm_ops' bf16 model against
    the fp32 reference and the reference under ``torch.autocast`` to bf16."""
    from . import ops
    from .data import RandomData
    from .models import DLRM
    from .reference import ReferenceDLRM, dot_interaction

    results = []
    for name in configs:
        D, bot, top = DLRM_CONFIGS[name]
        tables = [rows] * T
        torch.manual_seed(0)
        ours = DLRM(tables, D, bot, top, embedding_optimizer="sgd", embedding_lr=0.01)
        ref = ReferenceDLRM(tables, D, bot, top).load_from(ours)
        # Fresh batches in turn, as in training: rows come cold from memory.
        data = RandomData(
            tables, bot[0], B, 16, num_indices_per_lookup=1, fixed_indices_per_lookup=True
        )
        batches = itertools.cycle([data.batch(i) for i in range(16)])
        b = data.batch(0)
        opt_o = torch.optim.SGD(ours.dense_parameters(), lr=0.01)
        opt_r = torch.optim.SGD(ref.dense_parameters(), lr=0.01)
        emb_r = torch.optim.SGD(ref.embedding_parameters(), lr=0.01)
        loss_fn = torch.nn.functional.binary_cross_entropy_with_logits

        def train(model, opts):
            def step():
                nb = next(batches)
                for o in opts:
                    o.zero_grad()
                loss_fn(model(nb.dense, nb.indices, nb.offsets), nb.labels).backward()
                for o in opts:
                    o.step()

            return step

        def infer(model):
            def run():
                nb = next(batches)
                return model(nb.dense, nb.indices, nb.offsets)

            return torch.no_grad()(run)

        dense_x = ours.bottom(b.dense).detach().requires_grad_()
        ly = ours.sparse(b.indices, b.offsets).detach().requires_grad_()
        g_ly = torch.randn(B, T * D)
        z = ops.dot_interaction(dense_x, ly).detach().requires_grad_()

        def emb_ref():
            emb_r.zero_grad()
            outs = []
            for t, m in enumerate(ref.tables):
                outs.append(m(b.indices[t * B : (t + 1) * B], b.offsets[: B + 1]))
            torch.cat(outs, 1).backward(g_ly)
            emb_r.step()

        def mlps():
            ours.bottom(b.dense).sum().backward()
            ours.top(z).sum().backward()

        def autocast(fn):
            def run():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return fn()

            return run

        parts = {
            "train step": (train(ours, [opt_o]), train(ref, [opt_r, emb_r])),
            "inference": (infer(ours), infer(ref)),
            "  embeddings+update": (
                lambda: ours.sparse(b.indices, b.offsets).backward(g_ly),
                emb_ref,
            ),
            "  interaction": (
                lambda: ops.dot_interaction(dense_x, ly).sum().backward(),
                lambda: dot_interaction(dense_x, ly.view(B, T, D)).sum().backward(),
            ),
            "  MLPs": (mlps, mlps),
            "  dense optimizer": (opt_o.step, opt_r.step),
        }
        groups = {part: {"dlrm_ops": o, "reference": r} for part, (o, r) in parts.items()}

        def in_bf16(fn):  # our model switched to bf16 for the call (no second copy)
            def run():
                ours.precision = "bf16"
                try:
                    return fn()
                finally:
                    ours.precision = "fp32"

            return run

        if bf16:
            groups["bf16 train step"] = {
                "dlrm_ops": in_bf16(train(ours, [opt_o])),
                "reference fp32": train(ref, [opt_r, emb_r]),
                "reference autocast": autocast(train(ref, [opt_r, emb_r])),
            }
            groups["bf16 inference"] = {
                "dlrm_ops": in_bf16(infer(ours)),
                "reference fp32": infer(ref),
                "reference autocast": autocast(infer(ref)),
            }
        for th in threads:
            torch.set_num_threads(th)
            for part, contenders in groups.items():
                times = time_all(contenders, min_time)
                for k, t in times.items():
                    results.append(
                        dict(
                            op=f"DLRM {name} (B={B}, {T} tables x {rows} rows)",
                            T=T,
                            rows=rows,
                            D=D,
                            B=B,
                            L=1,
                            threads=th,
                            impl=f"{k} {part}",
                            ms=t * 1e3,
                            gbs=B / t / 1e6,
                            ours_speedup=t / times["dlrm_ops"],
                        )
                    )
        del ours, ref, parts, groups
        gc.collect()
    return results


def print_table(results: List[dict]) -> None:
    cols = ["T", "rows", "D", "B", "L", "threads", "impl", "ms", "gbs", "ours_speedup"]
    heads = ["T", "rows", "D", "B", "L", "thr", "implementation", "ms", "GB/s", "dlrm_ops x"]
    widths = [3, 8, 4, 5, 3, 3, 24, 9, 7, 10]
    op = None
    for r in results:
        if r["op"] != op:
            op = r["op"]
            print(f"\n{op}")
            print("  ".join(h.rjust(w) for h, w in zip(heads, widths)))
        cells = []
        for c, w in zip(cols, widths):
            v = r[c]
            cells.append(
                (f"{v:.3f}" if c == "ms" else f"{v:.2f}" if isinstance(v, float) else str(v)).rjust(
                    w
                )
            )
        print("  ".join(cells))


def machine() -> str:
    """The CPU (or GPU) and software the figures come from, in one line."""
    import platform

    import dlrm_ops

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = dlrm_ops.build_info()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu} ({os.cpu_count()} cores, dlrm_ops CPU kernels: {info['cpu_capability']}){gpu}, "
        f"torch {torch.__version__}"
    )


def write_markdown(path: str, results: List[dict], command: str) -> None:
    """The results as markdown tables, one per op, with the machine and the
    command that produced them; rows where the other side is faster say so."""
    lines = [
        f"Machine: {machine()}.",
        "",
        f"Command: `{command}`",
        "",
        "\"dlrm_ops x\" is the other side's time over dlrm_ops' time in the same process "
        "(above 1: dlrm_ops is faster).",
    ]
    op = None
    for r in results:
        if "config" in r:  # the drop-in benchmark's rows
            if op != "dropin":
                op = "dropin"
                lines += [
                    "",
                    "**a user's dlrm-style model, train step** (x: the stock model's time over "
                    "this one's)",
                    "",
                    "| config | threads | model | ms | x stock |",
                    "|---|---|---|---|---|",
                ]
            lines.append(
                f"| {r['config']} | {r['threads']} | {r['impl']} | {r['ms']:.2f} | "
                f"{r['speedup']:.2f}x |"
            )
            continue
        if r.get("op") != op:
            op = r.get("op")
            lines += [
                "",
                f"**{op}**",
                "",
                "| T x rows | D | B | per bag | threads | implementation | ms | GB/s | dlrm_ops x |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
        x = r["ours_speedup"]
        ratio = f"{x:.2f}x" + (" (other faster)" if x < 1 else "") if isinstance(x, float) else x
        gbs = f"{r['gbs']:.2f}" if isinstance(r["gbs"], float) else r["gbs"]
        lines.append(
            f"| {r['T']} x {r['rows']} | {r['D']} | {r['B']} | {r['L']} | {r['threads']} | "
            f"{r['impl']} | {r['ms']:.3f} | {gbs} | {ratio} |"
        )
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
