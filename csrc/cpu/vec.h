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
inline float from_float<float>(float v) {
  return v;
}
template <>
inline fp16 from_float<fp16>(float v) {
  return static_cast<fp16>(v);
}
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

// The lines of a row of Bytes bytes at p, Bytes known at compile time:
// unrolled, no loop branch between a gather's rows. `lined`: p starts a line
// and Bytes is whole lines; otherwise the row's last byte's line is added.
// A loop per row, with a compare and branch per line, slows the gathers
// (docs/architecture.md, "Measured choices of the CPU kernels").
template <int Locality, int64_t Bytes>
inline void prefetch_row_of(const void* p, bool lined) {
  const char* c = static_cast<const char*>(p);
#pragma GCC unroll 16
  for (int64_t k = 0; k < Bytes; k += 64) __builtin_prefetch(c + k, 0, Locality);
  if (!lined) __builtin_prefetch(c + Bytes - 1, 0, Locality);
}

// prefetch_row_of's `lined` for rows of row_bytes laid end to end from base.
inline bool rows_on_lines(const void* base, int64_t row_bytes) {
  return reinterpret_cast<uintptr_t>(base) % 64 == 0 && row_bytes % 64 == 0;
}

// Calls f with a null pointer of the C++ type matching a float dtype.
template <typename F>
inline auto dispatch_float(torch::headeronly::ScalarType t, F&& f) {
  using torch::headeronly::ScalarType;
  switch (t) {
    case ScalarType::Half:
      return f(static_cast<fp16*>(nullptr));
    case ScalarType::BFloat16:
      return f(static_cast<bf16*>(nullptr));
    default:
      return f(static_cast<float*>(nullptr));
  }
}

}  // namespace dlrm_ops::cpu::CPU_CAPABILITY

namespace dlrm_ops::cpu::CPU_CAPABILITY {

// 16 floats, the unit of every kernel's column loops. Loops over small arrays
// of these with constant trip counts keep pooled sums in registers.
#if defined(__AVX512F__)
// One GCC vector, one zmm register.
typedef float vf16 __attribute__((vector_size(64)));

inline vf16 vmin(vf16 a, vf16 b) { return a < b ? a : b; }
inline vf16 vmax(vf16 a, vf16 b) { return a > b ? a : b; }
#else
// Without AVX-512 GCC has no register mode for a 64-byte vector and keeps
// one in memory: every += of a pooled sum became stack stores and reloads
// (docs/architecture.md, "CPU dispatch"). So here it is a struct of the widest native vectors
// (two ymm under AVX2, four xmm otherwise), each operator applied part by part.
#if defined(__AVX__)
typedef float vfn __attribute__((vector_size(32)));
#else
typedef float vfn __attribute__((vector_size(16)));
#endif
struct vf16 {
  static constexpr int kParts = 64 / sizeof(vfn);
  static constexpr int kLanes = 16 / kParts;
  vfn part[kParts];
  float operator[](int k) const { return part[k / kLanes][k % kLanes]; }
};

template <typename F>
inline vf16 per_part(const vf16& a, const vf16& b, F f) {
  vf16 r;
#pragma GCC unroll 4
  for (int k = 0; k < vf16::kParts; ++k) r.part[k] = f(a.part[k], b.part[k]);
  return r;
}
inline vf16 splat(float s) {
  vf16 r;
#pragma GCC unroll 4
  for (int k = 0; k < vf16::kParts; ++k) r.part[k] = vfn{} + s;
  return r;
}
inline vf16 operator+(vf16 a, vf16 b) {
  return per_part(a, b, [](vfn x, vfn y) { return x + y; });
}
inline vf16 operator-(vf16 a, vf16 b) {
  return per_part(a, b, [](vfn x, vfn y) { return x - y; });
}
inline vf16 operator*(vf16 a, vf16 b) {
  return per_part(a, b, [](vfn x, vfn y) { return x * y; });
}
inline vf16 operator+(vf16 a, float s) { return a + splat(s); }
inline vf16 operator-(vf16 a, float s) { return a - splat(s); }
inline vf16 operator*(vf16 a, float s) { return a * splat(s); }
inline vf16 operator*(float s, vf16 a) { return splat(s) * a; }
inline vf16& operator+=(vf16& a, vf16 b) { return a = a + b; }
inline vf16 vmin(vf16 a, vf16 b) {
  return per_part(a, b, [](vfn x, vfn y) { return x < y ? x : y; });
}
inline vf16 vmax(vf16 a, vf16 b) {
  return per_part(a, b, [](vfn x, vfn y) { return x > y ? x : y; });
}
#endif

inline vf16 load16(const float* p) {
  vf16 v;
#if defined(__AVX512F__)
  std::memcpy(&v, p, sizeof(v));
#else  // part by part: a copy of the whole struct went through the stack
#pragma GCC unroll 4
  for (int k = 0; k < vf16::kParts; ++k) std::memcpy(&v.part[k], p + k * vf16::kLanes, sizeof(vfn));
#endif
  return v;
}
// 16 values converted one by one (the portable build's 16-bit loads).
template <typename T>
inline vf16 load16_each(const T* p) {
  float f[16];
  for (int k = 0; k < 16; ++k) f[k] = to_float(p[k]);
  return load16(f);
}

#if defined(__AVX2__) && !defined(__AVX512F__)
inline vf16 join(__m256 lo, __m256 hi) { return vf16{{(vfn)lo, (vfn)hi}}; }
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
  return load16_each(p);
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
  float f[16];
  for (int k = 0; k < 16; ++k) f[k] = static_cast<float>(p[k]);
  return load16(f);
#endif
}

