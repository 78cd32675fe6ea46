// Pairwise dot interaction, forward and backward, one sample at a time in L1.
// fp32 features whose rows are whole vectors are read in place (and the
// backward writes their gradients in place); others are converted to fp32
// scratch once. The Gram matrix (only the triangle the order needs) comes from
// 4x4 blocks of vector dot products reduced in registers (AVX-512, D >= 32) or
// from a register-blocked micro-kernel over the transposed features; pairs go
// straight into the output after the dense copy. Compiled once per CPU
// capability.
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <memory>

#include "cpu/interaction_kernel.h"
#include "cpu/vec.h"

namespace dlrm_ops::cpu {
namespace CPU_CAPABILITY {
namespace {

#if defined(__AVX512F__)
constexpr int kRows = 4;     // Gram rows per micro-kernel call
constexpr int kVectors = 4;  // 16-float vectors per micro-kernel call
#else
constexpr int kRows = 2;
constexpr int kVectors = 2;
#endif

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Per-thread fp32 scratch for one sample.
struct Scratch {
  int64_t F, F4, Fp, Dp;
  std::unique_ptr<float[]> buf;
  // X [Fp, Dp] (rows past F zero), XT [Dp, Fp], Z (or S) [F4, Fp]
  float *X, *XT, *Z;
  std::unique_ptr<const float*[]> rows;  // row f of the features (X or the fp32 input)
  Scratch(int64_t F_, int64_t D)
      : F(F_), F4(round_up(F_, kRows)), Fp(round_up(F_, 16)), Dp(round_up(D, 16)) {
    const int64_t n = Fp * Dp + Dp * Fp + F4 * Fp + 16;  // + 16: whole-vector reads of Z's last row
    buf.reset(new float[n]());
    X = buf.get();
    XT = X + Fp * Dp;
    Z = XT + Dp * Fp;
    rows.reset(new const float*[Fp]);
    for (int64_t f = 0; f < Fp; ++f) rows[f] = X + f * Dp;
  }
};

// Row of D values as fp32 (inline vector copies: a memmove call per row
// costs more than the copy).
template <typename T>
inline void load_row(float* __restrict dst, const T* __restrict src, int64_t D) {
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) store16(dst + d, load16(src + d));
  for (; d < D; ++d) dst[d] = to_float(src[d]);
}

// Feature f of sample b: dense for f = 0, else sparse feature f - 1.
template <typename T>
inline const T* feature(const InteractionArgs& a, int64_t b, int64_t f) {
  return f == 0 ? static_cast<const T*>(a.dense) + b * a.D
                : static_cast<const T*>(a.sparse) + b * a.sparse_stride + (f - 1) * a.D;
}

// Points s.rows at sample b's features: in place for fp32 rows of whole
// vectors, else converted into s.X.
template <typename T>
void load_features(const InteractionArgs& a, int64_t b, Scratch& s) {
  for (int64_t f = 0; f <= a.T; ++f) {
    if constexpr (std::is_same_v<T, float>) {
      if (a.D == s.Dp) {
        s.rows[f] = feature<T>(a, b, f);
        continue;
      }
    }
    load_row(s.X + f * s.Dp, feature<T>(a, b, f), a.D);
  }
}

// C[r][0, 16 NV) = sum_k A[r][k] * B[k][0, 16 NV) for kRows rows r, with the
// rows of A, B and C given by arow(r), brow(k), crow(r): the register-blocked micro-kernel
// of both the Gram matrix (A = X, B = X^T) and the backward (A = the pair
// gradients S, B = X).
template <int NV, typename ARow, typename BRow, typename CRow>
inline void micro_gemm(const ARow& arow, const BRow& brow, int64_t K, const CRow& crow) {
  const float* A[kRows];
  for (int r = 0; r < kRows; ++r) A[r] = arow(r);
  vf16 acc[kRows][NV] = {};
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = brow(k);
    vf16 b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = load16(bk + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const float a = A[r][k];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
    float* c = crow(r);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) store16(c + 16 * v, acc[r][v]);
  }
}

template <typename... Args>
inline void micro_gemm_nv(int64_t nv, Args&&... args) {
  switch (nv) {
    case 1:
      micro_gemm<1>(args...);
      break;
    case 2:
      micro_gemm<2>(args...);
      break;
    case 3:
      micro_gemm<3>(args...);
      break;
    default:
      micro_gemm<4>(args...);
      break;
  }
}

#if defined(__AVX512F__)
typedef int32_t vi16 __attribute__((vector_size(64)));

// One round of the 16x16 in-register transpose: swaps the off-diagonal M x M
// sub-blocks of every 2M x 2M block.
template <int M>
inline void transpose_round(vf16* r, vi16 lo, vi16 hi) {
#pragma GCC unroll 16
  for (int k = 0; k < 16; ++k) {
    if ((k / M) % 2 == 0) {
      const vf16 a = r[k], b = r[k + M];
      r[k] = __builtin_shuffle(a, b, lo);
      r[k + M] = __builtin_shuffle(a, b, hi);
    }
  }
}

template <int M>
void transpose_masks(vi16& lo, vi16& hi) {  // lanes of new rows k, k+M in (row k, row k+M)
  for (int k = 0; k < 16; ++k) {
    lo[k] = (k / M) % 2 == 0 ? k : k - M + 16;
    hi[k] = (k / M) % 2 == 0 ? k + M : k + 16;
  }
}
#endif

// XT = X^T (the padding rows of X are zero, so are XT's padding columns).
void transpose(Scratch& s) {
#if defined(__AVX512F__)
  struct Masks {
    vi16 lo8, hi8, lo4, hi4, lo2, hi2, lo1, hi1;
  };
  static const Masks mk = [] {
    Masks m;
    transpose_masks<8>(m.lo8, m.hi8);
    transpose_masks<4>(m.lo4, m.hi4);
    transpose_masks<2>(m.lo2, m.hi2);
    transpose_masks<1>(m.lo1, m.hi1);
    return m;
  }();
  const Masks masks = mk;
  for (int64_t j0 = 0; j0 < s.Fp; j0 += 16) {
    for (int64_t d0 = 0; d0 < s.Dp; d0 += 16) {
      vf16 r[16];
#pragma GCC unroll 16
      for (int k = 0; k < 16; ++k) r[k] = load16(s.rows[j0 + k] + d0);
      transpose_round<8>(r, masks.lo8, masks.hi8);
      transpose_round<4>(r, masks.lo4, masks.hi4);
      transpose_round<2>(r, masks.lo2, masks.hi2);
      transpose_round<1>(r, masks.lo1, masks.hi1);
#pragma GCC unroll 16
      for (int k = 0; k < 16; ++k) store16(s.XT + (d0 + k) * s.Fp + j0, r[k]);
    }
  }
#else
  for (int64_t j = 0; j < s.F; ++j) {
    for (int64_t d = 0; d < s.Dp; ++d) s.XT[d * s.Fp + j] = s.rows[j][d];
  }
#endif
}

#if defined(__AVX512F__)
// Halves the vectors of a horizontal 16-way sum: lanes of v[k] and v[k+M]
// that transpose_round would swap are added instead.
template <int M>
inline void reduce_round(vf16* v, vi16 lo, vi16 hi) {
#pragma GCC unroll 8
  for (int k = 0; k < M; ++k)
    v[k] = __builtin_shuffle(v[k], v[k + M], lo) + __builtin_shuffle(v[k], v[k + M], hi);
}

// Lane k of the result is the sum of acc[k]'s lanes. Inlined, so the sixteen
// sums never leave registers; each mask passes through an empty volatile asm
// where it is used, so that the compiler cannot hoist the mask registers into
// the dot products' loop.
inline __attribute__((always_inline)) vi16 at_use(const vi16& m) {
  vi16 v = m;
  asm volatile("" : "+v"(v));
  return v;
}

inline __attribute__((always_inline)) vf16 reduce16(vf16 (&acc)[16]) {
  static const auto masks = [] {
    std::array<vi16, 8> m;
    transpose_masks<8>(m[0], m[1]);
    transpose_masks<4>(m[2], m[3]);
    transpose_masks<2>(m[4], m[5]);
    transpose_masks<1>(m[6], m[7]);
    return m;
  }();
  reduce_round<8>(acc, at_use(masks[0]), at_use(masks[1]));
  reduce_round<4>(acc, at_use(masks[2]), at_use(masks[3]));
  reduce_round<2>(acc, at_use(masks[4]), at_use(masks[5]));
  reduce_round<1>(acc, at_use(masks[6]), at_use(masks[7]));
  return acc[0];
}

// Z[i][j] = <X[i], X[j]> for the 4x4 block of rows i0.. and j0..: sixteen
// vector dot products along d, then one in-register reduction of all
// sixteen (lane 4r + c of the result is pair (i0 + r, j0 + c)). A block on the
// diagonal (Diag) computes the ten pairs c <= r and mirrors the other six.
template <bool Diag, int NC>
void dot_block(Scratch& s, int64_t i0, int64_t j0) {
  const float* xi[4];
  const float* xj[4];
  for (int r = 0; r < 4; ++r) {
    xi[r] = s.rows[i0 + r];
    xj[r] = s.rows[j0 + r];
  }
  vf16 acc[16] = {};
  const int64_t Dp = NC > 0 ? 16 * NC : s.Dp;  // NC > 0: the trip count is known, the loop unrolled
#pragma GCC unroll 8
  for (int64_t d = 0; d < Dp; d += 16) {
    vf16 vj[4];
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) vj[c] = load16(xj[c] + d);
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const vf16 vi = load16(xi[r] + d);
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        if (!Diag || c <= r) acc[4 * r + c] += vi * vj[c];
      }
    }
  }
  vf16 z = reduce16(acc);
  if constexpr (Diag) {
    static const vi16 mirror = [] {
      vi16 m;
      for (int k = 0; k < 16; ++k) m[k] = k % 4 > k / 4 ? 4 * (k % 4) + k / 4 : k;
      return m;
    }();
    z = __builtin_shuffle(z, at_use(mirror));
  }
  float sums[16];
  store16(sums, z);
  float* out = s.Z + i0 * s.Fp + j0;
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r) std::memcpy(out + r * s.Fp, sums + 4 * r, 4 * sizeof(float));
}
#endif

