// Lookups of a table batch sorted by row, the shared first step of every
// backward that writes rows (dense gradient, fused optimizers): duplicates of a
// row become one run, summed by one thread in lookup order, so results are
// race-free and bit-identical for any thread count.
#pragma once

#ifndef CPU_CAPABILITY
#error "include only from kernels compiled per CPU capability (see vec.h)"
#endif

#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "cpu/embedding_bag_kernel.h"
#include "cpu/pooling.h"

namespace dlrm_ops::cpu::CPU_CAPABILITY {

struct SortedLookups {
  // Table t's lookups occupy [start[t], start[t+1]) (start[t] = offsets[t*B]);
  // there, entry k is (row << 32) | low, in ascending row order and, within a
  // row, in lookup order. `low` is the lookup's bag within its table or, with
  // `positions`, its position - start[t]. entries and bag lie in
  // sort_scratch (valid until this thread sorts again), or entries are the
  // training forward's (take_forward_sorted).
  const uint64_t* entries = nullptr;
  bool positions = false;
  int32_t* bag = nullptr;           // with positions: the bag of every position
  int64_t first_bad = -1;           // first position whose index is out of range
  std::unique_ptr<uint64_t[]> own;  // the scratch, when too big for the thread's cache

  static int64_t row(uint64_t e) { return static_cast<int64_t>(e >> 32); }
  static int64_t low(uint64_t e) { return static_cast<int64_t>(e & 0xffffffffu); }

  // The bag of entry e of table t, whose lookups start at position `start`.
  int64_t bag_of(uint64_t e, int64_t start) const {
    return positions ? bag[start + low(e)] : low(e);
  }

