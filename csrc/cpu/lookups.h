// Validation shared by the ops that pool lookups over a table batch (fp32 and
// quantized): table metadata, indices/offsets, per-sample weights, and the
// error naming an out-of-range index.
#pragma once

#include <optional>

#include "common.h"
#include "cpu/embedding_bag_kernel.h"

namespace dlrm_ops {

struct ValidatedLookups {
  cpu::TableBatch tb;
  cpu::Lookups lk;
  int64_t N;       // number of indices
  Tensor psw_f32;  // per_sample_weights as contiguous fp32, kept alive for lk
};

// Checks weights_offsets [T], dim_offsets [T+1] (dims >= 1), rows [T] (int64,
// CPU), indices/offsets (offsets[0] == 0, non-decreasing, ending at
// numel(indices), T*B+1 entries), pooling and per_sample_weights. Whether each
// table fits its buffer is left to the caller, whose units differ.
ValidatedLookups validate_lookups(const Tensor& weights_offsets, const Tensor& dim_offsets,
                                  const Tensor& rows, const Tensor& indices,
                                  const Tensor& offsets, int64_t pooling,
                                  const std::optional<Tensor>& per_sample_weights);

// offsets[i] of validated lookups, whatever their index dtype.
int64_t offset_at(const cpu::Lookups& lk, int64_t i);

// Throws: "indices[pos] = v is out of range for table t with n rows (bag b of table t)".
[[noreturn]] void throw_bad_index(const ValidatedLookups& v, int64_t pos);

}  // namespace dlrm_ops
