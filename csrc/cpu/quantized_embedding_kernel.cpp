// Row-wise int8/int4 quantization and the pooled lookup that reads packed
// rows directly. Compiled once per CPU capability.
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>

#include "cpu/pooling.h"
#include "cpu/quantized_embedding_kernel.h"
#include "cpu/vec.h"

namespace dlrm_ops::cpu {
namespace CPU_CAPABILITY {
namespace {

typedef uint8_t vb8 __attribute__((vector_size(8)));
typedef uint16_t vw8 __attribute__((vector_size(16)));

float half_to_float(const uint8_t* p) {
  fp16 h;
  std::memcpy(&h, p, sizeof(h));
  return static_cast<float>(h);
}

// 16 consecutive columns [16k, 16k + 16) of a packed row, as floats q.
inline vf16 load_q8(const uint8_t* q) { return bytes_to_vf16(q); }
inline vf16 load_q4(const uint8_t* q) {  // 8 bytes hold 16 nibbles
  vb8 b;
  std::memcpy(&b, q, sizeof(b));
  vw8 w = __builtin_convertvector(b, vw8);
  w = (w & 0xF) | ((w >> 4) << 8);  // little endian: low nibble, then high nibble
  uint8_t n[16];
  std::memcpy(n, &w, sizeof(n));
  return bytes_to_vf16(n);
}
inline int q_at(const uint8_t* q, int64_t d, int64_t bits) {
  return bits == 8 ? q[d] : (q[d / 2] >> ((d & 1) * 4)) & 0xF;
}

template <int64_t Bits>
inline void scale_bias(const uint8_t* row, int64_t D, float& scale, float& bias) {
  if constexpr (Bits == 8) {
    std::memcpy(&scale, row + D, 4);
    std::memcpy(&bias, row + D + 4, 4);
  } else {
    scale = half_to_float(row + D / 2);
    bias = half_to_float(row + D / 2 + 2);
  }
}

// ---------------------------------------------------------------- quantize

// Row minimum and maximum; false if the row holds inf or NaN.
template <typename T>
bool row_min_max(const T* x, int64_t D, float& mn, float& mx) {
  vf16 vmn = {}, vmx = {}, vfin = {};  // vfin: sum of x * 0, NaN iff some x is not finite
  int64_t d = 0;
  if (D >= 16) {
    vmn = vmx = load16(x);
    for (; d + 16 <= D; d += 16) {
      const vf16 v = load16(x + d);
      vmn = vmin(v, vmn);
      vmx = vmax(v, vmx);
      vfin += v * 0.f;
    }
  }
  float fin = 0.f;
  if (D >= 16) {
#if defined(__AVX512F__)
    mn = _mm512_reduce_min_ps((__m512)vmn);
    mx = _mm512_reduce_max_ps((__m512)vmx);
    fin = _mm512_reduce_add_ps((__m512)vfin);
#elif defined(__AVX2__)
    // Any order: the row is used only when all of it is finite.
    const auto reduce = [](__m256 v, auto op) {
      __m128 m = op(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
      m = op(m, _mm_movehl_ps(m, m));
      return _mm_cvtss_f32(op(m, _mm_shuffle_ps(m, m, 1)));
    };
    mn = reduce(_mm256_min_ps((__m256)vmn.part[0], (__m256)vmn.part[1]),
                [](__m128 a, __m128 b) { return _mm_min_ps(a, b); });
    mx = reduce(_mm256_max_ps((__m256)vmx.part[0], (__m256)vmx.part[1]),
                [](__m128 a, __m128 b) { return _mm_max_ps(a, b); });
    fin = reduce(_mm256_add_ps((__m256)vfin.part[0], (__m256)vfin.part[1]),
                 [](__m128 a, __m128 b) { return _mm_add_ps(a, b); });
#else
    mn = vmn[0];
    mx = vmx[0];
    for (int k = 0; k < 16; ++k) {
      mn = std::min(mn, vmn[k]);
      mx = std::max(mx, vmx[k]);
      fin += vfin[k];
    }
#endif
  } else {
    mn = mx = to_float(x[0]);
  }
  for (; d < D; ++d) {
    const float v = to_float(x[d]);
    mn = std::min(mn, v);
    mx = std::max(mx, v);
    fin += v * 0.f;
  }
  return fin == 0.f;
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// round((x[d..d+16) - mn) * inv) to nearest even, as 16 bytes saturated to
// [0, 255] (the int8 codes lie in it; the int4 ones are clamped after).
template <typename T>
inline __m128i round_to_bytes(const T* x, float mn, float inv) {
  const vf16 v = (load16(x) - mn) * inv;
  const __m256i w = _mm256_packus_epi32(_mm256_cvtps_epi32((__m256)v.part[0]),
                                        _mm256_cvtps_epi32((__m256)v.part[1]));
  const __m256i ordered = _mm256_permute4x64_epi64(w, 0xD8);  // packus works per 128-bit lane
  return _mm_packus_epi16(_mm256_castsi256_si128(ordered), _mm256_extracti128_si256(ordered, 1));
}
#elif !defined(__AVX512F__)
// round((x[d..d+16) - mn) * inv) to nearest even, as 16 int32 lanes in q.
template <typename T>
inline void round16(const T* x, float mn, float inv, int32_t* q) {
  const vf16 v = (load16(x) - mn) * inv;
  for (int k = 0; k < 16; ++k) q[k] = static_cast<int32_t>(std::nearbyint(v[k]));
}
#endif

#if defined(__SSE2__)
// 16 nibble values, one per byte, packed two per byte (low nibble first).
inline void store_nibbles(__m128i b, uint8_t* out) {
  const __m128i pairs = _mm_or_si128(_mm_and_si128(b, _mm_set1_epi16(0x00FF)),
                                     _mm_slli_epi16(_mm_srli_epi16(b, 8), 4));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(pairs, pairs));
}
#endif

// A row holding inf or NaN is stored with NaN scale and bias (all q = 0), so
// that it dequantizes to NaN instead of to plausible finite values.
template <typename T>
void quantize_row8(const T* x, int64_t D, uint8_t* out) {
  float mn, mx;
  if (!row_min_max(x, D, mn, mx)) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::memset(out, 0, D);
    std::memcpy(out + D, &nan, 4);
    std::memcpy(out + D + 4, &nan, 4);
    return;
  }
  const float range = mx - mn;
  const float scale = range / 255.0f;
  const float inv = 255.0f / (range + 1e-8f);
  int64_t d = 0;
#if defined(__AVX512F__)
  for (; d + 16 <= D; d += 16) {  // round to nearest even, narrow to bytes
    const __m512i q = _mm512_cvtps_epi32((__m512)((load16(x + d) - mn) * inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + d), _mm512_cvtepi32_epi8(q));
  }
#elif defined(__AVX2__)
  for (; d + 16 <= D; d += 16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + d), round_to_bytes(x + d, mn, inv));
  }
#else
  for (int32_t q[16]; d + 16 <= D; d += 16) {
    round16(x + d, mn, inv, q);
    for (int k = 0; k < 16; ++k) out[d + k] = static_cast<uint8_t>(q[k]);
  }
#endif
  for (; d < D; ++d) {
    out[d] =
        static_cast<uint8_t>(static_cast<int32_t>(std::nearbyint((to_float(x[d]) - mn) * inv)));
  }
  std::memcpy(out + D, &scale, 4);
  std::memcpy(out + D + 4, &mn, 4);
}

template <typename T>
void quantize_row4(const T* x, int64_t D, uint8_t* out) {
  float mn, mx;
  if (!row_min_max(x, D, mn, mx)) {
    const fp16 nan = static_cast<fp16>(std::numeric_limits<float>::quiet_NaN());
    std::memset(out, 0, D / 2);
    std::memcpy(out + D / 2, &nan, 2);
    std::memcpy(out + D / 2 + 2, &nan, 2);
    return;
  }
  // The bias is stored in fp16: quantize against the rounded minimum.
  const fp16 mn_h = static_cast<fp16>(mn);
  mn = static_cast<float>(mn_h);
  const float range = mx - mn;
  float scale = range == 0 ? 1.0f : range / 15.0f;
  fp16 scale_h = static_cast<fp16>(scale);
  scale = static_cast<float>(scale_h);
  if (scale == 0) scale = 1.0f;
  float inv = 1.0f / scale;
  if (std::isinf(inv)) {
    scale = 1.0f;
    inv = 1.0f;
  }
  scale_h = static_cast<fp16>(scale);
  int64_t d = 0;
#if defined(__AVX512F__)
  for (; d + 16 <= D; d += 16) {  // round, clamp to [0, 15], pack column pairs into bytes
    __m512i q = _mm512_cvtps_epi32((__m512)((load16(x + d) - mn) * inv));
    q = _mm512_min_epi32(_mm512_max_epi32(q, _mm512_setzero_si512()), _mm512_set1_epi32(15));
    store_nibbles(_mm512_cvtepi32_epi8(q), out + d / 2);
  }
#elif defined(__AVX2__)
  for (; d + 16 <= D; d += 16) {  // negative codes saturated to 0 by round_to_bytes
    store_nibbles(_mm_min_epu8(round_to_bytes(x + d, mn, inv), _mm_set1_epi8(15)), out + d / 2);
  }
#else
  for (int32_t q[16]; d + 16 <= D; d += 16) {
    round16(x + d, mn, inv, q);
    for (int k = 0; k < 16; ++k) q[k] = std::clamp(q[k], 0, 15);
    for (int k = 0; k < 8; ++k)
      out[d / 2 + k] = static_cast<uint8_t>(q[2 * k] | (q[2 * k + 1] << 4));
  }
#endif
  for (; d < D; d += 2) {
    const auto q = [&](int64_t c) {
      const float v = std::nearbyint((to_float(x[c]) - mn) * inv);
      return static_cast<uint8_t>(std::clamp(v, 0.f, 15.f));
    };
    out[d / 2] = static_cast<uint8_t>(q(d) | (q(d + 1) << 4));
  }
  std::memcpy(out + D / 2, &scale_h, 2);
  std::memcpy(out + D / 2 + 2, &mn_h, 2);
}

template <typename T>
void quantize(const void* weight, int64_t R, int64_t D, int64_t bits, uint8_t* packed) {
  const T* w = static_cast<const T*>(weight);
  const int64_t stride = packed_row_bytes(D, bits);
  torch::stable::parallel_for(0, R, std::max<int64_t>(1, 16384 / D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (bits == 8)
        quantize_row8(w + r * D, D, packed + r * stride);
      else
        quantize_row4(w + r * D, D, packed + r * stride);
    }
  });
}

