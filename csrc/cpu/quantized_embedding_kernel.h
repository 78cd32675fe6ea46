// Interface between the row-wise quantized embedding ops
// (quantized_embedding.cpp) and their per-ISA kernels.
//
// Row layouts, those of torch.ops.quantized.embedding_bag_{byte,4bit}_prepack:
//   8-bit: [D x uint8][fp32 scale][fp32 bias]                 D + 8 bytes
//   4-bit: [D/2 bytes, even column in the low nibble][fp16 scale][fp16 bias]
// and value = scale * q + bias.
#pragma once

#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>

#include "cpu/dispatch.h"
#include "cpu/embedding_bag_kernel.h"

namespace dlrm_ops::cpu {

// weight [R, D] (dtype) -> packed [R, packed_row_bytes(D, bits)].
using QuantizeFn = void (*)(const void* weight, ScalarType dtype, int64_t R, int64_t D,
                            int64_t bits, uint8_t* packed);
// packed -> out [R, D] (dtype).
using DequantizeFn = void (*)(const uint8_t* packed, int64_t R, int64_t D, int64_t bits, void* out,
                              ScalarType dtype);
// Pooled lookup over packed tables: TableBatch.weights_offsets are byte
// offsets into `packed`; output [B, total_D] in out_dtype. Returns the first
// out-of-range index position or -1.
struct QuantizedBagArgs {
  TableBatch tb;
  HostLookups lk;
  const uint8_t* packed;
  int64_t bits;
  ScalarType out_dtype;
};
using QuantizedForwardFn = int64_t (*)(const QuantizedBagArgs&, void* out);

extern DispatchStub<QuantizeFn> quantize_stub;
extern DispatchStub<DequantizeFn> dequantize_stub;
extern DispatchStub<QuantizedForwardFn> quantized_forward_stub;

}  // namespace dlrm_ops::cpu
