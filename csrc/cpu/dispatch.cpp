#include "cpu/dispatch.h"

#include <cstring>

namespace dlrm_ops::cpu {

static Capability detect() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return Capability::AVX512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("bmi2")) {
    return Capability::AVX2;
  }
#endif
  return Capability::DEFAULT;
}

Capability capability() {
  static const Capability cap = [] {
    Capability c = detect();
    if (const char* env = std::getenv("DLRM_OPS_CPU_CAPABILITY")) {
      for (int i = 0; i < static_cast<int>(c); ++i) {
        if (strcasecmp(env, capability_name(static_cast<Capability>(i))) == 0) {
          return static_cast<Capability>(i);
        }
      }
    }
    return c;
  }();
  return cap;
}

const char* capability_name(Capability c) {
  switch (c) {
    case Capability::AVX2:
      return "avx2";
    case Capability::AVX512:
      return "avx512";
    default:
      return "default";
  }
}

}  // namespace dlrm_ops::cpu