void quantize_entry(const void* weight, ScalarType dtype, int64_t R, int64_t D, int64_t bits,
                    uint8_t* packed) {
  dispatch_float(dtype, [&](auto* p) {
    quantize<std::remove_pointer_t<decltype(p)>>(weight, R, D, bits, packed);
  });
}

// -------------------------------------------------------------- dequantize

template <typename T>
void dequantize(const uint8_t* packed, int64_t R, int64_t D, int64_t bits, void* out_ptr) {
  T* out = static_cast<T*>(out_ptr);
  const int64_t stride = packed_row_bytes(D, bits);
  torch::stable::parallel_for(0, R, std::max<int64_t>(1, 16384 / D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = packed + r * stride;
      float scale, bias;
      if (bits == 8)
        scale_bias<8>(row, D, scale, bias);
      else
        scale_bias<4>(row, D, scale, bias);
      for (int64_t d = 0; d < D; ++d) {
        out[r * D + d] = from_float<T>(scale * static_cast<float>(q_at(row, d, bits)) + bias);
      }
    }
  });
}

void dequantize_entry(const uint8_t* packed, int64_t R, int64_t D, int64_t bits, void* out,
                      ScalarType dtype) {
  dispatch_float(dtype, [&](auto* p) {
    dequantize<std::remove_pointer_t<decltype(p)>>(packed, R, D, bits, out);
  });
}

