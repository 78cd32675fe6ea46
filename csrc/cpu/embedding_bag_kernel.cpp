// Table-batched embedding bag: forward and backward loops. Compiled once per
// CPU capability (CMakeLists.txt CPU_KERNEL_SOURCES).
#include "cpu/embedding_bag_kernel.h"

#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <memory>

#include "cpu/pooling.h"
#include "cpu/sorted_lookups.h"
#include "cpu/vec.h"

namespace dlrm_ops::cpu {
namespace CPU_CAPABILITY {
namespace {

// Pools one bag over columns [d0, d0 + 16*NV) of table t, the sums held in
// registers across the bag's rows; out-of-range indices are skipped and the
// first one recorded in `bad` (on the first column block only). `stream`:
// out + d0 is 64-byte aligned and written with stream16. Whole: D is 16*NV
// (d0 = 0), so a row's prefetch is unrolled and branch-free (`lined`: wt
// starts a line and rows are whole lines); the index ahead is clamped to the
// table rather than tested.
template <int NV, bool Weighted, typename W, typename I, bool Whole = false>
inline void pool_block(const W* wt, int64_t D, uint64_t rows, const I* idx, const float* psw,
                       int64_t start, int64_t stop, int64_t table_end, int64_t d0, float scale,
                       W* out, bool stream, int64_t& bad, bool lined = false) {
  vf16 acc[NV] = {};
  for (int64_t p = start; p < stop; ++p) {
    if constexpr (Whole) {
      const uint64_t r = static_cast<uint64_t>(
          static_cast<int64_t>(idx[std::min(p + kPrefetchLookups, table_end - 1)]));
      prefetch_row_of<2, 16 * NV * sizeof(W)>(wt + (r < rows ? r : 0) * (16 * NV), lined);
    } else if (d0 == 0 && p + kPrefetchLookups < table_end) {
      const uint64_t r = static_cast<uint64_t>(static_cast<int64_t>(idx[p + kPrefetchLookups]));
      if (r < rows) prefetch_row<2>(wt + r * D, D * static_cast<int64_t>(sizeof(W)));
    }
    const uint64_t r = checked_row(idx, p, rows, d0 == 0, bad);
    if (r == kBadRow) continue;
    const W* row = wt + r * D + d0;
    if constexpr (Weighted) {
      const float s = psw[p];
#pragma GCC unroll 8
      for (int k = 0; k < NV; ++k) acc[k] += s * load16(row + 16 * k);
    } else {
#pragma GCC unroll 8
      for (int k = 0; k < NV; ++k) acc[k] += load16(row + 16 * k);
    }
  }
  if constexpr (std::is_same_v<W, float>) {
    if (stream) {
#pragma GCC unroll 8
      for (int k = 0; k < NV; ++k) stream16(out + d0 + 16 * k, acc[k] * scale);
      return;
    }
  }
#pragma GCC unroll 8
  for (int k = 0; k < NV; ++k) store16(out + d0 + 16 * k, acc[k] * scale);
}

// Columns [d0, D) when fewer than 16 remain.
template <bool Weighted, typename W, typename I>
inline void pool_tail(const W* wt, int64_t D, uint64_t rows, const I* idx, const float* psw,
                      int64_t start, int64_t stop, int64_t d0, float scale, W* out, int64_t& bad) {
  float acc[16] = {};
  const int64_t n = D - d0;
  for (int64_t p = start; p < stop; ++p) {
    const uint64_t r = checked_row(idx, p, rows, d0 == 0, bad);
    if (r == kBadRow) continue;
    row_axpy(acc, wt + r * D + d0, Weighted ? psw[p] : 1.f, n);
  }
  row_store_scaled(out + d0, acc, scale, n);
}

template <bool Weighted, typename W, typename I>
void pool_bag(const W* wt, int64_t D, uint64_t rows, const I* idx, const float* psw, int64_t start,
              int64_t stop, int64_t table_end, float scale, W* out, bool stream, int64_t& bad) {
  const int64_t d0 = for_each_column_block(D, [&](auto nv, int64_t c0) {
    pool_block<decltype(nv)::value, Weighted>(wt, D, rows, idx, psw, start, stop, table_end, c0,
                                              scale, out, stream, bad);
  });
  if (d0 < D) pool_tail<Weighted>(wt, D, rows, idx, psw, start, stop, d0, scale, out, bad);
}

// Pools bags [b0, b1) of one table (offsets `off` from its first bag) into
// rows `stride` apart from `out`. Per-bag work is only the bag's own: the
// table's values stay in registers and, when D is one block of vectors, the
// column loop is unrolled (per-bag reloads of them cost a third of a cached
// forward)
// (docs/architecture.md, "Measured choices of the CPU kernels").
template <bool Weighted, typename W, typename I>
void pool_bags(const W* wt, int64_t D, uint64_t rows, const I* idx, const float* psw, const I* off,
               int64_t b0, int64_t b1, int64_t table_end, bool mean, W* out, int64_t stride,
               bool stream, int64_t& bad_out) {
  int64_t bad = bad_out;
  auto scale_of = [&](int64_t start, int64_t stop) {
    return pooling_scale(mean ? kMean : kSum, stop - start);
  };
  const bool unrolled = with_one_block(D, [&](auto nv) {
    constexpr int NV = decltype(nv)::value;
    const bool lined = rows_on_lines(wt, 16 * NV * sizeof(W));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = off[b], stop = off[b + 1];
      pool_block<NV, Weighted, W, I, true>(wt, 16 * NV, rows, idx, psw, start, stop, table_end, 0,
                                           scale_of(start, stop), out + b * stride, stream, bad,
                                           lined);
    }
  });
  if (!unrolled) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = off[b], stop = off[b + 1];
      pool_bag<Weighted>(wt, D, rows, idx, psw, start, stop, table_end, scale_of(start, stop),
                         out + b * stride, stream, bad);
    }
  }
  bad_out = bad;
}