// The triangle of the Gram matrix that `order` needs into s.Z: j <= i for
// tril, j >= i for triu (each row's pairs are then contiguous).
void gram(Scratch& s, int64_t order) {
#if defined(__AVX512F__)
  if (s.Dp >= 32) {  // below that the reductions cost more than the dot products
    for (int64_t i0 = 0; i0 < s.F; i0 += 4) {
      const int64_t jb = order == kTril ? 0 : i0, je = order == kTril ? i0 + 4 : s.F;
      for (int64_t j0 = jb; j0 < je; j0 += 4) {
        const bool diag = j0 == i0;
        switch (s.Dp) {
          case 64:
            diag ? dot_block<true, 4>(s, i0, j0) : dot_block<false, 4>(s, i0, j0);
            break;
          case 128:
            diag ? dot_block<true, 8>(s, i0, j0) : dot_block<false, 8>(s, i0, j0);
            break;
          default:
            diag ? dot_block<true, 0>(s, i0, j0) : dot_block<false, 0>(s, i0, j0);
        }
      }
    }
    return;
  }
#endif
  transpose(s);
  for (int64_t i0 = 0; i0 < s.F; i0 += kRows) {
    const int64_t jbegin = order == kTril ? 0 : i0 / 16 * 16;
    const int64_t jend = order == kTril ? std::min(i0 + kRows, s.F) : s.F;
    for (int64_t j0 = jbegin; j0 < jend; j0 += 16 * kVectors) {
      const int64_t nv = (std::min<int64_t>(jend - j0, 16 * kVectors) + 15) / 16;
      // Z[i][j] = <X[i], X[j]> = sum_d X[i][d] XT[d][j]
      micro_gemm_nv(
          nv, [&](int r) { return s.rows[i0 + r]; },
          [&](int64_t d) { return s.XT + d * s.Fp + j0; }, s.Dp,
          [&](int r) { return s.Z + (i0 + r) * s.Fp + j0; });
    }
  }
}

