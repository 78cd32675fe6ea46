// Argument checks of the row-wise quantized embedding ops, shared by the CPU
// and CUDA implementations.
#pragma once

#include <optional>

#include "common.h"

namespace dlrm_ops {

inline void check_bits(int64_t bits) {
  DLRM_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4, got ", bits);
}

inline ScalarType float_dtype(const std::optional<ScalarType>& dtype, const char* name) {
  const ScalarType t = dtype.value_or(ScalarType::Float);
  DLRM_CHECK(t == ScalarType::Float || t == ScalarType::Half || t == ScalarType::BFloat16, name,
             " must be float32, float16 or bfloat16, got ", dtype_name(t));
  return t;
}

inline int64_t dim_of_packed(const Tensor& packed, int64_t bits) {
  const int64_t bytes = packed.size(1);
  const int64_t D = bits == 8 ? bytes - 8 : (bytes - 4) * 2;
  DLRM_CHECK(D >= 1, "packed rows of ", bytes, " bytes hold no ", bits, "-bit values");
  return D;
}

// weight [R, D] to quantize: a float dtype, D >= 1 (even for 4 bits).
inline void check_quantize_args(const Tensor& weight, int64_t bits) {
  check_bits(bits);
  check_dtype(weight, "weight", {ScalarType::Float, ScalarType::Half, ScalarType::BFloat16});
  check_dim(weight, "weight", 2);
  DLRM_CHECK(weight.size(1) >= 1, "weight must have at least one column");
  DLRM_CHECK(bits == 8 || weight.size(1) % 2 == 0, "4-bit rows need an even dim, got ",
             weight.size(1));
}

// packed [R, row bytes] uint8 rows to dequantize.
inline void check_packed_rows(const Tensor& packed, int64_t bits) {
  check_bits(bits);
  check_dtype(packed, "packed", {ScalarType::Byte});
  check_dim(packed, "packed", 2);
}

// packed (contiguous uint8 table rows) and the output dtype of a quantized
// pooled lookup, which it returns.
inline ScalarType check_packed_tables(const Tensor& packed, int64_t bits,
                                      const std::optional<ScalarType>& output_dtype) {
  check_bits(bits);
  check_dtype(packed, "packed", {ScalarType::Byte});
  check_contiguous(packed, "packed");
  return float_dtype(output_dtype, "output_dtype");
}

}  // namespace dlrm_ops
