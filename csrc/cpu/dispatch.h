// Runtime selection of the instruction set for the CPU kernels.
//
// Each file listed in CPU_KERNEL_SOURCES (CMakeLists.txt) is compiled once per
// capability with -DCPU_CAPABILITY=<cap> and that capability's -m flags. A
// kernel file registers its entry point into a DispatchStub with
// REGISTER_CPU_KERNEL; callers invoke stub(args...), which runs the best
// variant the running CPU supports.
#pragma once

#include <cstdlib>

namespace dlrm_ops::cpu {

enum class Capability : int { DEFAULT = 0, AVX2 = 1, AVX512 = 2, COUNT = 3 };

// Highest capability of this CPU, lowered by DLRM_OPS_CPU_CAPABILITY=default|avx2
// (useful to test every path on one machine). Computed once.
Capability capability();
const char* capability_name(Capability c);

template <typename Fn>
struct DispatchStub {
  Fn variants[static_cast<int>(Capability::COUNT)] = {};

  template <typename... Args>
  auto operator()(Args&&... args) const {
    for (int c = static_cast<int>(capability()); c >= 0; --c) {
      if (variants[c]) return variants[c](static_cast<Args&&>(args)...);
    }
    std::abort();  // DEFAULT is always compiled in
  }
};

struct Registrar {
  template <typename Fn>
  Registrar(DispatchStub<Fn>& stub, Capability c, Fn fn) {
    stub.variants[static_cast<int>(c)] = fn;
  }
};

}  // namespace dlrm_ops::cpu

#define DLRM_CONCAT_(a, b) a##b
#define DLRM_CONCAT(a, b) DLRM_CONCAT_(a, b)
#define REGISTER_CPU_KERNEL(stub, fn)                                           \
  static ::dlrm_ops::cpu::Registrar DLRM_CONCAT(registrar_##stub##_, __LINE__)( \
      stub, ::dlrm_ops::cpu::Capability::CPU_CAPABILITY, fn)