// Row i's pairs in output order are columns [first, first + n) of row i.
template <typename F>
inline void for_each_pair_row(int64_t Fn, bool self, int64_t order, const F& f) {
  int64_t p = 0;
  for (int64_t i = 0; i < Fn; ++i) {
    const int64_t first = order == kTril ? 0 : i + (self ? 0 : 1);
    const int64_t n = order == kTril ? i + (self ? 1 : 0) : Fn - first;
    f(i, first, n, p);
    p += n;
  }
}

template <typename T>
void forward(const InteractionArgs& a, void* out_ptr) {
  const int64_t F = a.T + 1, P = interaction_pairs(F, a.self_interaction);
  const int64_t width = a.D + P;
  T* out = static_cast<T*>(out_ptr);
  const int64_t grain = std::max<int64_t>(1, 4096 / (F * F + F * a.D));
  torch::stable::parallel_for(0, a.B, grain, [&](int64_t b0, int64_t b1) {
    Scratch s(F, a.D);
    for (int64_t b = b0; b < b1; ++b) {
      load_features<T>(a, b, s);
      gram(s, a.order);
      T* o = out + b * width;
      const T* dense = static_cast<const T*>(a.dense) + b * a.D;
      std::copy(dense, dense + a.D, o);
      T* pairs = o + a.D;
      // Rows in output order as whole vectors: what a row writes past its end
      // the later rows overwrite, so only rows whose vectors would pass the
      // sample's end are written exactly.
      for_each_pair_row(F, a.self_interaction, a.order,
                        [&](int64_t i, int64_t first, int64_t n, int64_t p) {
                          const float* z = s.Z + i * s.Fp + first;
                          if (p + round_up(n, 16) > P) {
                            row_store(pairs + p, z, n);
                          } else {
                            for (int64_t k = 0; k < n; k += 16)
                              store16(pairs + p + k, load16(z + k));
                          }
                        });
    }
  });
}

