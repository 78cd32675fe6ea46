// Interface between the dot-interaction ops (interaction.cpp) and their
// per-instruction-set kernels (interaction_kernel.cpp).
#pragma once

#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>

#include "cpu/dispatch.h"
#include "kernel_common.h"

namespace dlrm_ops::cpu {

using torch::headeronly::ScalarType;

// out [B, D + P]: dense then the pair dot products in `order`.
using InteractionForwardFn = void (*)(const InteractionArgs&, void* out);
// grad_out [B, D + P] -> grad_dense [B, D], grad_sparse (layout of sparse).
using InteractionBackwardFn = void (*)(const InteractionArgs&, const void* grad_out,
                                       void* grad_dense, void* grad_sparse);

extern DispatchStub<InteractionForwardFn> interaction_forward_stub;
extern DispatchStub<InteractionBackwardFn> interaction_backward_stub;

}  // namespace dlrm_ops::cpu