// bf16 is the top half of an fp32: its bits shifted up 16.
inline vf16 load16(const bf16* p) {
#if defined(__AVX512F__)
  typedef uint16_t vu16 __attribute__((vector_size(32)));
  typedef uint32_t vu32 __attribute__((vector_size(64)));
  vu16 h;
  std::memcpy(&h, p, sizeof(h));
  vu32 u = __builtin_convertvector(h, vu32) << 16;
  vf16 v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
#elif defined(__AVX2__)
  auto half = [](const bf16* q) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))), 16));
  };
  return join(half(p), half(p + 8));
#else
  return load16_each(p);
#endif
}

// w - s * x rounded once where the instruction set fuses it, as the compiler
// contracts the any-D loops' `w -= lr * g`: the register path's update then
// keeps their bits whatever the compiler makes of the surrounding loop.
inline vf16 sub_scaled(vf16 w, float s, vf16 x) {
#if defined(__AVX512F__)
  return (vf16)_mm512_fnmadd_ps(_mm512_set1_ps(s), (__m512)x, (__m512)w);
#elif defined(__FMA__)  // FMA implies AVX: vf16 is ymm parts
  vf16 r;
#pragma GCC unroll 4
  for (int k = 0; k < vf16::kParts; ++k) {
    r.part[k] = (vfn)_mm256_fnmadd_ps(_mm256_set1_ps(s), (__m256)x.part[k], (__m256)w.part[k]);
  }
  return r;
#else
  return w - s * x;
#endif
}

inline void store16(float* p, vf16 v) {
#if defined(__AVX512F__)
  std::memcpy(p, &v, sizeof(v));
#else
#pragma GCC unroll 4
  for (int k = 0; k < vf16::kParts; ++k) std::memcpy(p + k * vf16::kLanes, &v.part[k], sizeof(vfn));
#endif
}

inline void store16(fp16* p, vf16 v) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__AVX2__)
  for (int k = 0; k < 2; ++k) {
    _mm_storeu_si128(
        reinterpret_cast<__m128i*>(p + 8 * k),
        _mm256_cvtps_ph((__m256)v.part[k], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#else
  for (int k = 0; k < 16; ++k) p[k] = static_cast<fp16>(v[k]);
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
#elif defined(__AVX__)
  _mm256_stream_ps(p, (__m256)v.part[0]);
  _mm256_stream_ps(p + 8, (__m256)v.part[1]);
#elif defined(__SSE2__)
  for (int k = 0; k < 4; ++k) _mm_stream_ps(p + 4 * k, (__m128)v.part[k]);
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
    if (n == N)
      f(std::integral_constant<int, N>{});
    else
      with_vector_count<N - 1>(n, f);
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
