#include "data/batch.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "data/criteo_parser.h"

namespace dlrm_ops::data {
namespace {

template <typename T>
void gather_sparse(const T* sparse, int64_t local, const std::vector<int64_t>& columns,
                   int64_t modulo, int64_t* out, int64_t stride) {
  const T* row = sparse + local * kSparse;
  for (size_t t = 0; t < columns.size(); ++t) {
    int64_t v = static_cast<int64_t>(row[columns[t]]);
    if (modulo > 0) v = ((v % modulo) + modulo) % modulo;
    out[static_cast<int64_t>(t) * stride] = v;
  }
}

}  // namespace

void gather_rows(const std::vector<DayArrays>& parts, const int64_t* starts, const int64_t* lows,
                 const int64_t* rows, int64_t n, const std::vector<int64_t>& columns,
                 int64_t modulo, float* dense, int64_t* indices, float* labels) {
  const auto P = static_cast<int64_t>(parts.size());
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = rows[i];
    if (r < 0 || r >= starts[P])
      throw std::out_of_range("row " + std::to_string(r) + " is outside the split's " +
                              std::to_string(starts[P]) + " rows");
    const int64_t p = std::upper_bound(starts, starts + P + 1, r) - starts - 1;
    const DayArrays& a = parts[p];
    const int64_t local = r - starts[p] + lows[p];
    if (local >= a.rows) throw std::out_of_range("a part's arrays are shorter than its rows");
    if (dense) std::memcpy(dense + i * kDense, a.dense + local * kDense, kDense * sizeof(float));
    if (labels)
      labels[i] = a.labels32 ? static_cast<float>(static_cast<const int32_t*>(a.labels)[local])
                             : static_cast<const float*>(a.labels)[local];
    if (indices && !columns.empty()) {
      if (a.sparse32)
        gather_sparse(static_cast<const int32_t*>(a.sparse), local, columns, modulo, indices + i,
                      n);
      else
        gather_sparse(static_cast<const int64_t*>(a.sparse), local, columns, modulo, indices + i,
                      n);
    }
  }
}

}  // namespace dlrm_ops::data