// Bags [b0, b1) of table t whose lookups are the table's sorted entries
// e[b0, b1), one per bag (low = position = bag), gathered in row order. A
// one-row bag's sum is its row (times its weight), copied as is.
template <int NV, typename W>
void gather_sorted(const W* wt, const uint64_t* e, const float* psw, int64_t b0, int64_t b1,
                   int64_t B, W* out, int64_t stride, bool stream) {
  const bool lined = rows_on_lines(wt, 16 * NV * sizeof(W));
  // The rows the loop would have fetched ahead of b0, up front: a table's
  // first rows came on demand, a few at a time (measured with the update's
  // prologue, register_runs).
  for (int64_t k = b0; k < std::min(b0 + kPrefetchLookups, b1); ++k) {
    prefetch_row_of<2, 16 * NV * sizeof(W)>(wt + SortedLookups::row(e[k]) * 16 * NV, lined);
  }
  for (int64_t k = b0; k < b1; ++k) {
    prefetch_row_of<2, 16 * NV * sizeof(W)>(
        wt + SortedLookups::row(e[std::min(k + kPrefetchLookups, B - 1)]) * 16 * NV, lined);
    const W* row = wt + SortedLookups::row(e[k]) * 16 * NV;
    const int64_t b = SortedLookups::low(e[k]);
    W* o = out + b * stride;
    vf16 v[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) v[j] = psw ? psw[b] * load16(row + 16 * j) : load16(row + 16 * j);
    if constexpr (std::is_same_v<W, float>) {
      if (stream) {
#pragma GCC unroll 8
        for (int j = 0; j < NV; ++j) stream16(o + 16 * j, v[j]);
        continue;
      }
    }
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) store16(o + 16 * j, v[j]);
  }
}

// The training forward gathers in row order (its sort then taken by the
// update) when every table has one lookup per bag and D one block of
// vectors, and the tables hold at least kRowOrderMinBytes: rows from memory,
// where rows near each other come cheaper together. Elsewhere it costs: the
// sort lands in a forward that must gather in bag order, and cached rows gain
// nothing from order
// (docs/architecture.md, "Measured choices of the CPU kernels").
constexpr int64_t kRowOrderMinBytes = int64_t{64} << 20;

