// Shared helpers for op implementations: argument checks whose messages name
// the argument, and dtype names. Only stable-ABI headers are used.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <string>

#include "kernel_common.h"

namespace dlrm_ops {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

#define DLRM_CHECK(cond, ...) STD_TORCH_CHECK(cond, __VA_ARGS__)

inline const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float:
      return "float32";
    case ScalarType::Half:
      return "float16";
    case ScalarType::BFloat16:
      return "bfloat16";
    case ScalarType::Double:
      return "float64";
    case ScalarType::Int:
      return "int32";
    case ScalarType::Long:
      return "int64";
    case ScalarType::Byte:
      return "uint8";
    default:
      return "unsupported dtype";
  }
}

inline void check_dtype(const Tensor& t, const char* name,
                        std::initializer_list<ScalarType> allowed) {
  for (ScalarType a : allowed) {
    if (t.scalar_type() == a) return;
  }
  std::string names;
  for (ScalarType a : allowed) {
    names += (names.empty() ? "" : ", ");
    names += dtype_name(a);
  }
  DLRM_CHECK(false, name, " must have dtype in {", names, "}, got ", dtype_name(t.scalar_type()));
}

inline void check_dim(const Tensor& t, const char* name, int64_t dim) {
  DLRM_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got ", t.dim(), "-D");
}

inline void check_contiguous(const Tensor& t, const char* name) {
  DLRM_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void check_same_device(const Tensor& t, const char* name, const Tensor& ref,
                              const char* ref_name) {
  DLRM_CHECK(t.is_cpu() == ref.is_cpu() && t.get_device() == ref.get_device(), name,
             " must be on the same device as ", ref_name);
}

inline void check_cpu(const Tensor& t, const char* name) {
  DLRM_CHECK(t.is_cpu(), name, " must be a CPU tensor");
}

}  // namespace dlrm_ops
