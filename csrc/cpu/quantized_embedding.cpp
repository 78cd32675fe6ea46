// CPU ops of the row-wise quantized embeddings: quantize, dequantize and the
// table-batched pooled lookup over packed rows (quantized_embedding_kernel.cpp).
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <optional>
#include <vector>

#include "common.h"
#include "cpu/quantized_embedding_kernel.h"

namespace dlrm_ops {
namespace {

void check_bits(int64_t bits) {
  DLRM_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4, got ", bits);
}

ScalarType float_dtype(const std::optional<ScalarType>& dtype, const char* name) {
  const ScalarType t = dtype.value_or(ScalarType::Float);
  DLRM_CHECK(t == ScalarType::Float || t == ScalarType::Half || t == ScalarType::BFloat16, name,
             " must be float32, float16 or bfloat16, got ", dtype_name(t));
  return t;
}

Tensor quantize_rowwise(Tensor weight, int64_t bits) {
  check_bits(bits);
  check_cpu(weight, "weight");
  check_dtype(weight, "weight", {ScalarType::Float, ScalarType::Half, ScalarType::BFloat16});
  check_dim(weight, "weight", 2);
  const int64_t R = weight.size(0), D = weight.size(1);
  DLRM_CHECK(D >= 1, "weight must have at least one column");
  DLRM_CHECK(bits == 8 || D % 2 == 0, "4-bit rows need an even dim, got ", D);
  Tensor w = torch::stable::contiguous(weight);
  Tensor packed = torch::stable::new_empty(w, {R, cpu::packed_row_bytes(D, bits)}, ScalarType::Byte);
  cpu::quantize_stub(w.const_data_ptr(), w.scalar_type(), R, D, bits,
                     packed.mutable_data_ptr<uint8_t>());
  return packed;
}

int64_t dim_of_packed(const Tensor& packed, int64_t bits) {
  const int64_t bytes = packed.size(1);
  const int64_t D = bits == 8 ? bytes - 8 : (bytes - 4) * 2;
  DLRM_CHECK(D >= 1, "packed rows of ", bytes, " bytes hold no ", bits, "-bit values");
  return D;
}

Tensor dequantize_rowwise(Tensor packed, int64_t bits, std::optional<ScalarType> dtype) {
  check_bits(bits);
  check_cpu(packed, "packed");
  check_dtype(packed, "packed", {ScalarType::Byte});
  check_dim(packed, "packed", 2);
  const ScalarType out_t = float_dtype(dtype, "dtype");
  const int64_t R = packed.size(0), D = dim_of_packed(packed, bits);
  Tensor p = torch::stable::contiguous(packed);
  Tensor out = torch::stable::new_empty(p, {R, D}, out_t);
  cpu::dequantize_stub(p.const_data_ptr<uint8_t>(), R, D, bits, out.mutable_data_ptr(), out_t);
  return out;
}

template <typename I>
void check_offsets(const I* off, int64_t T, int64_t B, int64_t N) {
  DLRM_CHECK(off[0] == 0, "offsets[0] must be 0, got ", static_cast<int64_t>(off[0]));
  for (int64_t i = 1; i <= T * B; ++i) {
    DLRM_CHECK(off[i] >= off[i - 1], "offsets must be non-decreasing, but offsets[", i, "] = ",
               static_cast<int64_t>(off[i]), " < offsets[", i - 1, "] = ",
               static_cast<int64_t>(off[i - 1]), " (table ", (i - 1) / B, ", bag ", (i - 1) % B,
               ")");
  }
  DLRM_CHECK(off[T * B] == N, "offsets[-1] must equal the number of indices (", N, "), got ",
             static_cast<int64_t>(off[T * B]));
}

Tensor quantized_embedding_bag_forward(Tensor packed, Tensor weights_offsets, Tensor dim_offsets,
                                       Tensor rows, Tensor indices, Tensor offsets,
                                       int64_t pooling, std::optional<Tensor> per_sample_weights,
                                       int64_t total_dim, int64_t bits,
                                       std::optional<ScalarType> output_dtype) {
  check_bits(bits);
  check_cpu(packed, "packed");
  check_dtype(packed, "packed", {ScalarType::Byte});
  check_contiguous(packed, "packed");
  const ScalarType out_t = float_dtype(output_dtype, "output_dtype");
  for (auto [t, name] : {std::pair{&weights_offsets, "weights_offsets"},
                         std::pair{&dim_offsets, "dim_offsets"}, std::pair{&rows, "rows"}}) {
    check_cpu(*t, name);
    check_dtype(*t, name, {ScalarType::Long});
    check_dim(*t, name, 1);
    check_contiguous(*t, name);
  }
  const int64_t T = rows.numel();
  DLRM_CHECK(T >= 1, "rows must list at least one table");
  DLRM_CHECK(weights_offsets.numel() == T && dim_offsets.numel() == T + 1,
             "weights_offsets and dim_offsets must have T and T+1 entries for T = ", T);
  const int64_t* woff = weights_offsets.const_data_ptr<int64_t>();
  const int64_t* doff = dim_offsets.const_data_ptr<int64_t>();
  const int64_t* nrows = rows.const_data_ptr<int64_t>();
  DLRM_CHECK(doff[0] == 0 && doff[T] == total_dim, "dim_offsets must run from 0 to total_dim = ",
             total_dim);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t D = doff[t + 1] - doff[t];
    DLRM_CHECK(D >= 1 && (bits == 8 || D % 2 == 0), "table ", t, " has dim ", D,
               bits == 8 ? "; dims must be >= 1" : "; 4-bit dims must be even and >= 1");
    DLRM_CHECK(nrows[t] >= 0 && woff[t] >= 0 &&
                   woff[t] + nrows[t] * cpu::packed_row_bytes(D, bits) <= packed.numel(),
               "table ", t, " (", nrows[t], " packed rows of dim ", D, " at byte ", woff[t],
               ") does not fit in packed of ", packed.numel(), " bytes");
  }
  check_cpu(indices, "indices");
  check_cpu(offsets, "offsets");
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
  const int64_t B = (offsets.numel() - 1) / T, N = indices.numel();
  const bool int64 = indices.scalar_type() == ScalarType::Long;
  if (int64) check_offsets(offsets.const_data_ptr<int64_t>(), T, B, N);
  else check_offsets(offsets.const_data_ptr<int32_t>(), T, B, N);
  DLRM_CHECK(pooling == cpu::kSum || pooling == cpu::kMean,
             "pooling must be 0 (sum) or 1 (mean), got ", pooling);
  Tensor psw;
  if (per_sample_weights.has_value()) {
    DLRM_CHECK(pooling == cpu::kSum, "per_sample_weights is only supported with sum pooling");
    check_cpu(*per_sample_weights, "per_sample_weights");
    check_dtype(*per_sample_weights, "per_sample_weights",
                {ScalarType::Float, ScalarType::Half, ScalarType::BFloat16});
    DLRM_CHECK(per_sample_weights->dim() == 1 && per_sample_weights->numel() == N,
               "per_sample_weights must have one entry per index (", N, "), got ",
               per_sample_weights->numel());
    psw = torch::stable::contiguous(torch::stable::to(*per_sample_weights, ScalarType::Float));
  }
  cpu::QuantizedBagArgs args{
      cpu::TableBatch{T, B, woff, doff, nrows},
      cpu::Lookups{indices.const_data_ptr(), offsets.const_data_ptr(), int64,
                   psw.defined() ? psw.const_data_ptr<float>() : nullptr, pooling},
      packed.const_data_ptr<uint8_t>(), bits, out_t};
  Tensor out = torch::stable::new_empty(packed, {B, total_dim}, out_t);
  const int64_t bad = cpu::quantized_forward_stub(args, out.mutable_data_ptr());
  if (bad >= 0) {
    auto read = [&](const Tensor& x, int64_t i) {
      return int64 ? x.const_data_ptr<int64_t>()[i]
                   : static_cast<int64_t>(x.const_data_ptr<int32_t>()[i]);
    };
    int64_t lo = 0, hi = T * B - 1;  // the bag holding position `bad`
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (read(offsets, mid) <= bad) lo = mid; else hi = mid - 1;
    }
    const int64_t t = lo / B;
    DLRM_CHECK(false, "indices[", bad, "] = ", read(indices, bad), " is out of range for table ",
               t, " with ", nrows[t], " rows (bag ", lo % B, " of table ", t, ")");
  }
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(dlrm_ops, CPU, m) {
  m.impl("quantize_rowwise", TORCH_BOX(&quantize_rowwise));
  m.impl("dequantize_rowwise", TORCH_BOX(&dequantize_rowwise));
  m.impl("quantized_embedding_bag_forward", TORCH_BOX(&quantized_embedding_bag_forward));
}

}  // namespace dlrm_ops

namespace dlrm_ops::cpu {
DispatchStub<QuantizeFn> quantize_stub;
DispatchStub<DequantizeFn> dequantize_stub;
DispatchStub<QuantizedForwardFn> quantized_forward_stub;
}  // namespace dlrm_ops::cpu
