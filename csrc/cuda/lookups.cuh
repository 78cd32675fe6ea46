// Validation of table-batched lookups on the GPU, shared by the fp32 and the
// quantized embedding bags. One kernel checks the table metadata, the offsets
// and every index into a per-call status; the kernels that follow read it and
// skip what is bad, so no mode reads or writes outside a table. Where the
// host must know (Check::kImmediate, or an output sized by the data) it waits
// for the status and raises the CPU op's error; otherwise the first error is
// recorded on the device for dlrm_ops.check_errors() (take_lookup_error) and
// the call never synchronises, so it can be captured in a CUDA graph.
#pragma once

#include <optional>

#include "common.h"

namespace dlrm_ops::cuda {

// Per-call status written by the validation: [0] ~(first bad table + 1)
// (~0: dim_offsets[0] or dim_offsets[-1]), [1] ~first bad bag (offsets),
// [2] ~first bad index position, [3] 1 if the row-wise optimizer state does
// not hold one element per row, [4] rows of all tables, [5] gradient values.
// An unset slot is 0.
constexpr int64_t kStatus = 6;

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
  const int64_t* status;         // [kStatus]
  const int64_t* row_offsets;    // [T] first row of table t among all tables' rows
  const int64_t* value_offsets;  // [T] first element of table t's sparse-gradient values
};

struct DeviceLookups {
  LookupView v;
  bool int64;            // dtype of indices and offsets
  int64_t total_values;  // sum over lookups of their table's dim; known only after a wait
  Tensor meta;           // owns status, row_offsets, value_offsets
  Tensor psw_f32;        // owns per_sample_weights
};

// What validate_lookups checks the lookups against.
struct LookupSpec {
  const Tensor& ref;  // the weight buffer, `size` elements or packed bytes (bits 8 and 4)
  const char* ref_name;
  int64_t size;
  int64_t bits;
  int64_t total_dim;         // dim_offsets[-1] must equal it
  bool grad_output = false;  // total_dim is grad_output's width (else an argument)
  bool disjoint = false;     // no two tables with rows share an element
  int64_t state_rows = -1;   // numel of the row-wise optimizer state, or -1
  int64_t state_arg = 0;     // which momentum (1 or 2) that state is
  int64_t check = 0;         // Check
  bool wait = false;         // the caller needs total_values: wait whatever the mode
};

template <typename I>
__device__ __forceinline__ int64_t offset_at(const LookupView& v, int64_t i) {
  return static_cast<const I*>(v.offsets)[i];
}
template <typename I>
__device__ __forceinline__ int64_t index_at(const LookupView& v, int64_t i) {
  return static_cast<const I*>(v.indices)[i];
}
// Whether the metadata or the offsets are bad: then the call reads no lookup.
__device__ __forceinline__ bool lookups_bad(const LookupView& v) {
  return (v.status[0] | v.status[1] | v.status[3]) != 0;
}
// Whether idx is a row of a table with n rows.
__device__ __forceinline__ bool row_in_range(int64_t idx, int64_t n) {
  return static_cast<uint64_t>(idx) < static_cast<uint64_t>(n);
}
// Weight of lookup l of a bag of `len` lookups: per-sample weight, 1/len for mean.
__device__ __forceinline__ float lookup_scale(const LookupView& v, int64_t l, int64_t len) {
  return v.per_sample_weights ? v.per_sample_weights[l] : pooling_scale(v.pooling, len);
}

// Checks the lookups against `spec` (cpu/lookups.h's checks: shapes and
// dtypes on the host, data on the device).
DeviceLookups validate_lookups(const LookupSpec& spec, const Tensor& weights_offsets,
                               const Tensor& dim_offsets, const Tensor& rows, const Tensor& indices,
                               const Tensor& offsets, int64_t pooling,
                               const std::optional<Tensor>& per_sample_weights);

}  // namespace dlrm_ops::cuda
