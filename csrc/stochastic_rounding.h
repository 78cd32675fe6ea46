// Stochastic rounding of updated fp16/bf16 weights, shared by the CPU and CUDA
// fused optimizers so that both draw the same random bits and round alike.
// The bits are a hash of (step, element): reproducible and independent of the
// thread count. Functions are `static` (one private copy per translation unit):
// the CPU kernels are compiled once per instruction set, and a shared inline
// copy could be merged into the portable build from an AVX-512 one.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DLRM_HOST_DEVICE __host__ __device__
#else
#define DLRM_HOST_DEVICE
#endif

namespace dlrm_ops {

DLRM_HOST_DEVICE static inline uint64_t mix64(uint64_t x) {  // splitmix64 finalizer
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// The seed of an optimizer step (`step` counted after its increment).
DLRM_HOST_DEVICE static inline uint64_t rounding_seed(int64_t step) {
  return mix64(static_cast<uint64_t>(step) * 0x9e3779b97f4a7c15ull);
}

// 32 uniform random bits for element `elem` (its index in the weights).
DLRM_HOST_DEVICE static inline uint32_t rounding_bits(uint64_t seed, int64_t elem) {
  return static_cast<uint32_t>(mix64(seed ^ static_cast<uint64_t>(elem)));
}

// bf16 bits of v rounded stochastically: random low 16 bits added, then
// truncated. False (and nothing written) for inf/NaN, which round to nearest.
DLRM_HOST_DEVICE static inline bool bf16_round_stochastic(float v, uint32_t u, uint16_t& out) {
  uint32_t bits;
  memcpy(&bits, &v, sizeof(bits));
  if ((bits & 0x7f800000u) == 0x7f800000u) return false;
  out = static_cast<uint16_t>((bits + (u >> 16)) >> 16);
  return true;
}

// fp16 bits of v rounded stochastically, given its nearest fp16 (bits hb,
// value hf) and `to_float` of fp16 bits: the neighbour on v's far side from hf
// is taken with probability (v - hf) / (other - hf), at most one half.
template <typename HalfToFloat>
DLRM_HOST_DEVICE static inline uint16_t fp16_round_stochastic(float v, uint16_t hb, float hf,
                                                              uint32_t u, HalfToFloat to_float) {
  if (hf == v || !(hf - hf == 0.f)) return hb;  // exact, or inf/NaN (hf - hf is NaN)
  const bool away = (v > hf) == (hf >= 0.f);    // moving away from zero
  const uint16_t ob = hf == 0.f ? static_cast<uint16_t>((v < 0 ? 0x8000 : 0) | 1)
                                : static_cast<uint16_t>(away ? hb + 1 : hb - 1);
  const float p_other = (v - hf) / (to_float(ob) - hf);
  return static_cast<float>(u) * (1.f / 4294967296.f) < p_other ? ob : hb;
}

}  // namespace dlrm_ops
