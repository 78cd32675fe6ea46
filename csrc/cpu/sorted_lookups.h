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
#include <climits>
#include <cstdint>
#include <memory>

#include "cpu/embedding_bag_kernel.h"
#include "cpu/pooling.h"

namespace dlrm_ops::cpu::CPU_CAPABILITY {

struct SortedLookups {
  // Table t's lookups occupy [start[t], start[t+1]) (start[t] = offsets[t*B]);
  // there, entry k is (row << 32) | (position - start[t]), sorted ascending.
  std::unique_ptr<uint64_t[]> entries;
  // Bag (within its table) of every lookup position.
  std::unique_ptr<int32_t[]> bag;
  int64_t first_bad = -1;  // first position whose index is out of range

  static int64_t row(uint64_t e) { return static_cast<int64_t>(e >> 32); }
  static int64_t local_pos(uint64_t e) { return static_cast<int64_t>(e & 0xffffffffu); }
};

// Stable LSD radix sort of `keys` on bits [32, 32 + nbits); unique keys, so
// the result orders by (row, position). Returns the buffer holding the result.
inline uint64_t* radix_sort_rows(uint64_t* keys, uint64_t* tmp, int64_t n, int nbits) {
  if (n <= 256) {
    std::sort(keys, keys + n);
    return keys;
  }
  constexpr int kDigit = 11;
  for (int shift = 32; shift < 32 + nbits; shift += kDigit) {
    const int bits = std::min(kDigit, 32 + nbits - shift);
    const uint64_t mask = (uint64_t{1} << bits) - 1;
    int64_t count[1 << kDigit] = {};
    for (int64_t i = 0; i < n; ++i) ++count[(keys[i] >> shift) & mask];
    int64_t sum = 0;
    for (uint64_t d = 0; d <= mask; ++d) {
      const int64_t c = count[d];
      count[d] = sum;
      sum += c;
    }
    for (int64_t i = 0; i < n; ++i) tmp[count[(keys[i] >> shift) & mask]++] = keys[i];
    std::swap(keys, tmp);
  }
  return keys;
}

template <typename I>
SortedLookups sort_lookups(const TableBatch& tb, const Lookups& lk) {
  const I* idx = static_cast<const I*>(lk.indices);
  const I* off = static_cast<const I*>(lk.offsets);
  const int64_t T = tb.T, B = tb.B;
  const int64_t N = static_cast<int64_t>(off[T * B]);
  SortedLookups s;
  s.entries.reset(new uint64_t[std::max<int64_t>(N, 1)]);
  s.bag.reset(new int32_t[std::max<int64_t>(N, 1)]);
  std::unique_ptr<uint64_t[]> tmp(new uint64_t[std::max<int64_t>(N, 1)]);
  FirstBad first_bad;
  torch::stable::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t start = off[t * B], n = off[(t + 1) * B] - start;
      const uint64_t rows = static_cast<uint64_t>(tb.rows[t]);
      uint64_t* e = s.entries.get() + start;
      int64_t bad = INT64_MAX;
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t p = off[t * B + b]; p < off[t * B + b + 1]; ++p) {
          uint64_t r = checked_row(idx, p, rows, true, bad);
          if (r == kBadRow) r = 0;  // keeps the sort valid; the caller throws
          e[p - start] = (r << 32) | static_cast<uint64_t>(p - start);
          s.bag[p] = static_cast<int32_t>(b);
        }
      }
      first_bad.record(bad);
      const int nbits = rows <= 1 ? 0 : 64 - __builtin_clzll(rows - 1);
      uint64_t* sorted = radix_sort_rows(e, tmp.get() + start, n, nbits);
      if (sorted != e) std::copy(sorted, sorted + n, e);
    }
  });
  s.first_bad = first_bad.result();
  return s;
}

// Calls f(t, row, begin, end) for every run of equal rows, [begin, end) being
// the run's entries; parallel over runs, each run seen by one thread.
template <typename I, typename F>
void for_each_row_run(const TableBatch& tb, const Lookups& lk, const SortedLookups& s,
                      int64_t grain, const F& f) {
  const I* off = static_cast<const I*>(lk.offsets);
  const int64_t T = tb.T, B = tb.B;
  const int64_t N = static_cast<int64_t>(off[T * B]);
  const uint64_t* e = s.entries.get();
  auto table_of = [&](int64_t p) {  // last t with off[t*B] <= p
    int64_t lo = 0, hi = T - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (static_cast<int64_t>(off[mid * B]) <= p) lo = mid; else hi = mid - 1;
    }
    return lo;
  };
  auto run_starts_at = [&](int64_t p, int64_t t) {
    return p == static_cast<int64_t>(off[t * B]) || (e[p] >> 32) != (e[p - 1] >> 32);
  };
  torch::stable::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    int64_t t = table_of(begin);
    int64_t p = begin;
    auto advance_table = [&] {
      while (p >= static_cast<int64_t>(off[(t + 1) * B])) ++t;
    };
    for (; p < end; ++p) {  // a run begun before `begin` belongs to the previous chunk
      advance_table();
      if (run_starts_at(p, t)) break;
    }
    while (p < end) {
      advance_table();
      const int64_t table_end = off[(t + 1) * B];
      int64_t q = p + 1;
      while (q < table_end && (e[q] >> 32) == (e[p] >> 32)) ++q;
      f(t, SortedLookups::row(e[p]), p, q);
      p = q;
    }
  });
}

}  // namespace dlrm_ops::cpu::CPU_CAPABILITY