  // The bag of entry e of table t (lookups from `start`) and its weight in
  // the pooled sum.
  template <typename I>
  std::pair<int64_t, float> bag_scale(uint64_t e, const HostLookups& lk, const I* off, int64_t t,
                                      int64_t B, int64_t start) const {
    const int64_t b = bag_of(e, start);
    if (lk.per_sample_weights) return {b, lk.per_sample_weights[start + low(e)]};
    if (lk.pooling == kMean) {
      const int64_t bag = t * B + b;
      return {b, pooling_scale(kMean, off[bag + 1] - off[bag])};
    }
    return {b, 1.f};
  }
};

// Stable LSD radix sort of `keys` on bits [32, 32 + nbits) (nbits <= 32): the
// result is in row order and, within a row, in input order. Returns the
// buffer holding the result.
inline uint64_t* radix_sort_rows(uint64_t* keys, uint64_t* tmp, int64_t n, int nbits) {
  constexpr int kMaxDigit = 11, kMaxPasses = 3;
  if (n <= 256) {  // equal rows keep input order: lows ascend within a row
    std::sort(keys, keys + n);
    return keys;
  }
  // Passes of equal digits (19-bit rows: 10 + 9 bits, not 11 + 8), counts
  // 32-bit (a table has < 2^32 lookups) and only the passes' zeroed.
  const int passes = (nbits + kMaxDigit - 1) / kMaxDigit;
  if (passes == 0) return keys;
  const int digit = (nbits + passes - 1) / passes;
  const uint64_t mask = (uint64_t{1} << digit) - 1;
  uint32_t count[kMaxPasses][1 << kMaxDigit];
  for (int q = 0; q < passes; ++q) std::memset(count[q], 0, sizeof(uint32_t) << digit);
  for (int64_t i = 0; i < n; ++i) {  // every pass's histogram in one read
    for (int q = 0; q < passes; ++q) ++count[q][(keys[i] >> (32 + q * digit)) & mask];
  }
  for (int q = 0; q < passes; ++q) {
    uint32_t sum = 0;
    for (uint64_t j = 0; j <= mask; ++j) {
      const uint32_t k = count[q][j];
      count[q][j] = sum;
      sum += k;
    }
    const int shift = 32 + q * digit;
    for (int64_t i = 0; i < n; ++i) tmp[count[q][(keys[i] >> shift) & mask]++] = keys[i];
    std::swap(keys, tmp);
  }
  return keys;
}

// The sort's scratch (entries, radix buffer and bags: 2-2.5 words per lookup)
// is kept per calling thread up to kCachedScratchBytes. Under glibc malloc a
// fresh buffer of several MB is often mmapped and page-faulted on every call
// (docs/architecture.md, "Measured choices of the CPU kernels").
constexpr int64_t kCachedScratchBytes = int64_t{64} << 20;

inline uint64_t* sort_scratch(int64_t words, std::unique_ptr<uint64_t[]>& own) {
  if (words * 8 > kCachedScratchBytes) {
    own.reset(new uint64_t[words]);
    return own.get();
  }
  thread_local std::unique_ptr<uint64_t[]> cached;
  thread_local int64_t cached_words = 0;
  if (cached_words < words) {
    cached.reset(new uint64_t[words]);
    cached_words = words;
  }
  return cached.get();
}

// Sorts every table's lookups by row into entries [N] (SortedLookups'
// layout; tmp: N words of scratch), parallel over tables. `low` is the
// position in the table with `positions`, else the bag; bag (when not null)
// gets the bag of every position, copy (when not null) the indices. Returns
// the first position whose index is out of range, or -1.
template <typename I>
int64_t sort_rows(const TableBatch& tb, const HostLookups& lk, bool positions, uint64_t* entries,
                  uint64_t* tmp, int32_t* bag, I* copy = nullptr) {
  const I* idx = static_cast<const I*>(lk.indices);
  const I* off = static_cast<const I*>(lk.offsets);
  const int64_t T = tb.T, B = tb.B;
  FirstBad first_bad;
  torch::stable::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t start = off[t * B], n = off[(t + 1) * B] - start;
      const uint64_t rows = static_cast<uint64_t>(tb.rows[t]);
      uint64_t* e = entries + start;
      int64_t bad = INT64_MAX;
      if (copy) std::copy(idx + start, idx + start + n, copy + start);
      auto put = [&](int64_t p, uint64_t low) {
        uint64_t r = checked_row(idx, p, rows, true, bad);
        if (r == kBadRow) r = 0;  // keeps the sort valid; the caller throws
        e[p - start] = (r << 32) | low;
      };
      if (positions && !bag) {  // no bags wanted: the offsets stay unread
        for (int64_t p = start; p < start + n; ++p) put(p, static_cast<uint64_t>(p - start));
      } else {  // bag by bag: faster than one loop over lookups that tracks the bag
        for (int64_t b = 0; b < B; ++b) {
          for (int64_t p = off[t * B + b]; p < off[t * B + b + 1]; ++p) {
            put(p, positions ? static_cast<uint64_t>(p - start) : static_cast<uint64_t>(b));
            if (bag) bag[p] = static_cast<int32_t>(b);
          }
        }
      }
      first_bad.record(bad);
      const int nbits = rows <= 1 ? 0 : 64 - __builtin_clzll(rows - 1);
      uint64_t* sorted = radix_sort_rows(e, tmp + start, n, nbits);
      if (sorted != e) std::copy(sorted, sorted + n, e);
    }
  });
  return first_bad.result();
}

template <typename I>
SortedLookups sort_lookups(const TableBatch& tb, const HostLookups& lk) {
  const I* off = static_cast<const I*>(lk.offsets);
  const int64_t N = static_cast<int64_t>(off[tb.T * tb.B]);
  SortedLookups s;
  s.positions = lk.per_sample_weights != nullptr;
  uint64_t* scratch = sort_scratch(2 * N + (s.positions ? (N + 1) / 2 : 0) + 1, s.own);
  if (s.positions) s.bag = reinterpret_cast<int32_t*>(scratch + 2 * N);
  s.entries = scratch;
  s.first_bad = sort_rows<I>(tb, lk, s.positions, scratch, scratch + N, s.bag);
  return s;
}

