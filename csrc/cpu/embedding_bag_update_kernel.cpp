// The optimizer fused into the table-batched embedding backward. Compiled once
// per CPU capability. The weight gradient is never materialised: each touched
// row's gradient is summed on the stack and applied at once.
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cmath>

#include "cpu/embedding_bag_kernel.h"
#include "cpu/pooling.h"
#include "cpu/sorted_lookups.h"
#include "cpu/vec.h"
#include "stochastic_rounding.h"

namespace dlrm_ops::cpu {
namespace CPU_CAPABILITY {
namespace {

// Prefetch distances of the walk: weight and state rows kPrefetchRows rows
// ahead into L1 and kPrefetchFarRows ahead into L2, gradient rows
// kPrefetchGrads lookups ahead; neighbouring distances were within noise
// (docs/architecture.md, "Measured choices of the CPU kernels").
constexpr int64_t kPrefetchRows = 8;
constexpr int64_t kPrefetchFarRows = 64;
constexpr int64_t kPrefetchGrads = 12;

// Rounds v to W stochastically (csrc/stochastic_rounding.h); `u` is 32
// uniform random bits.
template <typename W>
W round_stochastic(float v, uint32_t u);
template <>
float round_stochastic<float>(float v, uint32_t) {
  return v;
}
template <>
bf16 round_stochastic<bf16>(float v, uint32_t u) {
  uint16_t bits;
  return bf16_round_stochastic(v, u, bits) ? bf16{bits} : from_float<bf16>(v);
}
template <>
fp16 round_stochastic<fp16>(float v, uint32_t u) {
  const fp16 h = static_cast<fp16>(v);
  uint16_t hb;
  std::memcpy(&hb, &h, sizeof(hb));
  const uint16_t bits = fp16_round_stochastic(v, hb, static_cast<float>(h), u, [](uint16_t b) {
    fp16 x;
    std::memcpy(&x, &b, sizeof(x));
    return static_cast<float>(x);
  });
  fp16 out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

template <typename W>
void store_row(W* w, const float* v, int64_t D, const UpdateArgs& a, int64_t elem0) {
  if (std::is_same_v<W, float> || !a.stochastic_rounding) {
    row_store(w, v, D);
    return;
  }
  const uint64_t seed = rounding_seed(a.step);
  for (int64_t d = 0; d < D; ++d) w[d] = round_stochastic<W>(v[d], rounding_bits(seed, elem0 + d));
}

// fp32 rows without weight decay are updated in place: SGD by update_row
// (w -= lr * g), SGD and row-wise Adagrad by the register path of update_runs.
template <typename W>
bool in_place(const UpdateArgs& a, Optimizer optimizer) {
  return std::is_same_v<W, float> && a.optimizer == optimizer && a.h.weight_decay == 0.f;
}

// Applies Rule (csrc/optimizers.h) to one row: g is its summed gradient (fp32,
// D values), wf scratch for the fp32 weights.
template <typename Rule, typename W>
__attribute__((always_inline)) inline void apply_rule(const UpdateArgs& a, W* w, float* g,
                                                      float* wf, int64_t D, int64_t elem0,
                                                      int64_t state_row) {
  const Hyper h = a.h;  // a copy: stores to the state cannot alias it, so the loops vectorise
  for (int64_t d = 0; d < D; ++d) wf[d] = to_float(w[d]);
  if (h.weight_decay != 0.f) {
    for (int64_t d = 0; d < D; ++d) g[d] += h.weight_decay * wf[d];
  }
  float coef = 0.f;
  if constexpr (Rule::kM1 == State::kRow || Rule::kM2 == State::kRow) {
    float* s = (Rule::kM1 == State::kRow ? a.momentum1 : a.momentum2) + state_row;
    *s = Rule::row_state(h, *s, row_dot(g, g, D) / static_cast<float>(D));
    coef = Rule::row_coef(h, *s);
  }
  if constexpr (Rule::kM1 == State::kElement && Rule::kM2 == State::kElement) {
    float* m1 = a.momentum1 + elem0;
    float* m2 = a.momentum2 + elem0;
    for (int64_t d = 0; d < D; ++d) wf[d] = Rule::apply(h, coef, g[d], wf[d], m1 + d, m2 + d);
  } else if constexpr (Rule::kM1 == State::kElement) {
    float* m1 = a.momentum1 + elem0;
    for (int64_t d = 0; d < D; ++d) wf[d] = Rule::apply(h, coef, g[d], wf[d], m1 + d, nullptr);
  } else {
    for (int64_t d = 0; d < D; ++d) wf[d] = Rule::apply(h, coef, g[d], wf[d], nullptr, nullptr);
  }
  store_row(w, wf, D, a, elem0);
}

// Applies the update to one row: g is its summed gradient (fp32, D values),
// wf scratch for the fp32 weights.
template <typename W>
__attribute__((always_inline)) inline void update_row(const UpdateArgs& a, W* w, float* g,
                                                      float* wf, int64_t D, int64_t elem0,
                                                      int64_t state_row) {
  if constexpr (std::is_same_v<W, float>) {
    if (in_place<W>(a, kSGD)) {
      const float lr = a.h.lr;
      for (int64_t d = 0; d < D; ++d) w[d] -= lr * g[d];
      return;
    }
  }
  with_rule(a.optimizer,
            [&](auto rule) { apply_rule<decltype(rule)>(a, w, g, wf, D, elem0, state_row); });
}

// How the register path applies a run's summed gradient: fp32 SGD or
// row-wise Adagrad without weight decay in place on the registers, anything
// else through update_row.
enum class Apply { kSgd, kRowwise, kRow };

// The register path: D = 16 * NV, each run's gradient summed in NV vectors
// with the any-D path's operations in its order, so both give the same bits.
// Plain (sum pooling, no per-sample weights) adds the gradient rows as they
// are, the same bits as times 1. The variants are compiled apart and each run
// is found while it is summed, the rows ahead fetched after it: the leaner
// the loop, the more runs it keeps in flight (fp32 SGD at one lookup per bag
// on 26 x 500k x 64: docs/architecture.md).
template <int NV, Apply A, bool Plain, typename W, typename I>
void register_runs(const UpdateArgs& a, const SortedLookups& s, int64_t t, int64_t begin,
                   int64_t end, const GradRows<W>& grads) {
  constexpr int64_t D = 16 * NV;
  constexpr int64_t kRowBytes = D * sizeof(W), kStateBytes = D * 4;
  const TableBatch& tb = a.eb.tb;
  const HostLookups& lk = a.eb.lk;
  const I* off = static_cast<const I*>(lk.offsets);
  const int64_t B = tb.B, start = off[t * B], table_end = off[(t + 1) * B];
  const int64_t elem_base = tb.weights_offsets[t], state_base = a.row_offsets[t];
  W* w = static_cast<W*>(a.weights);
  const uint64_t* e = s.entries;
  const float lr = a.h.lr;
  // The optimizer's state (csrc/optimizers.h): per-element rows prefetched as
  // the weights', a per-row entry as one line.
  const StateLayout ls = state_layout(a.optimizer);
  const bool m1_rows = ls.m1 == State::kElement, m2_rows = ls.m2 == State::kElement;
  float* const row_state = ls.m1 == State::kRow   ? a.momentum1
                           : ls.m2 == State::kRow ? a.momentum2
                                                  : nullptr;
  // Rows of compile-time size: `lined` when every row starts a line (prefetch_row_of).
  const bool lined = rows_on_lines(w + elem_base, kRowBytes);
  const bool state_lined = m1_rows && rows_on_lines(a.momentum1 + elem_base, kStateBytes);
  const bool grads_lined =
      rows_on_lines(grads.base, kRowBytes) && grads.stride * sizeof(W) % 64 == 0;
  float g[D], wf[D];
  // What the loop would have fetched ahead of `begin`, up front: a table's
  // first runs would otherwise come on demand, a few at a time.
  for (int64_t k = begin; k < std::min(begin + kPrefetchGrads, end); ++k) {
    const W* x = Plain ? grads[SortedLookups::low(e[k])] : grads[s.bag_of(e[k], start)];
    prefetch_row_of<3, kRowBytes>(x, grads_lined);
  }
  for (int64_t k = begin; k < std::min(begin + kPrefetchFarRows, end); ++k) {
    const int64_t r = SortedLookups::row(e[k]);
    prefetch_row_of<2, kRowBytes>(w + elem_base + r * D, lined);
    if (A != Apply::kSgd && row_state) __builtin_prefetch(row_state + state_base + r, 0, 2);
    if (A == Apply::kRow && m1_rows) {
      prefetch_row_of<2, kStateBytes>(a.momentum1 + elem_base + r * D, state_lined);
      if (m2_rows) prefetch_row_of<2, kStateBytes>(a.momentum2 + elem_base + r * D, state_lined);
    }
  }
  for (int64_t p = begin; p < end;) {
    const int64_t row = SortedLookups::row(e[p]);
    vf16 acc[NV];
    int64_t q = p;
    for (; q < end && SortedLookups::row(e[q]) == row; ++q) {
      const uint64_t ahead = e[std::min(q + kPrefetchGrads, table_end - 1)];
      if constexpr (Plain) {
        prefetch_row_of<3, kRowBytes>(grads[SortedLookups::low(ahead)], grads_lined);
        const W* x = grads[SortedLookups::low(e[q])];
#pragma GCC unroll 8
        for (int j = 0; j < NV; ++j)
          acc[j] = q == p ? load16(x + 16 * j) : acc[j] + load16(x + 16 * j);
      } else {
        prefetch_row_of<3, kRowBytes>(grads[s.bag_of(ahead, start)], grads_lined);
        const auto [b, sc] = s.bag_scale(e[q], lk, off, t, B, start);
        const W* x = grads[b];
#pragma GCC unroll 8
        for (int j = 0; j < NV; ++j) {
          if (q == p)
            acc[j] = sc * load16(x + 16 * j);
          else
            acc[j] += sc * load16(x + 16 * j);
        }
      }
    }
    // Rows ascend: the entry n ahead is at most n rows ahead. The blocks stay
    // written out: a shared helper lambda once compiled to no prefetch at all
    // (docs/architecture.md).
    const int64_t rn = SortedLookups::row(e[std::min(q + kPrefetchRows, table_end) - 1]);
    const int64_t en = elem_base + rn * D;
    prefetch_row_of<3, kRowBytes>(w + en, lined);
    const int64_t rf = SortedLookups::row(e[std::min(q + kPrefetchFarRows, table_end) - 1]);
    const int64_t ef = elem_base + rf * D;
    prefetch_row_of<2, kRowBytes>(w + ef, lined);
    if (A != Apply::kSgd && row_state) {
      __builtin_prefetch(row_state + state_base + rn, 0, 3);
      __builtin_prefetch(row_state + state_base + rf, 0, 2);
    }
    if (A == Apply::kRow && m1_rows) {
      prefetch_row_of<3, kStateBytes>(a.momentum1 + en, state_lined);
      prefetch_row_of<2, kStateBytes>(a.momentum1 + ef, state_lined);
      if (m2_rows) {
        prefetch_row_of<3, kStateBytes>(a.momentum2 + en, state_lined);
        prefetch_row_of<2, kStateBytes>(a.momentum2 + ef, state_lined);
      }
    }
    p = q;
    const int64_t elem0 = elem_base + row * D;
    if constexpr (A == Apply::kSgd) {  // Sgd::apply, on the registers
      float* wr = w + elem0;
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j)
        store16(wr + 16 * j, sub_scaled(load16(wr + 16 * j), lr, acc[j]));
    } else if constexpr (A == Apply::kRowwise) {  // RowwiseAdagrad, on the registers
      // The sum of squares through row_dot: the same dot in registers was
      // contracted differently by the compiler (1 ulp off in some rows).
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) store16(g + 16 * j, acc[j]);
      float* st = a.momentum1 + state_base + row;
      *st = RowwiseAdagrad::row_state(a.h, *st, row_dot(g, g, D) / static_cast<float>(D));
      const float step = RowwiseAdagrad::row_coef(a.h, *st);
      float* wr = w + elem0;
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j)
        store16(wr + 16 * j, sub_scaled(load16(wr + 16 * j), step, acc[j]));
    } else {
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) store16(g + 16 * j, acc[j]);
      update_row(a, w + elem0, g, wf, D, elem0, state_base + row);
    }
  }
}

