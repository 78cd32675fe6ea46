// Argument checks of the dot-interaction ops, shared by the CPU and CUDA
// implementations.
#pragma once

#include <torch/csrc/stable/ops.h>

#include "common.h"

namespace dlrm_ops {

// Validates the inputs; `sparse_c` keeps a contiguous copy alive if one was needed.
inline InteractionArgs check_interaction(const Tensor& dense, const Tensor& sparse,
                                         bool self_interaction, int64_t order, Tensor& sparse_c) {
  check_same_device(sparse, "sparse", dense, "dense");
  check_dtype(dense, "dense", {ScalarType::Float, ScalarType::Half, ScalarType::BFloat16});
  DLRM_CHECK(sparse.scalar_type() == dense.scalar_type(), "sparse must have the dtype of dense (",
             dtype_name(dense.scalar_type()), "), got ", dtype_name(sparse.scalar_type()));
  check_dim(dense, "dense", 2);
  DLRM_CHECK(sparse.dim() == 2 || sparse.dim() == 3, "sparse must be [B, T, D] or [B, T*D], got ",
             sparse.dim(), "-D");
  DLRM_CHECK(order == kTril || order == kTriu, "order must be 0 (tril) or 1 (triu), got ", order);
  const int64_t B = dense.size(0), D = dense.size(1);
  DLRM_CHECK(D >= 1, "dense must have at least one column");
  DLRM_CHECK(sparse.size(0) == B, "sparse must have the batch size of dense (", B, "), got ",
             sparse.size(0));
  int64_t T;
  if (sparse.dim() == 3) {
    DLRM_CHECK(sparse.size(2) == D, "sparse must have the dim of dense (", D,
               ") in its last axis, got ", sparse.size(2));
    T = sparse.size(1);
  } else {
    DLRM_CHECK(sparse.size(1) % D == 0, "sparse has ", sparse.size(1),
               " columns, not a multiple of the dense dim D = ", D);
    T = sparse.size(1) / D;
  }
  DLRM_CHECK(T >= 1, "sparse must hold at least one feature");
  // The output width D + P must be an int64, even where B = 0 allows any T.
  const int64_t F = T + 1;
  int64_t twice_pairs, width;
  DLRM_CHECK(T < (int64_t{1} << 62) &&
                 !__builtin_mul_overflow(F, self_interaction ? F + 1 : F - 1, &twice_pairs) &&
                 !__builtin_add_overflow(D, twice_pairs / 2, &width),
             "sparse has too many features (", T, ") for an output width below 2^63");
  check_contiguous(dense, "dense");
  // Samples may be strided (e.g. a column slice); each sample's T*D must be dense.
  const bool inner_ok =
      sparse.stride(sparse.dim() - 1) == 1 && (sparse.dim() == 2 || sparse.stride(1) == D);
  sparse_c = inner_ok ? sparse : torch::stable::contiguous(sparse);
  return InteractionArgs{B,
                         T,
                         D,
                         self_interaction,
                         order,
                         dense.scalar_type(),
                         dense.const_data_ptr(),
                         sparse_c.const_data_ptr(),
                         B > 1 ? sparse_c.stride(0) : T * D};
}

// grad_output [B, D + P] in the dtype of dense, as a contiguous tensor.
inline Tensor check_interaction_grad(const Tensor& grad_output, const Tensor& dense,
                                     const InteractionArgs& a) {
  const int64_t P = interaction_pairs(a.T + 1, a.self_interaction);
  check_same_device(grad_output, "grad_output", dense, "dense");
  DLRM_CHECK(grad_output.scalar_type() == dense.scalar_type(),
             "grad_output must have the dtype of dense");
  check_dim(grad_output, "grad_output", 2);
  DLRM_CHECK(grad_output.size(0) == a.B && grad_output.size(1) == a.D + P,
             "grad_output must have shape [", a.B, ", ", a.D + P, "]");
  return torch::stable::contiguous(grad_output);
}

}  // namespace dlrm_ops
