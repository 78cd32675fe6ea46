// The optimizers fused into the embedding backward, one struct each, used by
// the CPU update (cpu/embedding_bag_update_kernel.cpp), the CUDA update
// (cuda/embedding_bag.cu) and the checks. Python's mirror is
// dlrm_ops/optimizers.py. Adding one: docs/architecture.md.
//
// Every touched row gets its summed gradient g (duplicates summed in lookup
// order), plus weight_decay * w when that is set, then:
//   kM1, kM2    where momentum1 / momentum2 live: none, per element (the
//               weights' layout) or per row (row_offsets[t] + row); fp32
//   kHParams    the hyperparameters it reads (bits of 1 << HParam), checked
//   row_state   new value of its per-row state from the old and mean(g*g)
//   row_coef    the row's coefficient, from the new per-row state
//   apply       the new weight of one element, from coef, g and w; updates
//               the element's state through m1 / m2 (this element's entry)
// All in fp32 but Adam's bias correction (Hyper, from float64 hparams).
#pragma once

#include <cmath>
#include <cstdint>

#include "kernel_common.h"

namespace dlrm_ops {

enum Optimizer : int64_t {
  kSGD = 1,
  kAdagrad = 2,
  kRowwiseAdagrad = 3,
  kAdam = 4,
  kRowwiseAdam = 5,
};

enum class State : int { kNone = 0, kElement = 1, kRow = 2 };

constexpr int bit(HParam p) { return 1 << p; }

// Hyperparameters as the rules read them; `t` is the step after this update's
// increment.
struct Hyper {
  float lr, eps, beta1, beta2, weight_decay;
  float step_size;  // Adam's lr * sqrt(1 - beta2^t) / (1 - beta1^t)
};

DLRM_HOST_DEVICE inline Hyper make_hyper(const double* hp, int64_t t) {
  Hyper h;
  h.lr = static_cast<float>(hp[kLr]);
  h.eps = static_cast<float>(hp[kEps]);
  h.beta1 = static_cast<float>(hp[kBeta1]);
  h.beta2 = static_cast<float>(hp[kBeta2]);
  h.weight_decay = static_cast<float>(hp[kWeightDecay]);
  const double bc1 = 1.0 - pow(hp[kBeta1], static_cast<double>(t));
  const double bc2 = 1.0 - pow(hp[kBeta2], static_cast<double>(t));
  h.step_size = static_cast<float>(hp[kLr] * sqrt(bc2) / bc1);
  return h;
}

// w -= lr * g
struct Sgd {
  static constexpr Optimizer kId = kSGD;
  static constexpr const char* kName = "sgd";
  static constexpr State kM1 = State::kNone, kM2 = State::kNone;
  static constexpr int kHParams = bit(kLr) | bit(kWeightDecay);
  DLRM_HOST_DEVICE static float row_state(const Hyper&, float s, float) { return s; }
  DLRM_HOST_DEVICE static float row_coef(const Hyper& h, float) { return h.lr; }
  DLRM_HOST_DEVICE static float apply(const Hyper& h, float, float g, float w, float*, float*) {
    return w - h.lr * g;
  }
};

// s += g*g (per element); w -= lr * g / (sqrt(s) + eps)
struct Adagrad {
  static constexpr Optimizer kId = kAdagrad;
  static constexpr const char* kName = "adagrad";
  static constexpr State kM1 = State::kElement, kM2 = State::kNone;
  static constexpr int kHParams = bit(kLr) | bit(kEps) | bit(kWeightDecay);
  DLRM_HOST_DEVICE static float row_state(const Hyper&, float s, float) { return s; }
  DLRM_HOST_DEVICE static float row_coef(const Hyper& h, float) { return h.lr; }
  DLRM_HOST_DEVICE static float apply(const Hyper& h, float, float g, float w, float* m1, float*) {
    *m1 += g * g;
    return w - h.lr * g / (sqrtf(*m1) + h.eps);
  }
};

// s += mean(g*g) (per row); w -= lr * g / (sqrt(s) + eps)
struct RowwiseAdagrad {
  static constexpr Optimizer kId = kRowwiseAdagrad;
  static constexpr const char* kName = "rowwise_adagrad";
  static constexpr State kM1 = State::kRow, kM2 = State::kNone;
  static constexpr int kHParams = bit(kLr) | bit(kEps) | bit(kWeightDecay);
  DLRM_HOST_DEVICE static float row_state(const Hyper&, float s, float mean_sq) {
    return s + mean_sq;
  }
  DLRM_HOST_DEVICE static float row_coef(const Hyper& h, float s) {
    return h.lr / (sqrtf(s) + h.eps);
  }
  DLRM_HOST_DEVICE static float apply(const Hyper&, float coef, float g, float w, float*, float*) {
    return w - coef * g;
  }
};

// Lazy Adam (rows without gradient keep their moments, as SparseAdam):
// m += (g - m)(1-b1); v += (g*g - v)(1-b2); w -= step_size * m / (sqrt(v) + eps)
struct Adam {
  static constexpr Optimizer kId = kAdam;
  static constexpr const char* kName = "adam";
  static constexpr State kM1 = State::kElement, kM2 = State::kElement;
  static constexpr int kHParams =
      bit(kLr) | bit(kEps) | bit(kBeta1) | bit(kBeta2) | bit(kWeightDecay);
  DLRM_HOST_DEVICE static float row_state(const Hyper&, float s, float) { return s; }
  DLRM_HOST_DEVICE static float row_coef(const Hyper& h, float) { return h.step_size; }
  DLRM_HOST_DEVICE static float apply(const Hyper& h, float, float g, float w, float* m1,
                                      float* m2) {
    *m1 += (g - *m1) * (1.f - h.beta1);
    *m2 += (g * g - *m2) * (1.f - h.beta2);
    return w - h.step_size * (*m1 / (sqrtf(*m2) + h.eps));
  }
};

// FBGEMM's partial row-wise Adam: the first moment per element, the second
// per row (mean(g*g)), lazy as Adam:
// m += (g - m)(1-b1); v += (mean(g*g) - v)(1-b2); w -= step_size * m / (sqrt(v) + eps)
struct RowwiseAdam {
  static constexpr Optimizer kId = kRowwiseAdam;
  static constexpr const char* kName = "rowwise_adam";
  static constexpr State kM1 = State::kElement, kM2 = State::kRow;
  static constexpr int kHParams =
      bit(kLr) | bit(kEps) | bit(kBeta1) | bit(kBeta2) | bit(kWeightDecay);
  DLRM_HOST_DEVICE static float row_state(const Hyper& h, float v, float mean_sq) {
    return v + (mean_sq - v) * (1.f - h.beta2);
  }
  DLRM_HOST_DEVICE static float row_coef(const Hyper& h, float v) {
    return h.step_size / (sqrtf(v) + h.eps);
  }
  DLRM_HOST_DEVICE static float apply(const Hyper& h, float coef, float g, float w, float* m1,
                                      float*) {
    *m1 += (g - *m1) * (1.f - h.beta1);
    return w - coef * *m1;
  }
};

// Calls f(Rule{}) for the optimizer's rule; f(Sgd{}) for an unknown id (the
// checks refuse those first). Host code: device kernels take the rule as a
// template argument.
template <typename F>
inline decltype(auto) with_rule(int64_t optimizer, F&& f) {
  switch (optimizer) {
    case kAdagrad:
      return f(Adagrad{});
    case kRowwiseAdagrad:
      return f(RowwiseAdagrad{});
    case kAdam:
      return f(Adam{});
    case kRowwiseAdam:
      return f(RowwiseAdam{});
    default:
      return f(Sgd{});
  }
}

constexpr int64_t kFirstOptimizer = kSGD, kLastOptimizer = kRowwiseAdam;

// Where an optimizer keeps its state, at run time.
struct StateLayout {
  State m1, m2;
};

inline StateLayout state_layout(int64_t optimizer) {
  return with_rule(optimizer,
                   [](auto r) { return StateLayout{decltype(r)::kM1, decltype(r)::kM2}; });
}

// Elements of a state tensor of layout s for `numel` weights in `rows` rows.
inline int64_t state_numel(State s, int64_t numel, int64_t rows) {
  return s == State::kElement ? numel : s == State::kRow ? rows : 0;
}

}  // namespace dlrm_ops