template <typename T>
void backward(const InteractionArgs& a, const void* grad_out_ptr, void* grad_dense_ptr,
              void* grad_sparse_ptr) {
  const int64_t F = a.T + 1, P = interaction_pairs(F, a.self_interaction);
  const int64_t width = a.D + P;
  const T* go = static_cast<const T*>(grad_out_ptr);
  T* gd = static_cast<T*>(grad_dense_ptr);
  T* gs = static_cast<T*>(grad_sparse_ptr);
  const int64_t grain = std::max<int64_t>(1, 4096 / (F * F + F * a.D));
  torch::stable::parallel_for(0, a.B, grain, [&](int64_t b0, int64_t b1) {
    Scratch s(F, a.D);
    std::unique_ptr<float[]> dX(new float[s.F4 * s.Dp]);
    // Row i of dX: written in place into grad_sparse for fp32 rows of whole
    // vectors, else into dX (always for the dense row 0 and the padding).
    std::unique_ptr<float*[]> dx_rows(new float*[s.F4]);
    for (int64_t i = 0; i < s.F4; ++i) dx_rows[i] = dX.get() + i * s.Dp;
    const bool in_place = std::is_same_v<T, float> && a.D == s.Dp;
    for (int64_t b = b0; b < b1; ++b) {
      load_features<T>(a, b, s);
      T* gsb = gs + b * a.T * a.D;
      if (in_place) {
        for (int64_t i = 1; i < F; ++i) dx_rows[i] = reinterpret_cast<float*>(gsb + (i - 1) * a.D);
      }
      // S: symmetric pair gradients; d<x_i, x_i>/dx_i = 2 x_i.
      std::fill(s.Z, s.Z + s.F4 * s.Fp, 0.f);
      const T* g = go + b * width + a.D;
      for_each_pair_row(F, a.self_interaction, a.order,
                        [&](int64_t i, int64_t first, int64_t n, int64_t p) {
                          for (int64_t k = 0; k < n; ++k) {
                            const int64_t j = first + k;
                            const float v = to_float(g[p + k]);
                            if (i == j) {
                              s.Z[i * s.Fp + i] = 2.f * v;
                            } else {
                              s.Z[i * s.Fp + j] = v;
                              s.Z[j * s.Fp + i] = v;
                            }
                          }
                        });
      for (int64_t i0 = 0; i0 < F; i0 += kRows) {
        for (int64_t d0 = 0; d0 < s.Dp; d0 += 16 * kVectors) {
          const int64_t nv = std::min<int64_t>((s.Dp - d0) / 16, kVectors);
          // dX[i] = sum_j S[i][j] X[j], S in s.Z
          micro_gemm_nv(
              nv, [&](int r) { return s.Z + (i0 + r) * s.Fp; },
              [&](int64_t j) { return s.rows[j] + d0; }, s.F,
              [&](int r) { return dx_rows[i0 + r] + d0; });
        }
      }
      const T* gdense = go + b * width;
      for (int64_t d = 0; d < a.D; ++d)
        gd[b * a.D + d] = from_float<T>(to_float(gdense[d]) + dX[d]);
      if (!in_place) {
        for (int64_t t = 0; t < a.T; ++t) row_store(gsb + t * a.D, dX.get() + (t + 1) * s.Dp, a.D);
      }
    }
  });
}

void forward_entry(const InteractionArgs& a, void* out) {
  dispatch_float(a.dtype, [&](auto* p) { forward<std::remove_pointer_t<decltype(p)>>(a, out); });
}
void backward_entry(const InteractionArgs& a, const void* go, void* gd, void* gs) {
  dispatch_float(a.dtype,
                 [&](auto* p) { backward<std::remove_pointer_t<decltype(p)>>(a, go, gd, gs); });
}

}  // namespace

REGISTER_CPU_KERNEL(interaction_forward_stub, &forward_entry);
REGISTER_CPU_KERNEL(interaction_backward_stub, &backward_entry);

}  // namespace CPU_CAPABILITY
}  // namespace dlrm_ops::cpu