// ------------------------------------------------------------ pooled lookup

// Lookup p's packed row and its weight s_p times the row's scale and bias.
struct WeightedRow {
  const uint8_t* row;
  float scale, bias;  // s_p * scale_p, s_p * bias_p
};
template <int64_t Bits>
inline WeightedRow weighted_row(const uint8_t* table, int64_t D, int64_t stride, uint64_t r,
                                const float* psw, int64_t p) {
  const uint8_t* row = table + r * stride;
  float scale, bias;
  scale_bias<Bits>(row, D, scale, bias);
  const float s = psw ? psw[p] : 1.f;
  return {row, s * scale, s * bias};
}

// One bag: sum_p s_p * (scale_p * q_p + bias_p) = sum_p (s_p scale_p) q_p + sum_p s_p bias_p,
// the first sum in registers per 16*NV columns, the second a scalar.
template <int64_t Bits, int NV, typename I>
inline void qpool_block(const uint8_t* table, int64_t D, int64_t stride, uint64_t rows,
                        const I* idx, const float* psw, int64_t start, int64_t stop,
                        int64_t table_end, int64_t d0, float scale_out, float* out, bool stream,
                        int64_t& bad) {
  vf16 acc[NV] = {};
  float bias_sum = 0.f;
  for (int64_t p = start; p < stop; ++p) {
    if (d0 == 0 && p + kPrefetchQuantizedLookups < table_end) {
      const uint64_t r =
          static_cast<uint64_t>(static_cast<int64_t>(idx[p + kPrefetchQuantizedLookups]));
      if (r < rows) prefetch_row<2>(table + r * stride, stride);
    }
    const uint64_t r = checked_row(idx, p, rows, d0 == 0, bad);
    if (r == kBadRow) continue;
    const WeightedRow w = weighted_row<Bits>(table, D, stride, r, psw, p);
    bias_sum += w.bias;
#pragma GCC unroll 8
    for (int k = 0; k < NV; ++k) {
      const vf16 q = Bits == 8 ? load_q8(w.row + d0 + 16 * k) : load_q4(w.row + (d0 + 16 * k) / 2);
      acc[k] += w.scale * q;
    }
  }
  if (stream) {  // out + d0 on a line (streams_output)
#pragma GCC unroll 8
    for (int k = 0; k < NV; ++k) stream16(out + d0 + 16 * k, (acc[k] + bias_sum) * scale_out);
    return;
  }
#pragma GCC unroll 8
  for (int k = 0; k < NV; ++k) store16(out + d0 + 16 * k, (acc[k] + bias_sum) * scale_out);
}

