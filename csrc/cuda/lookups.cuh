// Validation of table-batched lookups on the GPU, shared by the fp32 and the
// quantized embedding bags. One kernel checks the table metadata, the offsets
// and every index; one small device-to-host copy reads its verdict. On a bad
// input the arguments are copied to the CPU and the CPU checks raise the same
// error as the CPU ops.
#pragma once

#include <optional>

#include "common.h"

namespace dlrm_ops::cuda {

// Device pointers of validated lookups (as TableBatch and HostLookups);
// trivially copyable, so kernels take it by value.
struct LookupView {
  int64_t T, B, N;
  const int64_t* weights_offsets;
  const int64_t* dim_offsets;
  const int64_t* rows;
  const void* indices;
  const void* offsets;
  const float* per_sample_weights;  // [N] or nullptr
  int64_t pooling;
  const int64_t* row_offsets;    // [T] first row of table t among all tables' rows
  const int64_t* value_offsets;  // [T] first element of table t's sparse-gradient values
};

struct DeviceLookups {
  LookupView v;
  bool int64;            // dtype of indices and offsets
  int64_t total_rows;    // sum(rows)
  int64_t total_values;  // sum over lookups of their table's dim
  int64_t max_dim;
  int64_t total_dim;  // dim_offsets[-1]
  Tensor meta;        // owns row_offsets, value_offsets
  Tensor psw_f32;     // owns per_sample_weights
};

template <typename I>
__device__ __forceinline__ int64_t offset_at(const LookupView& v, int64_t i) {
  return static_cast<const I*>(v.offsets)[i];
}
template <typename I>
__device__ __forceinline__ int64_t index_at(const LookupView& v, int64_t i) {
  return static_cast<const I*>(v.indices)[i];
}
// Weight of lookup l of a bag of `len` lookups: per-sample weight, 1/len for mean.
__device__ __forceinline__ float lookup_scale(const LookupView& v, int64_t l, int64_t len) {
  return v.per_sample_weights ? v.per_sample_weights[l] : pooling_scale(v.pooling, len);
}

// `ref` is the weight buffer (`ref_size` elements, or packed bytes for
// bits 8 and 4); every table must fit in it, and dim_offsets[-1] must be
// total_dim unless that is -1; with `disjoint`, no two tables with rows may
// share an element (cpu/lookups.h, check_tables_disjoint).
DeviceLookups validate_lookups(const Tensor& ref, const char* ref_name, int64_t ref_size,
                               int64_t bits, int64_t total_dim, bool disjoint,
                               const Tensor& weights_offsets, const Tensor& dim_offsets,
                               const Tensor& rows, const Tensor& indices, const Tensor& offsets,
                               int64_t pooling, const std::optional<Tensor>& per_sample_weights);

}  // namespace dlrm_ops::cuda