// The register path's variant for this update.
template <int NV, typename W, typename I>
void register_update(const UpdateArgs& a, const SortedLookups& s, int64_t t, int64_t begin,
                     int64_t end, const GradRows<W>& grads) {
  const bool plain = a.eb.lk.per_sample_weights == nullptr && a.eb.lk.pooling != kMean;
  if constexpr (std::is_same_v<W, float>) {
    if (in_place<W>(a, kSGD)) {
      if (plain) return register_runs<NV, Apply::kSgd, true, W, I>(a, s, t, begin, end, grads);
      return register_runs<NV, Apply::kSgd, false, W, I>(a, s, t, begin, end, grads);
    }
    if (in_place<W>(a, kRowwiseAdagrad)) {
      if (plain) return register_runs<NV, Apply::kRowwise, true, W, I>(a, s, t, begin, end, grads);
      return register_runs<NV, Apply::kRowwise, false, W, I>(a, s, t, begin, end, grads);
    }
  }
  register_runs<NV, Apply::kRow, false, W, I>(a, s, t, begin, end, grads);
}

// Updates the runs [begin, end) of table t's sorted entries, any D: each
// run's gradient summed through a stack buffer.
template <typename W, typename I>
void update_runs(const UpdateArgs& a, const SortedLookups& s, int64_t t, int64_t begin, int64_t end,
                 const GradRows<W>& grads) {
  const TableBatch& tb = a.eb.tb;
  const HostLookups& lk = a.eb.lk;
  const I* off = static_cast<const I*>(lk.offsets);
  const int64_t D = tb.dim_offsets[t + 1] - tb.dim_offsets[t];
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(W));
  const int64_t B = tb.B, start = off[t * B], table_end = off[(t + 1) * B];
  const int64_t elem_base = tb.weights_offsets[t], state_base = a.row_offsets[t];
  W* w = static_cast<W*>(a.weights);
  const uint64_t* e = s.entries;
  const StateLayout ls = state_layout(a.optimizer);
  const bool m1_rows = ls.m1 == State::kElement, m2_rows = ls.m2 == State::kElement;
  float* const row_state = ls.m1 == State::kRow   ? a.momentum1
                           : ls.m2 == State::kRow ? a.momentum2
                                                  : nullptr;
  float g_buf[256], wf_buf[256];
  std::unique_ptr<float[]> heap;
  float* g = g_buf;
  float* wf = wf_buf;
  if (D > 256) {
    heap.reset(new float[2 * D]);
    g = heap.get();
    wf = g + D;
  }
  for_each_run(e, begin, end, [&](int64_t row, int64_t p, int64_t q) {
    if (q + kPrefetchRows <= table_end) {
      const int64_t r = SortedLookups::row(e[q + kPrefetchRows - 1]), el = elem_base + r * D;
      prefetch_row(w + el, row_bytes);
      if (m1_rows) prefetch_row(a.momentum1 + el, D * 4);
      if (m2_rows) prefetch_row(a.momentum2 + el, D * 4);
      if (row_state) prefetch_row(row_state + state_base + r, 4);
    }
    if (q + kPrefetchFarRows <= table_end) {
      const int64_t r = SortedLookups::row(e[q + kPrefetchFarRows - 1]), el = elem_base + r * D;
      prefetch_row<2>(w + el, row_bytes);
      if (m1_rows) prefetch_row<2>(a.momentum1 + el, D * 4);
      if (m2_rows) prefetch_row<2>(a.momentum2 + el, D * 4);
      if (row_state) prefetch_row<2>(row_state + state_base + r, 4);
    }
    // Gradient rows are one random row per lookup: fetched ahead too.
    for (int64_t k = p + kPrefetchGrads; k < std::min(q + kPrefetchGrads, table_end); ++k) {
      prefetch_row(grads[s.bag_of(e[k], start)], row_bytes);
    }
    for (int64_t k = p; k < q; ++k) {
      const auto [b, sc] = s.bag_scale(e[k], lk, off, t, B, start);
      if (k == p)
        row_set(g, grads[b], sc, D);
      else
        row_axpy(g, grads[b], sc, D);
    }
    const int64_t elem0 = elem_base + row * D;
    update_row(a, w + elem0, g, wf, D, elem0, state_base + row);
  });
}

