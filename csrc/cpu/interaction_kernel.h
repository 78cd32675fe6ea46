// Interface between the dot-interaction ops (interaction.cpp) and their
// per-instruction-set kernels (interaction_kernel.cpp).
#pragma once

#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>

#include "cpu/dispatch.h"

namespace dlrm_ops::cpu {

using torch::headeronly::ScalarType;

enum InteractionOrder : int64_t { kTril = 0, kTriu = 1 };

// F = T + 1 features per sample: x0 = dense[b] ([D]) and x1..xT = the T
// consecutive D-vectors at sparse + b * sparse_stride. P pairs.
struct InteractionArgs {
  int64_t B, T, D;
  bool self_interaction;
  int64_t order;
  ScalarType dtype;  // of dense, sparse, output and gradients
  const void* dense;
  const void* sparse;
  int64_t sparse_stride;  // elements between samples in sparse
};

inline int64_t interaction_pairs(int64_t F, bool self) { return self ? F * (F + 1) / 2 : F * (F - 1) / 2; }

// out [B, D + P]: dense then the pair dot products in `order`.
using InteractionForwardFn = void (*)(const InteractionArgs&, void* out);
// grad_out [B, D + P] -> grad_dense [B, D], grad_sparse (layout of sparse).
using InteractionBackwardFn = void (*)(const InteractionArgs&, const void* grad_out,
                                       void* grad_dense, void* grad_sparse);

extern DispatchStub<InteractionForwardFn> interaction_forward_stub;
extern DispatchStub<InteractionBackwardFn> interaction_backward_stub;

}  // namespace dlrm_ops::cpu