template <int64_t Bits, typename I>
inline void qpool_tail(const uint8_t* table, int64_t D, int64_t stride, uint64_t rows, const I* idx,
                       const float* psw, int64_t start, int64_t stop, int64_t d0, float scale_out,
                       float* out, int64_t& bad) {
  float acc[16] = {};
  float bias_sum = 0.f;
  const int64_t n = D - d0;
  for (int64_t p = start; p < stop; ++p) {
    const uint64_t r = checked_row(idx, p, rows, d0 == 0, bad);
    if (r == kBadRow) continue;
    const WeightedRow w = weighted_row<Bits>(table, D, stride, r, psw, p);
    bias_sum += w.bias;
    for (int64_t k = 0; k < n; ++k)
      acc[k] += w.scale * static_cast<float>(q_at(w.row, d0 + k, Bits));
  }
  for (int64_t k = 0; k < n; ++k) out[d0 + k] = (acc[k] + bias_sum) * scale_out;
}

template <int64_t Bits, typename I>
void qpool_bag(const uint8_t* table, int64_t D, uint64_t rows, const I* idx, const float* psw,
               int64_t start, int64_t stop, int64_t table_end, float scale_out, float* out,
               bool stream, int64_t& bad) {
  const int64_t stride = packed_row_bytes(D, Bits);
  const int64_t d0 = for_each_column_block(D, [&](auto nv, int64_t c0) {
    qpool_block<Bits, decltype(nv)::value>(table, D, stride, rows, idx, psw, start, stop, table_end,
                                           c0, scale_out, out, stream, bad);
  });
  if (d0 < D) {
    qpool_tail<Bits>(table, D, stride, rows, idx, psw, start, stop, d0, scale_out, out, bad);
  }
}

