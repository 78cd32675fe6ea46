// Validation shared by the ops that pool lookups over a table batch (fp32 and
// quantized): table metadata, indices/offsets, per-sample weights, and the
// error naming an out-of-range index.
#pragma once

#include <optional>

#include "common.h"

namespace dlrm_ops {

struct ValidatedLookups {
  TableBatch tb;
  HostLookups lk;
  int64_t N;       // number of indices
  Tensor psw_f32;  // per_sample_weights as contiguous fp32, kept alive for lk
};

struct LookupShape {
  int64_t T, B, N;  // tables, batch size, indices
};

// Dtypes, shapes and devices (all on ref's) of weights_offsets [T],
// dim_offsets [T+1], rows [T] (int64), indices/offsets (int32 or int64, T*B+1
// offsets), pooling and per_sample_weights. Reads no tensor data.
LookupShape check_lookup_args(const Tensor& ref, const char* ref_name,
                              const Tensor& weights_offsets, const Tensor& dim_offsets,
                              const Tensor& rows, const Tensor& indices, const Tensor& offsets,
                              int64_t pooling, const std::optional<Tensor>& per_sample_weights);

// check_lookup_args on CPU tensors, then their data: dims >= 1, 0 <= rows <
// 2^32, weights_offsets >= 0, offsets (offsets[0] == 0, non-decreasing,
// ending at numel(indices)). Whether each table fits its buffer is
// check_tables_fit; index ranges are checked by the kernels.
ValidatedLookups validate_lookups(const Tensor& ref, const char* ref_name,
                                  const Tensor& weights_offsets, const Tensor& dim_offsets,
                                  const Tensor& rows, const Tensor& indices, const Tensor& offsets,
                                  int64_t pooling, const std::optional<Tensor>& per_sample_weights);

// The `check` argument of the lookup ops (kernel_common.h's Check). The CPU
// raises at the call in every mode.
inline void check_mode(int64_t check) {
  DLRM_CHECK(check >= kDeferred && check <= kOff,
             "check must be 0 (deferred), 1 (immediate), 2 (warn) or 3 (off), got ", check);
}

// Elements (bits == 0) or packed bytes (bits 8 or 4) of one row of dim D.
inline int64_t row_size(int64_t D, int64_t bits) {
  return bits == 0 ? D : packed_row_bytes(D, bits);
}

// Each table's rows fit in a buffer of `size` units of row_size; 4-bit dims are even.
void check_tables_fit(const TableBatch& tb, int64_t size, int64_t bits, const char* name);

// No two tables with rows share an element of the buffer (fitting tables of
// elements): the dense gradient and the fused update write each table's rows
// on their own, so shared rows would lose a table's part.
void check_tables_disjoint(const TableBatch& tb, const char* name);

// per_sample_weights as contiguous fp32 (the kernels' accumulation type).
Tensor per_sample_weights_f32(const Tensor& psw);

// offsets[i] of validated lookups, whatever their index dtype.
int64_t offset_at(const HostLookups& lk, int64_t i);

// Throws: "indices[pos] = v is out of range for table t with n rows (bag b of table t)".
[[noreturn]] void throw_bad_index(const ValidatedLookups& v, int64_t pos);

}  // namespace dlrm_ops
