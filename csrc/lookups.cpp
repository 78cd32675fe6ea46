#include "lookups.h"

#include "cpu/embedding_bag_kernel.h"

#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

namespace dlrm_ops {
namespace {

int64_t read_index(const HostLookups& lk, const void* data, int64_t i) {
  return lk.int64 ? static_cast<const int64_t*>(data)[i]
                  : static_cast<int64_t>(static_cast<const int32_t*>(data)[i]);
}

// Checks the offsets; returns whether every bag holds one lookup.
template <typename I>
bool check_offsets(const I* off, int64_t T, int64_t B, int64_t N) {
  DLRM_CHECK(off[0] == 0, "offsets[0] must be 0, got ", off[0]);
  // A vectorised pass checks the order; the search for the first bad pair
  // runs only when there is one. A check per pair here cost 2.7% of a fused
  // row-wise Adagrad step at one lookup per bag (it runs in the forward and
  // again in the backward).
  const int scan = cpu::scan_offsets_stub(off, std::is_same_v<I, int64_t>, T * B + 1);
  const bool ordered = scan & cpu::kOrdered;
  for (int64_t i = 1; !ordered && i <= T * B; ++i) {
    DLRM_CHECK(off[i] >= off[i - 1], "offsets must be non-decreasing, but offsets[", i,
               "] = ", off[i], " < offsets[", i - 1, "] = ", off[i - 1], " (table ", (i - 1) / B,
               ", bag ", (i - 1) % B, ")");
  }
  DLRM_CHECK(off[T * B] == N, "offsets[-1] must equal the number of indices (", N, "), got ",
             off[T * B]);
  // Each table's lookups are addressed by a 32-bit position (sorted_lookups.h).
  for (int64_t t = 0; t < T; ++t) {
    DLRM_CHECK(static_cast<int64_t>(off[(t + 1) * B]) - off[t * B] < (int64_t{1} << 32), "table ",
               t, " has more than 2^32 indices in one call");
  }
  return scan & cpu::kOnePerBag;
}

}  // namespace

int64_t offset_at(const HostLookups& lk, int64_t i) { return read_index(lk, lk.offsets, i); }

LookupShape check_lookup_args(const Tensor& ref, const char* ref_name,
                              const Tensor& weights_offsets, const Tensor& dim_offsets,
                              const Tensor& rows, const Tensor& indices, const Tensor& offsets,
                              int64_t pooling, const std::optional<Tensor>& per_sample_weights) {
  for (auto [t, name] : {std::pair{&weights_offsets, "weights_offsets"},
                         std::pair{&dim_offsets, "dim_offsets"}, std::pair{&rows, "rows"}}) {
    check_same_device(*t, name, ref, ref_name);
    check_dtype(*t, name, {ScalarType::Long});
    check_dim(*t, name, 1);
    check_contiguous(*t, name);
  }
  const int64_t T = rows.numel();
  DLRM_CHECK(T >= 1, "rows must list at least one table");
  DLRM_CHECK(weights_offsets.numel() == T, "weights_offsets must have one entry per table (", T,
             "), got ", weights_offsets.numel());
  DLRM_CHECK(dim_offsets.numel() == T + 1, "dim_offsets must have T+1 = ", T + 1, " entries, got ",
             dim_offsets.numel());
  check_same_device(indices, "indices", ref, ref_name);
  check_same_device(offsets, "offsets", ref, ref_name);
  check_dtype(indices, "indices", {ScalarType::Int, ScalarType::Long});
  DLRM_CHECK(offsets.scalar_type() == indices.scalar_type(),
             "offsets must have the dtype of indices (", dtype_name(indices.scalar_type()),
             "), got ", dtype_name(offsets.scalar_type()));
  check_dim(indices, "indices", 1);
  check_dim(offsets, "offsets", 1);
  check_contiguous(indices, "indices");
  check_contiguous(offsets, "offsets");
  DLRM_CHECK(offsets.numel() >= 1 && (offsets.numel() - 1) % T == 0,
             "offsets must have T*B+1 entries for T = ", T, " tables, got ", offsets.numel());
  const int64_t B = (offsets.numel() - 1) / T;
  DLRM_CHECK(B < (int64_t{1} << 31), "batch size must be < 2^31, got ", B);
  DLRM_CHECK(pooling == kSum || pooling == kMean, "pooling must be 0 (sum) or 1 (mean), got ",
             pooling);
  if (per_sample_weights.has_value()) {
    const Tensor& psw = *per_sample_weights;
    DLRM_CHECK(pooling == kSum, "per_sample_weights is only supported with sum pooling");
    check_same_device(psw, "per_sample_weights", ref, ref_name);
    check_dtype(psw, "per_sample_weights",
                {ScalarType::Float, ScalarType::Half, ScalarType::BFloat16});
    check_dim(psw, "per_sample_weights", 1);
    DLRM_CHECK(psw.numel() == indices.numel(), "per_sample_weights must have one entry per index (",
               indices.numel(), "), got ", psw.numel());
  }
  return LookupShape{T, B, indices.numel()};
}

Tensor per_sample_weights_f32(const Tensor& psw) {
  return torch::stable::contiguous(
      psw.scalar_type() == ScalarType::Float ? psw : torch::stable::to(psw, ScalarType::Float));
}

ValidatedLookups validate_lookups(const Tensor& ref, const char* ref_name,
                                  const Tensor& weights_offsets, const Tensor& dim_offsets,
                                  const Tensor& rows, const Tensor& indices, const Tensor& offsets,
                                  int64_t pooling,
                                  const std::optional<Tensor>& per_sample_weights) {
  check_cpu(ref, ref_name);
  const LookupShape shape = check_lookup_args(ref, ref_name, weights_offsets, dim_offsets, rows,
                                              indices, offsets, pooling, per_sample_weights);
  const int64_t T = shape.T, B = shape.B;
  const int64_t* woff = weights_offsets.const_data_ptr<int64_t>();
  const int64_t* doff = dim_offsets.const_data_ptr<int64_t>();
  const int64_t* nrows = rows.const_data_ptr<int64_t>();
  DLRM_CHECK(doff[0] == 0, "dim_offsets[0] must be 0, got ", doff[0]);
  for (int64_t t = 0; t < T; ++t) {
    // Compared before subtracting: with doff[0] = 0 and every step positive,
    // no difference overflows.
    DLRM_CHECK(doff[t + 1] > doff[t], "table ", t, " must have dim >= 1, but dim_offsets[", t + 1,
               "] = ", doff[t + 1], " <= dim_offsets[", t, "] = ", doff[t]);
    DLRM_CHECK(nrows[t] >= 0 && nrows[t] < (int64_t{1} << 32), "table ", t,
               " must have 0 <= rows < 2^32, got ", nrows[t]);
    DLRM_CHECK(woff[t] >= 0, "weights_offsets[", t, "] must be >= 0, got ", woff[t]);
  }
  ValidatedLookups v;
  v.N = shape.N;
  v.lk = HostLookups{indices.const_data_ptr(), offsets.const_data_ptr(),
                     indices.scalar_type() == ScalarType::Long, nullptr, pooling};
  v.lk.one_per_bag = v.lk.int64
                         ? check_offsets(static_cast<const int64_t*>(v.lk.offsets), T, B, v.N)
                         : check_offsets(static_cast<const int32_t*>(v.lk.offsets), T, B, v.N);
  if (per_sample_weights.has_value()) {
    v.psw_f32 = per_sample_weights_f32(*per_sample_weights);
    v.lk.per_sample_weights = v.psw_f32.const_data_ptr<float>();
  }
  v.tb = TableBatch{T, B, woff, doff, nrows};
  return v;
}

void check_tables_fit(const TableBatch& tb, int64_t size, int64_t bits, const char* name) {
  for (int64_t t = 0; t < tb.T; ++t) {
    const int64_t D = tb.dim_offsets[t + 1] - tb.dim_offsets[t];
    DLRM_CHECK(bits != 4 || D % 2 == 0, "table ", t, " has dim ", D, "; 4-bit dims must be even");
    // A row wider than the buffer never fits (and its packed size could overflow).
    const int64_t row = D > size ? size + 1 : row_size(D, bits);
    DLRM_CHECK(span_fits(tb.weights_offsets[t], tb.rows[t], row, size), "table ", t, " (",
               tb.rows[t], " rows of dim ", D, " at ", bits ? "byte " : "element ",
               tb.weights_offsets[t], ") does not fit in ", name, " of ", size,
               bits ? " bytes" : " elements");
  }
}

void check_tables_disjoint(const TableBatch& tb, const char* name) {
  // Spans [start, end) of the tables that have rows, by start (tables fit).
  std::vector<std::array<int64_t, 3>> spans;
  for (int64_t t = 0; t < tb.T; ++t) {
    if (tb.rows[t] == 0) continue;
    const int64_t start = tb.weights_offsets[t];
    spans.push_back({start, start + tb.rows[t] * (tb.dim_offsets[t + 1] - tb.dim_offsets[t]), t});
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i) {
    DLRM_CHECK(spans[i][0] >= spans[i - 1][1], "tables ", spans[i - 1][2], " and ", spans[i][2],
               " share elements of ", name, " (weights_offsets ", spans[i - 1][0], " and ",
               spans[i][0], "): the dense gradient and the fused optimizer need disjoint tables");
  }
}

void throw_bad_index(const ValidatedLookups& v, int64_t pos) {
  const auto& tb = v.tb;
  int64_t lo = 0, hi = tb.T * tb.B - 1;  // the last bag starting at or before pos
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (offset_at(v.lk, mid) <= pos)
      lo = mid;
    else
      hi = mid - 1;
  }
  const int64_t t = lo / tb.B;
  DLRM_CHECK(false, "indices[", pos, "] = ", read_index(v.lk, v.lk.indices, pos),
             " is out of range for table ", t, " with ", tb.rows[t], " rows (bag ", lo % tb.B,
             " of table ", t, ")");
  __builtin_unreachable();
}

}  // namespace dlrm_ops