bool gathers_in_row_order(const EmbeddingBagArgs& a, int64_t elem_bytes) {
  const TableBatch& tb = a.tb;
  // One lookup per bag: T * B lookups, whose sort must fit the held buffer.
  if (!a.lk.one_per_bag || tb.T * tb.B * 8 > kCachedScratchBytes) return false;
  int64_t bytes = 0;
  for (int64_t t = 0; t < tb.T; ++t) {
    const int64_t D = tb.dim_offsets[t + 1] - tb.dim_offsets[t];
    if (!with_one_block(D, [](auto) {})) return false;
    bytes += tb.rows[t] * D;
  }
  return bytes * elem_bytes >= kRowOrderMinBytes;
}

// The forward; with `sorted` (every table's lookups, sort_rows with
// positions; every table has one lookup per bag) in that order.
template <typename W, typename I>
int64_t pool_tables(const EmbeddingBagArgs& a, W* out, const uint64_t* sorted) {
  const TableBatch& tb = a.tb;
  const I* idx = static_cast<const I*>(a.lk.indices);
  const I* off = static_cast<const I*>(a.lk.offsets);
  const W* w = static_cast<const W*>(a.weights);
  const float* psw = a.lk.per_sample_weights;
  const bool mean = a.lk.pooling == kMean;
  const int64_t total_D = tb.dim_offsets[tb.T];
  const int64_t N = static_cast<int64_t>(off[tb.T * tb.B]);
  const bool stream = std::is_same_v<W, float> && streams_output(tb);
  FirstBad first_bad;
  parallel_balanced(tb.T * tb.B, bag_grain(tb, N), [&](int64_t begin, int64_t end, int64_t) {
    int64_t bad = INT64_MAX;
    for_each_table_range(tb, begin, end, [&](int64_t t, int64_t b0, int64_t b1) {
      const int64_t D = tb.dim_offsets[t + 1] - tb.dim_offsets[t];
      const uint64_t rows = static_cast<uint64_t>(tb.rows[t]);
      const W* wt = w + tb.weights_offsets[t];
      const I* toff = off + t * tb.B;
      const int64_t table_end = toff[tb.B];
      W* tout = out + tb.dim_offsets[t];
      const bool s = stream && on_line(tout);
      if (sorted) {  // indices were range-checked by the sort
        const float* tpsw = psw ? psw + toff[0] : nullptr;
        with_one_block(D, [&](auto nv) {
          gather_sorted<decltype(nv)::value>(wt, sorted + toff[0], tpsw, b0, b1, tb.B, tout,
                                             total_D, s);
        });
      } else if (psw) {
        pool_bags<true>(wt, D, rows, idx, psw, toff, b0, b1, table_end, mean, tout, total_D, s,
                        bad);
      } else {
        pool_bags<false>(wt, D, rows, idx, psw, toff, b0, b1, table_end, mean, tout, total_D, s,
                         bad);
      }
    });
    if (stream) stream_fence();
    first_bad.record(bad);
  });
  return first_bad.result();
}

template <typename W, typename I>
int64_t forward(const EmbeddingBagArgs& a, void* out) {
  return pool_tables<W, I>(a, static_cast<W*>(out), nullptr);
}

template <typename W, typename I>
int64_t train_forward(const EmbeddingBagArgs& a, void* out) {
  if (!gathers_in_row_order(a, sizeof(W))) return forward<W, I>(a, out);
  const I* off = static_cast<const I*>(a.lk.offsets);
  const int64_t N = static_cast<int64_t>(off[a.tb.T * a.tb.B]);
  auto [sorted, copy] = keep_forward_sorted<I>(a.tb, a.lk, N);
  std::unique_ptr<uint64_t[]> own;
  const int64_t bad =
      sort_rows<I>(a.tb, a.lk, true, sorted, sort_scratch(N + 1, own), nullptr, copy);
  if (bad >= 0) {
    drop_forward_sorted();
    return bad;
  }
  return pool_tables<W, I>(a, static_cast<W*>(out), sorted);
}

