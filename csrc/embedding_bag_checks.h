// Argument checks of the embedding-bag backward and fused-update ops, shared
// by the CPU and CUDA implementations (they read no tensor data).
#pragma once

#include <cmath>
#include <optional>

#include "common.h"
#include "cpu/embedding_bag_kernel.h"

namespace dlrm_ops {

using cpu::kAdagrad;
using cpu::kAdam;
using cpu::kRowwiseAdagrad;
using cpu::kSGD;

inline void check_grad_output(const Tensor& grad_output, const Tensor& weights, int64_t B,
                              int64_t total_dim) {
  check_same_device(grad_output, "grad_output", weights, "weights");
  DLRM_CHECK(grad_output.scalar_type() == weights.scalar_type(),
             "grad_output must have the dtype of weights");
  check_dim(grad_output, "grad_output", 2);
  check_contiguous(grad_output, "grad_output");
  DLRM_CHECK(grad_output.size(0) == B && grad_output.size(1) == total_dim,
             "grad_output must have shape [", B, ", ", total_dim, "]");
}

inline void check_state(const Tensor& t, const char* name, const Tensor& weights, int64_t numel) {
  check_same_device(t, name, weights, "weights");
  check_dtype(t, name, {ScalarType::Float});
  check_contiguous(t, name);
  DLRM_CHECK(t.numel() == numel, name, " must have ", numel, " elements for this optimizer, got ",
             t.numel());
}

// Optimizer id, hparams (float64 [lr, eps, beta1, beta2, weight_decay]), the
// int64 step and the fp32 state sized for `total_rows` rows of `weights`.
inline void check_optimizer_args(const Tensor& weights, const Tensor& momentum1,
                                 const Tensor& momentum2, const Tensor& step,
                                 const Tensor& hparams, int64_t optimizer, int64_t total_rows) {
  DLRM_CHECK(optimizer >= kSGD && optimizer <= kAdam,
             "optimizer must be 1 (sgd), 2 (adagrad), 3 (rowwise_adagrad) or 4 (adam), got ",
             optimizer);
  check_same_device(hparams, "hparams", weights, "weights");
  check_dtype(hparams, "hparams", {ScalarType::Double});
  DLRM_CHECK(hparams.numel() == 5 && hparams.is_contiguous(),
             "hparams must hold [lr, eps, beta1, beta2, weight_decay]");
  check_same_device(step, "step", weights, "weights");
  check_dtype(step, "step", {ScalarType::Long});
  DLRM_CHECK(step.numel() == 1, "step must have one element");
  const int64_t n1 = optimizer == kSGD ? 0
                     : optimizer == kRowwiseAdagrad ? total_rows
                                                    : weights.numel();
  check_state(momentum1, "momentum1", weights, n1);
  check_state(momentum2, "momentum2", weights, optimizer == kAdam ? weights.numel() : 0);
}

// The values of hparams (host memory) for `optimizer`, as torch.optim checks
// its arguments; NaN and infinity are refused too.
inline void check_hparams(const double* hp, int64_t optimizer) {
  auto check = [](double v, bool ok, const char* what) {
    DLRM_CHECK(std::isfinite(v) && ok, "hparams: invalid ", what, ": ", v);
  };
  check(hp[0], hp[0] >= 0, "learning rate (must be >= 0)");
  check(hp[4], hp[4] >= 0, "weight_decay (must be >= 0)");
  if (optimizer != kSGD) check(hp[1], hp[1] >= 0, "eps (must be >= 0)");
  if (optimizer == kAdam) {
    check(hp[2], hp[2] >= 0 && hp[2] < 1, "beta1 (must be in [0, 1))");
    check(hp[3], hp[3] >= 0 && hp[3] < 1, "beta2 (must be in [0, 1))");
  }
}

using EmbeddingBagForward = Tensor (*)(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int64_t,
                                       std::optional<Tensor>, int64_t, bool);

// embedding_bag_forward_with_optimizer on a device from a forward of the
// plain forward's signature: CUDA's plain forward, the CPU's training forward
// (which also sorts for the update where that pays). The optimizer state is
// read by its backward (embedding_bag_update_).
template <EmbeddingBagForward Forward>
Tensor forward_with_optimizer(Tensor weights, Tensor weights_offsets, Tensor dim_offsets,
                              Tensor rows, Tensor indices, Tensor offsets, int64_t pooling,
                              std::optional<Tensor> per_sample_weights, int64_t total_dim,
                              Tensor /*momentum1*/, Tensor /*momentum2*/, Tensor /*step*/,
                              Tensor /*hparams*/, int64_t /*optimizer*/,
                              bool /*stochastic_rounding*/) {
  return Forward(weights, weights_offsets, dim_offsets, rows, indices, offsets, pooling,
                 per_sample_weights, total_dim, false);
}

}  // namespace dlrm_ops
