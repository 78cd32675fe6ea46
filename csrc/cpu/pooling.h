// Pieces shared by the kernels that walk the lookups of a table batch
// (fp32 and quantized pooling, their backward passes, the fused optimizer).
#pragma once

#ifndef CPU_CAPABILITY
#error "include only from kernels compiled per CPU capability (see vec.h)"
#endif

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <memory>

#include <torch/csrc/stable/ops.h>

#include "cpu/embedding_bag_kernel.h"

namespace dlrm_ops::cpu::CPU_CAPABILITY {

// Lookups ahead whose rows are prefetched by the pooled gathers: enough to
// cover DRAM latency for random rows of large tables, tuned with rows cold
// from memory
// (docs/architecture.md, "Measured choices of the CPU kernels").
constexpr int64_t kPrefetchLookups = 128;
constexpr int64_t kPrefetchQuantizedLookups = 32;

// The row of lookup p, or kBadRow when out of range for a table of `rows`
// rows (negative indices included); then p is recorded in `bad` if `record`.
constexpr uint64_t kBadRow = ~uint64_t{0};
template <typename I>
inline uint64_t checked_row(const I* idx, int64_t p, uint64_t rows, bool record, int64_t& bad) {
  const uint64_t r = static_cast<uint64_t>(static_cast<int64_t>(idx[p]));
  if (r < rows) return r;
  if (record && p < bad) bad = p;
  return kBadRow;
}

// The smallest out-of-range position any thread saw (INT64_MAX: none).
struct FirstBad {
  std::atomic<int64_t> pos{INT64_MAX};
  void record(int64_t p) {
    int64_t cur = pos.load(std::memory_order_relaxed);
    while (p < cur && !pos.compare_exchange_weak(cur, p)) {
    }
  }
  int64_t result() const {
    const int64_t p = pos.load();
    return p == INT64_MAX ? -1 : p;
  }
};

inline int64_t max_dim(const TableBatch& tb) {
  int64_t m = 1;
  for (int64_t t = 0; t < tb.T; ++t) m = std::max(m, tb.dim_offsets[t + 1] - tb.dim_offsets[t]);
  return m;
}

// Pooled outputs of at least kStreamOutputBytes (fp32, rows on 64-byte
// lines) are written with non-temporal stores: too big to stay cached for
// their consumer, cached stores would read every output line first and evict
// the gathered rows. Smaller outputs stay cached for the interaction that
// reads them next, hence the threshold
// (docs/architecture.md, "Measured choices of the CPU kernels").
constexpr int64_t kStreamOutputBytes = int64_t{8} << 20;

// Whether the fp32 pooled output [B, dim_offsets[T]] of tb is streamed: big
// enough, and its rows whole lines, so that every 16-column block of a table
// whose first column is on a line (on_line) starts a line.
inline bool streams_output(const TableBatch& tb) {
  const int64_t total_D = tb.dim_offsets[tb.T];
  return total_D % 16 == 0 && tb.B * total_D * int64_t{4} >= kStreamOutputBytes;
}
inline bool on_line(const void* p) { return reinterpret_cast<uintptr_t>(p) % 64 == 0; }

// f(begin, end, worker) over [0, n) in chunks of a 32nd of a thread's share
// (at least grain); `worker` (< get_num_threads()) is the same for all chunks
// one thread runs, for per-thread scratch. Each thread takes the chunks of its
// own share, the one parallel_for(0, n, grain) would give it, front to back,
// so it walks the lines its own earlier regions left in its caches; a thread
// done with its share then takes chunks from the back of the others', so that
// one held up by memory leaves the others less to wait for at the region's
// end. Chunks all claimed from one shared front lose that affinity and were
// slower
// (docs/architecture.md, "Measured choices of the CPU kernels").
template <typename F>
void parallel_balanced(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t threads =
      std::min<int64_t>(torch::stable::get_num_threads(), (n + grain - 1) / grain);
  if (threads <= 1) {
    f(0, n, 0);
    return;
  }
  const int64_t share = (n + threads - 1) / threads;
  const int64_t chunk = std::max(grain, (share + 31) / 32);
  // Share i's unclaimed chunks [front, back), packed as front << 32 | back.
  struct alignas(64) Span {
    std::atomic<uint64_t> v;
  };
  std::unique_ptr<Span[]> spans(new Span[threads]);
  for (int64_t i = 0; i < threads; ++i) {
    const int64_t len = std::max<int64_t>(0, std::min(n, (i + 1) * share) - i * share);
    spans[i].v.store((len + chunk - 1) / chunk, std::memory_order_relaxed);
  }
  auto run = [&](int64_t i, bool from_front, int64_t worker) {
    Span& s = spans[i];
    uint64_t v = s.v.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t front = v >> 32, back = v & 0xffffffffu;
      if (front >= back) return;
      const uint64_t c = from_front ? front : back - 1;
      const uint64_t next = from_front ? ((front + 1) << 32 | back) : (front << 32 | (back - 1));
      if (!s.v.compare_exchange_weak(v, next, std::memory_order_relaxed)) continue;
      const int64_t b = i * share + static_cast<int64_t>(c) * chunk;
      f(b, std::min({n, (i + 1) * share, b + chunk}), worker);
      v = s.v.load(std::memory_order_relaxed);
    }
  };
  torch::stable::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) run(i, true, begin);
    for (int64_t k = 1; k < threads; ++k) run((begin + k) % threads, false, begin);
  });
}

// Bags per parallel task: about 32k row elements of work.
inline int64_t bag_grain(const TableBatch& tb, int64_t N) {
  const int64_t bags = std::max<int64_t>(tb.T * tb.B, 1);
  const int64_t avg_dim = std::max<int64_t>(tb.dim_offsets[tb.T] / std::max<int64_t>(tb.T, 1), 1);
  return std::max<int64_t>(1, 32768 / ((N / bags + 1) * avg_dim));
}

// Weight of lookup p (in flat bag `bag`) in its pooled sum.
template <typename I>
inline float lookup_scale(const HostLookups& lk, const I* off, int64_t bag, int64_t p) {
  if (lk.per_sample_weights) return lk.per_sample_weights[p];
  if (lk.pooling == kMean) return pooling_scale(kMean, off[bag + 1] - off[bag]);
  return 1.f;
}

// Splits [begin, end) of the flat (table, bag) range by table: f(t, b0, b1)
// for table t's bags [b0, b1).
template <typename F>
inline void for_each_table_range(const TableBatch& tb, int64_t begin, int64_t end, const F& f) {
  for (int64_t t = begin / tb.B; begin < end; ++t) {
    const int64_t stop = std::min(end, (t + 1) * tb.B);
    f(t, begin - t * tb.B, stop - t * tb.B);
    begin = stop;
  }
}

// Walks bags [begin, end) of the flat (table, bag) range: f(t, b, start, stop).
template <typename I, typename F>
inline void for_each_bag(const TableBatch& tb, const I* off, int64_t begin, int64_t end,
                         const F& f) {
  for_each_table_range(tb, begin, end, [&](int64_t t, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t bag = t * tb.B + b;
      f(t, b, static_cast<int64_t>(off[bag]), static_cast<int64_t>(off[bag + 1]));
    }
  });
}

}  // namespace dlrm_ops::cpu::CPU_CAPABILITY
