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

// Prefetch distances, measured on 26 x 500k x 64 Zipf tables: weight and
// state rows kPrefetchRows rows ahead into L1 and kPrefetchFarRows ahead into
// L2 (the latter 6% faster at 20 lookups per bag, neutral at one), gradient
// rows kPrefetchGrads lookups ahead.
constexpr int64_t kPrefetchRows = 8;
constexpr int64_t kPrefetchFarRows = 64;
constexpr int64_t kPrefetchGrads = 16;

// Rounds v to W stochastically (csrc/stochastic_rounding.h); `u` is 32
// uniform random bits.
template <typename W>
W round_stochastic(float v, uint32_t u);
template <>
float round_stochastic<float>(float v, uint32_t) { return v; }
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

// Applies the update to one row: g is its summed gradient (fp32, D values),
// wf scratch for the fp32 weights.
template <typename W>
__attribute__((always_inline)) inline void update_row(const UpdateArgs& a, W* w, float* g,
                                                       float* wf, int64_t D, int64_t elem0,
                                                       int64_t state_row) {
  const float lr = static_cast<float>(a.hp.lr), eps = static_cast<float>(a.hp.eps);
  const float wd = static_cast<float>(a.hp.weight_decay);
  if constexpr (std::is_same_v<W, float>) {
    if (a.optimizer == kSGD && wd == 0.f) {  // the common case in place: same arithmetic
      for (int64_t d = 0; d < D; ++d) w[d] -= lr * g[d];
      return;
    }
  }
  for (int64_t d = 0; d < D; ++d) wf[d] = to_float(w[d]);
  if (wd != 0.f) {
    for (int64_t d = 0; d < D; ++d) g[d] += wd * wf[d];
  }
  switch (a.optimizer) {
    case kSGD:
      for (int64_t d = 0; d < D; ++d) wf[d] -= lr * g[d];
      break;
    case kAdagrad: {
      float* s = a.momentum1 + elem0;
      for (int64_t d = 0; d < D; ++d) {
        s[d] += g[d] * g[d];
        wf[d] -= lr * g[d] / (std::sqrt(s[d]) + eps);
      }
      break;
    }
    case kRowwiseAdagrad: {
      float* s = a.momentum1 + state_row;
      *s += row_dot(g, g, D) / static_cast<float>(D);
      const float step = lr / (std::sqrt(*s) + eps);
      for (int64_t d = 0; d < D; ++d) wf[d] -= step * g[d];
      break;
    }
    case kAdam: {
      float* m = a.momentum1 + elem0;
      float* v = a.momentum2 + elem0;
      const float b1 = static_cast<float>(a.hp.beta1), b2 = static_cast<float>(a.hp.beta2);
      const double bc1 = 1.0 - std::pow(a.hp.beta1, static_cast<double>(a.step));
      const double bc2 = 1.0 - std::pow(a.hp.beta2, static_cast<double>(a.step));
      const float step_size = static_cast<float>(a.hp.lr * std::sqrt(bc2) / bc1);
      for (int64_t d = 0; d < D; ++d) {
        m[d] += (g[d] - m[d]) * (1.f - b1);
        v[d] += (g[d] * g[d] - v[d]) * (1.f - b2);
        wf[d] -= step_size * (m[d] / (std::sqrt(v[d]) + eps));
      }
      break;
    }
    default:
      break;
  }
  store_row(w, wf, D, a, elem0);
}

template <typename W, typename I>
int64_t update(const UpdateArgs& a) {
  const TableBatch& tb = a.eb.tb;
  const Lookups& lk = a.eb.lk;
  const I* off = static_cast<const I*>(lk.offsets);
  const W* go = static_cast<const W*>(a.grad_out);
  W* w = static_cast<W*>(a.weights);
  SortedLookups s = sort_lookups<I>(tb, lk);
  if (s.first_bad >= 0) return s.first_bad;
  const int64_t grain = 16384 / max_dim(tb) + 1;
  const bool elementwise_state = a.optimizer == kAdagrad || a.optimizer == kAdam;

  for_each_row_run<I>(tb, lk, s, go, grain, [&](int64_t t, int64_t row, int64_t begin,
                                                int64_t end, const GradRows<W>& grads) {
    const int64_t D = tb.dim_offsets[t + 1] - tb.dim_offsets[t];
    const int64_t start = off[t * tb.B], table_end = off[(t + 1) * tb.B];
    // Rows ascend: the entry n ahead is at most n rows ahead. The two blocks
    // stay written out: a shared helper lambda once compiled to no prefetch
    // at all (docs/architecture.md).
    if (end + kPrefetchRows <= table_end) {
      const int64_t e =
          tb.weights_offsets[t] + SortedLookups::row(s.entries[end + kPrefetchRows - 1]) * D;
      prefetch_row(w + e, D * static_cast<int64_t>(sizeof(W)));
      if (elementwise_state) prefetch_row(a.momentum1 + e, D * 4);
      if (a.optimizer == kAdam) prefetch_row(a.momentum2 + e, D * 4);
    }
    if (end + kPrefetchFarRows <= table_end) {
      const int64_t e =
          tb.weights_offsets[t] + SortedLookups::row(s.entries[end + kPrefetchFarRows - 1]) * D;
      prefetch_row<2>(w + e, D * static_cast<int64_t>(sizeof(W)));
      if (elementwise_state) prefetch_row<2>(a.momentum1 + e, D * 4);
      if (a.optimizer == kAdam) prefetch_row<2>(a.momentum2 + e, D * 4);
    }
    // Gradient rows are one random row per lookup: fetched ahead too.
    for (int64_t k = begin + kPrefetchGrads; k < std::min(end + kPrefetchGrads, table_end); ++k) {
      prefetch_row(grads[s.bag_of(s.entries[k], start)], D * static_cast<int64_t>(sizeof(W)));
    }
    float g_buf[256], wf_buf[256];
    std::unique_ptr<float[]> heap;
    float* g = g_buf;
    float* wf = wf_buf;
    if (D > 256) {
      heap.reset(new float[2 * D]);
      g = heap.get();
      wf = g + D;
    }
    for (int64_t k = begin; k < end; ++k) {
      const auto [b, sc] = s.bag_scale(s.entries[k], lk, off, t, tb.B, start);
      if (k == begin) row_set(g, grads[b], sc, D); else row_axpy(g, grads[b], sc, D);
    }
    const int64_t elem0 = tb.weights_offsets[t] + row * D;
    update_row(a, w + elem0, g, wf, D, elem0, a.row_offsets[t] + row);
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
