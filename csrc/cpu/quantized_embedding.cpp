// CPU ops of the row-wise quantized embeddings: quantize, dequantize and the
// table-batched pooled lookup over packed rows (quantized_embedding_kernel.cpp).
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <optional>
#include <vector>

#include "common.h"
#include "cpu/quantized_embedding_kernel.h"
#include "lookups.h"
#include "quantized_checks.h"

namespace dlrm_ops {
namespace {

Tensor quantize_rowwise(Tensor weight, int64_t bits) {
  check_cpu(weight, "weight");
  check_quantize_args(weight, bits);
  const int64_t R = weight.size(0), D = weight.size(1);
  Tensor w = torch::stable::contiguous(weight);
  Tensor packed = torch::stable::new_empty(w, {R, packed_row_bytes(D, bits)}, ScalarType::Byte);
  cpu::quantize_stub(w.const_data_ptr(), w.scalar_type(), R, D, bits,
                     packed.mutable_data_ptr<uint8_t>());
  return packed;
}

Tensor dequantize_rowwise(Tensor packed, int64_t bits, std::optional<ScalarType> dtype) {
  check_cpu(packed, "packed");
  check_packed_rows(packed, bits);
  const ScalarType out_t = float_dtype(dtype, "dtype");
  const int64_t R = packed.size(0), D = dim_of_packed(packed, bits);
  Tensor p = torch::stable::contiguous(packed);
  Tensor out = torch::stable::new_empty(p, {R, D}, out_t);
  cpu::dequantize_stub(p.const_data_ptr<uint8_t>(), R, D, bits, out.mutable_data_ptr(), out_t);
  return out;
}

Tensor quantized_embedding_bag_forward(Tensor packed, Tensor weights_offsets, Tensor dim_offsets,
                                       Tensor rows, Tensor indices, Tensor offsets, int64_t pooling,
                                       std::optional<Tensor> per_sample_weights, int64_t total_dim,
                                       int64_t bits, std::optional<ScalarType> output_dtype,
                                       int64_t check) {
  check_cpu(packed, "packed");
  check_mode(check);
  const ScalarType out_t = check_packed_tables(packed, bits, output_dtype);
  ValidatedLookups v = validate_lookups(packed, "packed", weights_offsets, dim_offsets, rows,
                                        indices, offsets, pooling, per_sample_weights);
  const auto& tb = v.tb;
  DLRM_CHECK(tb.dim_offsets[tb.T] == total_dim,
             "total_dim must equal dim_offsets[-1] = ", tb.dim_offsets[tb.T], ", got ", total_dim);
  check_tables_fit(tb, packed.numel(), bits, "packed");
  cpu::QuantizedBagArgs args{tb, v.lk, packed.const_data_ptr<uint8_t>(), bits, out_t};
  Tensor out = torch::stable::new_empty(packed, {tb.B, total_dim}, out_t);
  const int64_t bad = cpu::quantized_forward_stub(args, out.mutable_data_ptr());
  if (bad >= 0) throw_bad_index(v, bad);
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
