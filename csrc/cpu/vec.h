// Element types and row primitives for kernels compiled per instruction set.
// Plain loops over a row that the compiler vectorizes for the -m flags of the
// translation unit including this header (see CPU_FLAGS_* in CMakeLists.txt).
#pragma once

// Inline code compiled with each capability's -m flags: it lives in that
// capability's namespace, so the linker never merges one build's non-inlined
// copy (say AVX-512) into another's (the portable path on an older CPU).
#ifndef CPU_CAPABILITY
#error "include only from kernels compiled per CPU capability (CPU_KERNEL_SOURCES)"
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <torch/headeronly/core/ScalarType.h>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace dlrm_ops::cpu::CPU_CAPABILITY {

// bfloat16 storage; arithmetic always happens in fp32.
struct bf16 {
  uint16_t bits;
};
using fp16 = _Float16;

inline float to_float(float v) { return v; }
inline float to_float(fp16 v) { return static_cast<float>(v); }
inline float to_float(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename T>
inline T from_float(float v);
template <>
inline float from_float<float>(float v) { return v; }
template <>
inline fp16 from_float<fp16>(float v) { return static_cast<fp16>(v); }
template <>
inline bf16 from_float<bf16>(float v) {
  // Round to nearest even, as c10::BFloat16; NaN stays a quiet NaN.
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{0x7fc0};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}

// dst[d] = s * row[d]
template <typename T>
inline void row_set(float* __restrict dst, const T* __restrict row, float s, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d] = s * to_float(row[d]);
}
// dst[d] += s * row[d]
template <typename T>
inline void row_axpy(float* __restrict dst, const T* __restrict row, float s, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d] += s * to_float(row[d]);
}
template <typename T>
inline void row_store(T* __restrict dst, const float* __restrict src, int64_t D);
template <typename T>
inline void row_store_scaled(T* __restrict dst, const float* __restrict src, float s, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d] = from_float<T>(s * src[d]);
}
template <typename A, typename B>
inline float row_dot(const A* __restrict a, const B* __restrict b, int64_t D) {
  // 16 partial sums so the loop vectorizes without reassociating floats.
  constexpr int64_t kLanes = 16;
  float part[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) part[k] += to_float(a[d + k]) * to_float(b[d + k]);
  }
  for (int64_t k = 0; d < D; ++d, ++k) part[k] += to_float(a[d]) * to_float(b[d]);
  float acc = 0.f;
  for (int64_t k = 0; k < kLanes; ++k) acc += part[k];
  return acc;
}

// Every cache line of [p, p + bytes) from p's line on, so that rows not
// aligned to lines (8-bit rows are D + 8 bytes) get their last line too.
// Locality: 3 into L1, for rows about to be written; 2 into L2, for far-ahead
// gathers (measured 5-10% faster on them than into L1: L1's few line-fill
// buffers stay free for the loads of the rows being summed).
template <int Locality = 3>
inline void prefetch_row(const void* p, int64_t bytes) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63};
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes);
  for (uintptr_t a = first; a < end; a += 64) {
    __builtin_prefetch(reinterpret_cast<const void*>(a), 0, Locality);
  }
}

// Calls f with a null pointer of the C++ type matching a float dtype.
template <typename F>
inline auto dispatch_float(torch::headeronly::ScalarType t, F&& f) {
  using torch::headeronly::ScalarType;
  switch (t) {
    case ScalarType::Half: return f(static_cast<fp16*>(nullptr));
    case ScalarType::BFloat16: return f(static_cast<bf16*>(nullptr));
    default: return f(static_cast<float*>(nullptr));
  }
}

}  // namespace dlrm_ops::cpu::CPU_CAPABILITY

namespace dlrm_ops::cpu::CPU_CAPABILITY {

// 16 floats as one GCC vector: one zmm under AVX-512, two ymm under AVX2,
// four xmm on the portable build. Loops over small arrays of these with
// constant trip counts keep pooled sums in registers.
typedef float vf16 __attribute__((vector_size(64)));
typedef _Float16 vh16 __attribute__((vector_size(32)));
typedef uint16_t vu16 __attribute__((vector_size(32)));
typedef uint32_t vu32 __attribute__((vector_size(64)));

inline vf16 load16(const float* p) {
  vf16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
#if defined(__AVX2__) && !defined(__AVX512F__)
// Two 8-float halves as one vf16 (two ymm registers under AVX2).
inline vf16 join(__m256 lo, __m256 hi) {
  vf16 v;
  std::memcpy(&v, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&v) + 32, &hi, 32);
  return v;
}
#endif

// GCC scalarizes vector conversions from 8/16-bit types, so those use the
// instruction set's widening conversions where there is one.
inline vf16 load16(const fp16* p) {
#if defined(__AVX512F__)
  return (vf16)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__AVX2__)
  return join(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
              _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8))));