// The training forward's sorted lookups (sort_rows with positions), kept for
// the update of the same lookups on this thread: the backward of a CPU graph
// runs on the thread that called it. Held with a copy of the indices they
// sort and the tables' shape, and handed out once, only to an update of
// exactly those lookups (take_forward_sorted), so a stale set is only a miss.
struct ForwardSorted {
  std::unique_ptr<uint64_t[]> entries;
  int64_t words = 0;
  std::unique_ptr<char[]> indices;  // the indices sorted, byte for byte
  int64_t index_capacity = 0;
  int64_t index_bytes = 0;
  int64_t T = 0, B = 0;
  std::vector<int64_t> rows;
  int64_t n = -1;  // lookups held, -1: none
};
inline ForwardSorted& forward_sorted() {
  thread_local ForwardSorted f;
  return f;
}
// A buffer for the sort of the N lookups lk of tables tb, held for the next
// update, and one for a copy of their indices (sort_rows writes both).
template <typename I>
std::pair<uint64_t*, I*> keep_forward_sorted(const TableBatch& tb, const HostLookups& lk,
                                             int64_t N) {
  ForwardSorted& f = forward_sorted();
  if (f.words < N) {
    f.entries.reset(new uint64_t[N]);
    f.words = N;
  }
  f.index_bytes = N * static_cast<int64_t>(sizeof(I));
  if (f.index_capacity < f.index_bytes) {
    f.indices.reset(new char[f.index_bytes]);
    f.index_capacity = f.index_bytes;
  }
  f.T = tb.T;
  f.B = tb.B;
  f.rows.assign(tb.rows, tb.rows + tb.T);
  f.n = N;
  return {f.entries.get(), reinterpret_cast<I*>(f.indices.get())};
}
inline void drop_forward_sorted() { forward_sorted().n = -1; }

// Whether the n bytes at x and y are equal, compared by all threads: the
// indices of a big batch come from memory.
inline bool same_bytes(const void* x, const void* y, int64_t n) {
  constexpr int64_t kGrain = 128 << 10;
  std::atomic<bool> differ{false};
  torch::stable::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    if (std::memcmp(static_cast<const char*>(x) + b, static_cast<const char*>(y) + b, e - b)) {
      differ.store(true, std::memory_order_relaxed);
    }
  });
  return !differ.load();
}

// The held sort if it is of the N lookups lk of tables tb, else nullptr; held
// no more. The same tables, the same indices byte for byte and one lookup in
// every bag (so the same offsets: they start at 0) make it exactly the sort
// that sort_lookups would give these lookups, a position being its bag.
template <typename I>
const uint64_t* take_forward_sorted(const TableBatch& tb, const HostLookups& lk, int64_t N) {
  ForwardSorted& f = forward_sorted();
  const bool hit = f.n == N && lk.one_per_bag && f.T == tb.T && f.B == tb.B &&
                   std::equal(f.rows.begin(), f.rows.end(), tb.rows) &&
                   f.index_bytes == N * static_cast<int64_t>(sizeof(I)) &&
                   same_bytes(f.indices.get(), lk.indices, f.index_bytes);
  f.n = -1;
  return hit ? f.entries.get() : nullptr;
}

// Table t's gradient rows: bag b's at base + b * stride.
template <typename W>
struct GradRows {
  const W* base;
  int64_t stride;
  const W* operator[](int64_t b) const { return base + b * stride; }
};

// A thread copies a table's gradient slice (B rows strided by grad_out's row)
// into a contiguous buffer when the table has at least kCopyLookupsPerBag
// lookups per bag, the slice fits in kCopyMaxBytes, well inside L2, and its
// chunk holds at least B of them. Each strided row sits on its own 4 KiB
// page: gathered many times in row order, their TLB and cache misses cost
// more than the copy from 8 lookups per bag on, not below
// (docs/architecture.md, "Measured choices of the CPU kernels").
constexpr int64_t kCopyLookupsPerBag = 8;
constexpr int64_t kCopyMaxBytes = 1 << 20;

