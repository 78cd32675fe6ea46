// Interface between the table-batched embedding-bag ops (embedding_bag.cpp)
// and their per-instruction-set kernels (embedding_bag_kernel.cpp).
#pragma once

#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>

#include "cpu/dispatch.h"

namespace dlrm_ops::cpu {

using torch::headeronly::ScalarType;

enum Pooling : int64_t { kSum = 0, kMean = 1 };

// T tables in one flat buffer, FBGEMM's table-batched layout. Table t holds
// rows[t] rows of D_t = dim_offsets[t+1] - dim_offsets[t] elements starting at
// element weights_offsets[t]; its pooled vectors fill output columns
// [dim_offsets[t], dim_offsets[t+1]).
struct TableBatch {
  int64_t T;
  int64_t B;
  const int64_t* weights_offsets;
  const int64_t* dim_offsets;
  const int64_t* rows;
};

// Bag b of table t is indices[offsets[t*B+b] : offsets[t*B+b+1]]; offsets
// were validated (start 0, non-decreasing, end numel(indices)).
struct Lookups {
  const void* indices;
  const void* offsets;
  bool int64;                       // dtype of indices and offsets
  const float* per_sample_weights;  // [N] or nullptr
  int64_t pooling;
};

// All float tensors (weights, output, grad_output, grad_weight, values) share
// the weight dtype `dtype`; accumulation is fp32.
struct EmbeddingBagArgs {
  TableBatch tb;
  Lookups lk;
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
// value_offsets[t] of values (the values of a sparse COO gradient).
using BackwardSparseFn = void (*)(const EmbeddingBagArgs&, const void* grad_out,
                                  const int64_t* value_offsets, void* values);
// d loss / d per_sample_weights[i] = <grad_out[bag(i)], weights[row(i)]>.
using PerSampleWeightsGradFn = void (*)(const EmbeddingBagArgs&, const void* grad_out,
                                        float* grad_psw);

extern DispatchStub<ForwardFn> embedding_bag_forward_stub;
extern DispatchStub<BackwardDenseFn> embedding_bag_backward_dense_stub;
extern DispatchStub<BackwardSparseFn> embedding_bag_backward_sparse_stub;
extern DispatchStub<PerSampleWeightsGradFn> embedding_bag_psw_grad_stub;

}  // namespace dlrm_ops::cpu