#else
  vh16 h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, vf16);
#endif
}

// 16 bytes as 16 floats.
inline vf16 bytes_to_vf16(const uint8_t* p) {
#if defined(__AVX512F__)
  return (vf16)_mm512_cvtepi32_ps(
      _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  return join(_mm256_cvtepi32_ps(
                  _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))),
              _mm256_cvtepi32_ps(
                  _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)))));
#else
  vf16 v;
  for (int k = 0; k < 16; ++k) v[k] = static_cast<float>(p[k]);
  return v;
#endif
}
inline vf16 load16(const bf16* p) {
  vu16 h;
  std::memcpy(&h, p, sizeof(h));
  vu32 u = __builtin_convertvector(h, vu32) << 16;
  vf16 v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}
inline void store16(float* p, vf16 v) { std::memcpy(p, &v, sizeof(v)); }

inline void store16(fp16* p, vf16 v) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  float f[16];
  std::memcpy(f, &v, sizeof(v));
  for (int k = 0; k < 16; ++k) p[k] = static_cast<fp16>(f[k]);
#endif
}
inline void store16(bf16* p, vf16 v) {
  float f[16];
  std::memcpy(f, &v, sizeof(v));
  for (int k = 0; k < 16; ++k) p[k] = from_float<bf16>(f[k]);
}

// store16 past the caches (non-temporal), for outputs too big to stay cached:
// no read-for-ownership of the line, no eviction of the rows being gathered.
// p must be 64-byte aligned; stream_fence() before the thread's work ends.
inline void stream16(float* p, vf16 v) {
#if defined(__AVX512F__)
  _mm512_stream_ps(p, (__m512)v);
#elif defined(__AVX2__)
  const float* f = reinterpret_cast<const float*>(&v);
  _mm256_stream_ps(p, _mm256_loadu_ps(f));
  _mm256_stream_ps(p + 8, _mm256_loadu_ps(f + 8));
#elif defined(__SSE2__)
  const float* f = reinterpret_cast<const float*>(&v);
  for (int k = 0; k < 16; k += 4) _mm_stream_ps(p + k, _mm_loadu_ps(f + k));
#else
  store16(p, v);
#endif
}
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

template <typename T>
inline void row_store(T* __restrict dst, const float* __restrict src, int64_t D) {
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) store16(dst + d, load16(src + d));
  for (; d < D; ++d) dst[d] = from_float<T>(src[d]);
}

// Vectors of 16 columns summed in registers at once.
#if defined(__AVX512F__)
constexpr int kMaxBlockVectors = 8;
#else
constexpr int kMaxBlockVectors = 4;
#endif

// Calls f(std::integral_constant<int, n>) for 1 <= n <= kMaxBlockVectors.
template <int N = kMaxBlockVectors, typename F>
inline void with_vector_count(int64_t n, const F& f) {
  if constexpr (N >= 1) {
    if (n == N) f(std::integral_constant<int, N>{});
    else with_vector_count<N - 1>(n, f);
  }
}

// Splits columns [0, D) into blocks of 16 * NV columns, NV a compile-time
// count up to kMaxBlockVectors, calling block(std::integral_constant<int, NV>,
// d0) for each; returns the first of the fewer than 16 columns left over.
template <typename F>
inline int64_t for_each_column_block(int64_t D, const F& block) {
  int64_t d0 = 0;
  for (; d0 + 16 * kMaxBlockVectors <= D; d0 += 16 * kMaxBlockVectors) {
    block(std::integral_constant<int, kMaxBlockVectors>{}, d0);
  }
  with_vector_count((D - d0) / 16, [&](auto nv) {
    block(nv, d0);
    d0 += 16 * decltype(nv)::value;
  });
  return d0;
}

// When D columns are one block of whole vectors, D = 16 * NV with NV <=
// kMaxBlockVectors, calls f(std::integral_constant<int, NV>) and returns true.
template <typename F>
inline bool with_one_block(int64_t D, const F& f) {
  if (D <= 0 || D % 16 != 0 || D > 16 * kMaxBlockVectors) return false;
  with_vector_count(D / 16, f);
  return true;
}

}  // namespace dlrm_ops::cpu::CPU_CAPABILITY