template <typename W, typename I>
int64_t update(const UpdateArgs& a) {
  const TableBatch& tb = a.eb.tb;
  const I* off = static_cast<const I*>(a.eb.lk.offsets);
  const uint64_t* held =
      take_forward_sorted<I>(tb, a.eb.lk, static_cast<int64_t>(off[tb.T * tb.B]));
  SortedLookups s;
  if (held != nullptr) {
    s.entries = held;  // low is the position, which is the bag
  } else {
    s = sort_lookups<I>(tb, a.eb.lk);
    if (s.first_bad >= 0) return s.first_bad;
  }
  const int64_t grain = 16384 / max_dim(tb) + 1;
  for_each_table_runs<I>(tb, a.eb.lk, s, static_cast<const W*>(a.grad_out), grain,
                         [&](int64_t t, int64_t begin, int64_t end, const GradRows<W>& grads) {
                           const int64_t D = tb.dim_offsets[t + 1] - tb.dim_offsets[t];
                           const bool unrolled = with_one_block(D, [&](auto nv) {
                             register_update<decltype(nv)::value, W, I>(a, s, t, begin, end, grads);
                           });
                           if (!unrolled) update_runs<W, I>(a, s, t, begin, end, grads);
                         });
  return -1;
}

int64_t update_entry(const UpdateArgs& a) {
  return dispatch_float(a.eb.dtype, [&](auto* p) {
    using W = std::remove_pointer_t<decltype(p)>;
    return a.eb.lk.int64 ? update<W, int64_t>(a) : update<W, int32_t>(a);
  });
}

}  // namespace

REGISTER_CPU_KERNEL(embedding_bag_update_stub, &update_entry);

}  // namespace CPU_CAPABILITY
}  // namespace dlrm_ops::cpu
