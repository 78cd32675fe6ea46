// Training batches cut from the per-day memory-mapped arrays, natively: rows
// gathered in batch order into the kernels' layout (dense [B x 13], labels
// [B], categories table-major: indices[t * B + i] is table t of row i).
#pragma once

#include <cstdint>
#include <vector>

namespace dlrm_ops::data {

// One day's arrays (or the part of them a split reads).
struct DayArrays {
  const float* dense;  // [rows x 13]
  const void* sparse;  // [rows x 26], int64 or (sparse32) int32
  const void* labels;  // [rows], float32 or (labels32) int32
  bool sparse32 = false;
  bool labels32 = false;
  int64_t rows = 0;
};

// rows[i] is a global row number: part p holds rows [starts[p], starts[p+1])
// at its own rows from lows[p]. Fills dense and labels where not null, and
// indices for the sparse `columns` (each taken modulo `modulo`, floor, where
// it is positive). A row outside the parts throws std::out_of_range.
void gather_rows(const std::vector<DayArrays>& parts, const int64_t* starts, const int64_t* lows,
                 const int64_t* rows, int64_t n, const std::vector<int64_t>& columns,
                 int64_t modulo, float* dense, int64_t* indices, float* labels);

}  // namespace dlrm_ops::data
