// Argument checks of the embedding-bag backward and fused-update ops, shared
// by the CPU and CUDA implementations (they read no tensor data).
#pragma once

#include <cmath>
#include <optional>
#include <string>

#include "common.h"
#include "optimizers.h"

namespace dlrm_ops {

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

// The optimizers' ids and names, for messages: "1 (sgd), 2 (adagrad), ...".
inline std::string optimizer_names() {
  std::string out;
  for (int64_t o = kFirstOptimizer; o <= kLastOptimizer; ++o) {
    with_rule(o, [&](auto r) {
      out += (out.empty() ? "" : ", ") + std::to_string(o) + " (" + decltype(r)::kName + ")";
    });
  }
  return out;
}

// Optimizer id, hparams (float64, HParam order), the int64 step and the fp32
// state of the optimizer's layout (csrc/optimizers.h) for `total_rows` rows of
// `weights` (-1: a row-wise state's size is left to the caller).
inline void check_optimizer_args(const Tensor& weights, const Tensor& momentum1,
                                 const Tensor& momentum2, const Tensor& step, const Tensor& hparams,
                                 int64_t optimizer, int64_t total_rows) {
  DLRM_CHECK(optimizer >= kFirstOptimizer && optimizer <= kLastOptimizer,
             "optimizer must be one of ", optimizer_names(), ", got ", optimizer);
  check_same_device(hparams, "hparams", weights, "weights");
  check_dtype(hparams, "hparams", {ScalarType::Double});
  DLRM_CHECK(hparams.numel() == kNumHParams && hparams.is_contiguous(),
             "hparams must hold [lr, eps, beta1, beta2, weight_decay]");
  check_same_device(step, "step", weights, "weights");
  check_dtype(step, "step", {ScalarType::Long});
  DLRM_CHECK(step.numel() == 1, "step must have one element");
  const StateLayout s = state_layout(optimizer);
  auto numel = [&](State st, const Tensor& t) {
    return st == State::kRow && total_rows < 0 ? t.numel()
                                               : state_numel(st, weights.numel(), total_rows);
  };
  check_state(momentum1, "momentum1", weights, numel(s.m1, momentum1));
  check_state(momentum2, "momentum2", weights, numel(s.m2, momentum2));
}

// The values of hparams (host memory) that `optimizer` reads, as torch.optim
// checks its arguments; NaN and infinity are refused too.
inline void check_hparams(const double* hp, int64_t optimizer) {
  const int used = with_rule(optimizer, [](auto r) { return decltype(r)::kHParams; });
  auto check = [&](HParam p, bool ok, const char* what) {
    DLRM_CHECK(!(used & bit(p)) || (std::isfinite(hp[p]) && ok), "hparams: invalid ", what, ": ",
               hp[p]);
  };
  check(kLr, hp[kLr] >= 0, "learning rate (must be >= 0)");
  check(kWeightDecay, hp[kWeightDecay] >= 0, "weight_decay (must be >= 0)");
  check(kEps, hp[kEps] >= 0, "eps (must be >= 0)");
  check(kBeta1, hp[kBeta1] >= 0 && hp[kBeta1] < 1, "beta1 (must be in [0, 1))");
  check(kBeta2, hp[kBeta2] >= 0 && hp[kBeta2] < 1, "beta2 (must be in [0, 1))");
}

using EmbeddingBagForward = Tensor (*)(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int64_t,
                                       std::optional<Tensor>, int64_t, bool, int64_t);

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
                              bool /*stochastic_rounding*/, int64_t check) {
  return Forward(weights, weights_offsets, dim_offsets, rows, indices, offsets, pooling,
                 per_sample_weights, total_dim, false, check);
}

}  // namespace dlrm_ops