template <typename O, typename I>
int64_t qforward(const QuantizedBagArgs& a, void* out_ptr) {
  const TableBatch& tb = a.tb;
  const I* idx = static_cast<const I*>(a.lk.indices);
  const I* off = static_cast<const I*>(a.lk.offsets);
  const float* psw = a.lk.per_sample_weights;
  O* out = static_cast<O*>(out_ptr);
  const int64_t total_D = tb.dim_offsets[tb.T];
  const int64_t N = static_cast<int64_t>(off[tb.T * tb.B]);
  const bool stream = std::is_same_v<O, float> && streams_output(tb);
  FirstBad first_bad;
  torch::stable::parallel_for(0, tb.T * tb.B, bag_grain(tb, N), [&](int64_t begin, int64_t end) {
    int64_t bad = INT64_MAX;
    std::unique_ptr<float[]> acc_buf;  // fp32 sums when the output is half precision
    if constexpr (!std::is_same_v<O, float>) acc_buf.reset(new float[max_dim(tb)]);
    for_each_bag(tb, off, begin, end, [&](int64_t t, int64_t b, int64_t start, int64_t stop) {
      const int64_t D = tb.dim_offsets[t + 1] - tb.dim_offsets[t];
      const float scale_out = pooling_scale(a.lk.pooling, stop - start);
      O* out_row = out + b * total_D + tb.dim_offsets[t];
      float* acc;
      if constexpr (std::is_same_v<O, float>)
        acc = out_row;
      else
        acc = acc_buf.get();
      const uint8_t* table = a.packed + tb.weights_offsets[t];
      const int64_t table_end = off[(t + 1) * tb.B];
      const uint64_t rows = static_cast<uint64_t>(tb.rows[t]);
      const bool s = stream && on_line(acc);
      if (a.bits == 8) {
        qpool_bag<8>(table, D, rows, idx, psw, start, stop, table_end, scale_out, acc, s, bad);
      } else {
        qpool_bag<4>(table, D, rows, idx, psw, start, stop, table_end, scale_out, acc, s, bad);
      }
      if constexpr (!std::is_same_v<O, float>) row_store(out_row, acc, D);
    });
    if (stream) stream_fence();
    first_bad.record(bad);
  });
  return first_bad.result();
}

int64_t qforward_entry(const QuantizedBagArgs& a, void* out) {
  return dispatch_float(a.out_dtype, [&](auto* p) {
    using O = std::remove_pointer_t<decltype(p)>;
    return a.lk.int64 ? qforward<O, int64_t>(a, out) : qforward<O, int32_t>(a, out);
  });
}

}  // namespace

REGISTER_CPU_KERNEL(quantize_stub, &quantize_entry);
REGISTER_CPU_KERNEL(dequantize_stub, &dequantize_entry);
REGISTER_CPU_KERNEL(quantized_forward_stub, &qforward_entry);

}  // namespace CPU_CAPABILITY
}  // namespace dlrm_ops::cpu