// The slice a thread copied last, kept for its next chunks of the same table.
template <typename W>
struct GradCopy {
  int64_t t = -1;
  std::vector<W> rows;
};

// Calls f(t, begin, end, grads) for each table t in a chunk of the sorted
// entries: [begin, end) are whole runs of equal rows of table t, each run seen
// by one thread, and grads table t's gradient rows (GradRows) in grad_out
// [B, dim_offsets[T]]. Parallel over entries; the callee walks the runs
// (for_each_run) with the table's values hoisted.
template <typename I, typename W, typename F>
void for_each_table_runs(const TableBatch& tb, const HostLookups& lk, const SortedLookups& s,
                         const W* grad_out, int64_t grain, const F& f) {
  const I* off = static_cast<const I*>(lk.offsets);
  const int64_t T = tb.T, B = tb.B;
  const int64_t N = static_cast<int64_t>(off[T * B]);
  const int64_t total_D = tb.dim_offsets[T];
  const uint64_t* e = s.entries;
  auto table_of = [&](int64_t p) {  // last t with off[t*B] <= p
    int64_t lo = 0, hi = T - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (static_cast<int64_t>(off[mid * B]) <= p)
        lo = mid;
      else
        hi = mid - 1;
    }
    return lo;
  };
  // The first run start at or after p (N if none): a run begun before a
  // chunk's first entry belongs to the chunk before.
  auto run_start_from = [&](int64_t p) {
    if (p >= N) return N;
    const int64_t t = table_of(p);
    const int64_t table_start = off[t * B], table_end = off[(t + 1) * B];
    while (p < table_end && p > table_start && (e[p] >> 32) == (e[p - 1] >> 32)) ++p;
    return p;
  };
  std::vector<GradCopy<W>> copies(torch::stable::get_num_threads());
  parallel_balanced(N, grain, [&](int64_t begin, int64_t end, int64_t worker) {
    int64_t p = run_start_from(begin);
    const int64_t stop = run_start_from(end);
    for (int64_t t = p < stop ? table_of(p) : T; p < stop; ++t) {
      const int64_t table_end = std::min<int64_t>(stop, off[(t + 1) * B]);
      if (p >= table_end) continue;
      const int64_t D = tb.dim_offsets[t + 1] - tb.dim_offsets[t];
      const W* slice = grad_out + tb.dim_offsets[t];
      GradRows<W> grads{slice, total_D};
      if (off[(t + 1) * B] - off[t * B] >= kCopyLookupsPerBag * B && table_end - p >= B &&
          B * D * static_cast<int64_t>(sizeof(W)) <= kCopyMaxBytes) {
        GradCopy<W>& c = copies[worker];
        if (c.t != t) {
          c.rows.resize(std::max<size_t>(c.rows.size(), B * D));
          for (int64_t b = 0; b < B; ++b) {
            std::copy(slice + b * total_D, slice + b * total_D + D, c.rows.data() + b * D);
          }
          c.t = t;
        }
        grads = {c.rows.data(), D};
      }
      f(t, p, table_end, grads);
      p = table_end;
    }
  });
}

// Calls g(row, begin, end) for each run of equal rows in the whole runs
// [begin, end) of one table's sorted entries e.
template <typename G>
inline void for_each_run(const uint64_t* e, int64_t begin, int64_t end, const G& g) {
  for (int64_t p = begin; p < end;) {
    const uint64_t r = e[p] >> 32;
    int64_t q = p + 1;
    while (q < end && (e[q] >> 32) == r) ++q;
    g(static_cast<int64_t>(r), p, q);
    p = q;
  }
}

}  // namespace dlrm_ops::cpu::CPU_CAPABILITY