template <typename W, typename I>
int64_t backward_dense(const EmbeddingBagArgs& a, const void* grad_out_ptr, void* grad_weight_ptr) {
  const TableBatch& tb = a.tb;
  const I* off = static_cast<const I*>(a.lk.offsets);
  const W* go = static_cast<const W*>(grad_out_ptr);
  W* gw = static_cast<W*>(grad_weight_ptr);
  const int64_t D_max = max_dim(tb);
  SortedLookups s = sort_lookups<I>(tb, a.lk);
  const int64_t grain = 16384 / D_max + 1;
  for_each_table_runs<I>(
      tb, a.lk, s, go, grain, [&](int64_t t, int64_t begin, int64_t end, const GradRows<W>& grads) {
        const int64_t D = tb.dim_offsets[t + 1] - tb.dim_offsets[t];
        const int64_t start = off[t * tb.B];
        W* gw_t = gw + tb.weights_offsets[t];
        float acc_buf[256];
        std::unique_ptr<float[]> big;
        float* acc = acc_buf;
        if (D > 256) {
          big.reset(new float[D]);
          acc = big.get();
        }
        for_each_run(s.entries, begin, end, [&](int64_t row, int64_t p, int64_t q) {
          for (int64_t k = p; k < q; ++k) {
            const auto [b, sc] = s.bag_scale(s.entries[k], a.lk, off, t, tb.B, start);
            if (k == p)
              row_set(acc, grads[b], sc, D);
            else
              row_axpy(acc, grads[b], sc, D);
          }
          row_store(gw_t + row * D, acc, D);
        });
      });
  return s.first_bad;
}

template <typename W, typename I>
int64_t backward_sparse(const EmbeddingBagArgs& a, const void* grad_out_ptr,
                        const int64_t* value_offsets, void* values_ptr) {
  const TableBatch& tb = a.tb;
  const I* idx = static_cast<const I*>(a.lk.indices);
  const I* off = static_cast<const I*>(a.lk.offsets);
  const W* go = static_cast<const W*>(grad_out_ptr);
  W* values = static_cast<W*>(values_ptr);
  const int64_t total_D = tb.dim_offsets[tb.T];
  const int64_t N = static_cast<int64_t>(off[tb.T * tb.B]);
  FirstBad first_bad;
  torch::stable::parallel_for(0, tb.T * tb.B, bag_grain(tb, N), [&](int64_t begin, int64_t end) {
    int64_t bad = INT64_MAX;
    for_each_bag(tb, off, begin, end, [&](int64_t t, int64_t b, int64_t start, int64_t stop) {
      const int64_t D = tb.dim_offsets[t + 1] - tb.dim_offsets[t];
      const uint64_t rows = static_cast<uint64_t>(tb.rows[t]);
      const int64_t table_start = off[t * tb.B];
      const W* g = go + b * total_D + tb.dim_offsets[t];
      float row[256];
      for (int64_t p = start; p < stop; ++p) {
        // The values do not read the row, but their COO indices will.
        checked_row(idx, p, rows, true, bad);
        const float sc = lookup_scale(a.lk, off, t * tb.B + b, p);
        W* v = values + value_offsets[t] + (p - table_start) * D;
        for (int64_t d0 = 0; d0 < D; d0 += 256) {
          const int64_t n = std::min<int64_t>(256, D - d0);
          row_set(row, g + d0, sc, n);
          row_store(v + d0, row, n);
        }
      }
    });
    first_bad.record(bad);
  });
  return first_bad.result();
}

