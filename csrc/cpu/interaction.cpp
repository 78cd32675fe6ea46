// CPU ops of the pairwise dot interaction: checks, allocation, and the call
// into the per-ISA kernels (interaction_kernel.cpp).
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <tuple>

#include "common.h"
#include "cpu/interaction_kernel.h"
#include "interaction_checks.h"

namespace dlrm_ops {
namespace {

InteractionArgs prepare(const Tensor& dense, const Tensor& sparse, bool self_interaction,
                        int64_t order, Tensor& sparse_c) {
  check_cpu(dense, "dense");
  return check_interaction(dense, sparse, self_interaction, order, sparse_c);
}

Tensor dot_interaction(Tensor dense, Tensor sparse, bool self_interaction, int64_t order) {
  Tensor sparse_c;
  InteractionArgs a = prepare(dense, sparse, self_interaction, order, sparse_c);
  const int64_t P = interaction_pairs(a.T + 1, self_interaction);
  Tensor out = torch::stable::new_empty(dense, {a.B, a.D + P});
  cpu::interaction_forward_stub(a, out.mutable_data_ptr());
  return out;
}

std::tuple<Tensor, Tensor> dot_interaction_backward(Tensor grad_output, Tensor dense, Tensor sparse,
                                                    bool self_interaction, int64_t order) {
  Tensor sparse_c;
  InteractionArgs a = prepare(dense, sparse, self_interaction, order, sparse_c);
  Tensor go = check_interaction_grad(grad_output, dense, a);
  Tensor grad_dense = torch::stable::new_empty(dense, dense.sizes());
  Tensor grad_sparse = torch::stable::new_empty(sparse, sparse.sizes());
  cpu::interaction_backward_stub(a, go.const_data_ptr(), grad_dense.mutable_data_ptr(),
                                 grad_sparse.mutable_data_ptr());
  return {grad_dense, grad_sparse};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(dlrm_ops, CPU, m) {
  m.impl("dot_interaction", TORCH_BOX(&dot_interaction));
  m.impl("dot_interaction_backward", TORCH_BOX(&dot_interaction_backward));
}

}  // namespace dlrm_ops

namespace dlrm_ops::cpu {
DispatchStub<InteractionForwardFn> interaction_forward_stub;
DispatchStub<InteractionBackwardFn> interaction_backward_stub;
}  // namespace dlrm_ops::cpu
