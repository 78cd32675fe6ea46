// Interface between the table-batched embedding-bag ops (embedding_bag.cpp)
// and their per-instruction-set kernels (embedding_bag_kernel.cpp).
#pragma once

#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>

#include "cpu/dispatch.h"
#include "kernel_common.h"
#include "optimizers.h"

namespace dlrm_ops::cpu {

using torch::headeronly::ScalarType;

// All float tensors (weights, output, grad_output, grad_weight, values) share
// the weight dtype `dtype`; accumulation is fp32.
struct EmbeddingBagArgs {
  TableBatch tb;
  HostLookups lk;
  ScalarType dtype;
  const void* weights;
};

// Pooled forward into out [B, dim_offsets[T]]. Returns the position of the
// first index out of range for its table, or -1.
using ForwardFn = int64_t (*)(const EmbeddingBagArgs&, void* out);
// Dense weight gradient into zero-filled grad_weight (same layout as weights).
// Deterministic: duplicate rows are summed in lookup order.
using BackwardDenseFn = int64_t (*)(const EmbeddingBagArgs&, const void* grad_out,
                                    void* grad_weight);
// One gradient row per lookup, table t's rows starting at element
// value_offsets[t] of values (the values of a sparse COO gradient). Returns
// the position of the first index out of range for its table, or -1.
using BackwardSparseFn = int64_t (*)(const EmbeddingBagArgs&, const void* grad_out,
                                     const int64_t* value_offsets, void* values);
// d loss / d per_sample_weights[i] = <grad_out[bag(i)], weights[row(i)]>;
// returns as BackwardSparseFn.
using PerSampleWeightsGradFn = int64_t (*)(const EmbeddingBagArgs&, const void* grad_out,
                                           float* grad_psw);

// The optimizer fused into the backward: every touched row gets its summed
// gradient and the rule of `optimizer` (csrc/optimizers.h), in place.
struct UpdateArgs {
  EmbeddingBagArgs eb;
  const void* grad_out;
  void* weights;
  float* momentum1;
  float* momentum2;
  const int64_t* row_offsets;  // [T] first state row of table t
  int64_t optimizer;
  Hyper h;
  int64_t step;              // after this update's increment (rounding seed)
  bool stochastic_rounding;  // fp16/bf16 weights
};
// Returns the first out-of-range index position, or -1 (then nothing was written).
using UpdateFn = int64_t (*)(const UpdateArgs&);

// Validation's pass over every bag's offsets (int64 or int32, n of them):
// kOrdered if they never decrease, kOnePerBag if each bag holds one lookup.
enum OffsetsScan : int { kOrdered = 1, kOnePerBag = 2 };
using ScanOffsetsFn = int (*)(const void* offsets, bool int64, int64_t n);

extern DispatchStub<ScanOffsetsFn> scan_offsets_stub;
extern DispatchStub<ForwardFn> embedding_bag_forward_stub;
// The forward of a training step with a fused optimizer (same return, same
// values; a one-lookup bag gathered in row order is its row copied, so a -0
// stays -0 where the bag-order sum gives +0): where it pays it sorts the
// lookups by row, gathers in that order, and holds the sorted lookups for
// this thread's next update: a thread-local hand-off (cpu/sorted_lookups.h,
// keep_forward_sorted / take_forward_sorted) that the update takes only for
// the same indices and offsets, and otherwise sorts again.
extern DispatchStub<ForwardFn> embedding_bag_train_forward_stub;
extern DispatchStub<UpdateFn> embedding_bag_update_stub;
extern DispatchStub<BackwardDenseFn> embedding_bag_backward_dense_stub;
extern DispatchStub<BackwardSparseFn> embedding_bag_backward_sparse_stub;
extern DispatchStub<PerSampleWeightsGradFn> embedding_bag_psw_grad_stub;

}  // namespace dlrm_ops::cpu