template <typename W, typename I>
int64_t psw_grad(const EmbeddingBagArgs& a, const void* grad_out_ptr, float* grad_psw) {
  const TableBatch& tb = a.tb;
  const I* idx = static_cast<const I*>(a.lk.indices);
  const I* off = static_cast<const I*>(a.lk.offsets);
  const W* w = static_cast<const W*>(a.weights);
  const W* go = static_cast<const W*>(grad_out_ptr);
  const int64_t total_D = tb.dim_offsets[tb.T];
  const int64_t N = static_cast<int64_t>(off[tb.T * tb.B]);
  FirstBad first_bad;
  torch::stable::parallel_for(0, tb.T * tb.B, bag_grain(tb, N), [&](int64_t begin, int64_t end) {
    int64_t bad = INT64_MAX;
    for_each_bag(tb, off, begin, end, [&](int64_t t, int64_t b, int64_t start, int64_t stop) {
      const int64_t D = tb.dim_offsets[t + 1] - tb.dim_offsets[t];
      const uint64_t rows = static_cast<uint64_t>(tb.rows[t]);
      const W* wt = w + tb.weights_offsets[t];
      const W* g = go + b * total_D + tb.dim_offsets[t];
      for (int64_t p = start; p < stop; ++p) {
        const uint64_t r = checked_row(idx, p, rows, true, bad);
        grad_psw[p] = r == kBadRow ? 0.f : row_dot(g, wt + r * D, D);
      }
    });
    first_bad.record(bad);
  });
  return first_bad.result();
}

// Offsets of a big batch come from memory: both threads read them (26 x
// 2048 one-lookup bags).
constexpr int64_t kScanGrain = 16384;

template <typename I>
int scan_offsets(const I* off, int64_t n) {
  std::atomic<int> seen{0};  // kOrdered: some pair decreases; kOnePerBag: some bag is not of one
  torch::stable::parallel_for(1, std::max<int64_t>(n, 1), kScanGrain, [&](int64_t b, int64_t e) {
    // Integer flags and no early exit: the loop vectorises (bools did not).
    uint64_t disordered = 0, other = 0;
    for (int64_t i = b; i < e; ++i) {
      disordered |= off[i] < off[i - 1];
      other |= static_cast<uint64_t>(static_cast<int64_t>(off[i])) -
               static_cast<uint64_t>(static_cast<int64_t>(off[i - 1])) - 1;
    }
    seen.fetch_or((disordered ? kOrdered : 0) | (other ? kOnePerBag : 0));
  });
  return ~seen.load() & (kOrdered | kOnePerBag);
}

int scan_offsets_entry(const void* off, bool int64, int64_t n) {
  return int64 ? scan_offsets(static_cast<const int64_t*>(off), n)
               : scan_offsets(static_cast<const int32_t*>(off), n);
}

#define DLRM_TYPED_ENTRY(name, ret, params, args)                        \
  ret name##_entry params {                                              \
    return dispatch_float(a.dtype, [&](auto* w) {                        \
      using W = std::remove_pointer_t<decltype(w)>;                      \
      return a.lk.int64 ? name<W, int64_t> args : name<W, int32_t> args; \
    });                                                                  \
  }

DLRM_TYPED_ENTRY(forward, int64_t, (const EmbeddingBagArgs& a, void* out), (a, out))
DLRM_TYPED_ENTRY(train_forward, int64_t, (const EmbeddingBagArgs& a, void* out), (a, out))
DLRM_TYPED_ENTRY(backward_dense, int64_t, (const EmbeddingBagArgs& a, const void* go, void* gw),
                 (a, go, gw))
DLRM_TYPED_ENTRY(backward_sparse, int64_t,
                 (const EmbeddingBagArgs& a, const void* go, const int64_t* vo, void* v),
                 (a, go, vo, v))
DLRM_TYPED_ENTRY(psw_grad, int64_t, (const EmbeddingBagArgs& a, const void* go, float* g),
                 (a, go, g))

}  // namespace

REGISTER_CPU_KERNEL(scan_offsets_stub, &scan_offsets_entry);
REGISTER_CPU_KERNEL(embedding_bag_forward_stub, &forward_entry);
REGISTER_CPU_KERNEL(embedding_bag_train_forward_stub, &train_forward_entry);
REGISTER_CPU_KERNEL(embedding_bag_backward_dense_stub, &backward_dense_entry);
REGISTER_CPU_KERNEL(embedding_bag_backward_sparse_stub, &backward_sparse_entry);
REGISTER_CPU_KERNEL(embedding_bag_psw_grad_stub, &psw_grad_entry);

}  // namespace CPU_CAPABILITY
}  // namespace dlrm_ops::cpu
