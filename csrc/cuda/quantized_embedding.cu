// CUDA ops of the row-wise quantized embeddings, in the byte layouts of
// csrc/cpu/quantized_embedding_kernel.h. A warp quantizes or dequantizes one
// row, or pools one bag, its lanes striding the columns. Quantization repeats
// the CPU's fp32 arithmetic step for step, so both give the same bytes.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <optional>

#include "cuda/lookups.cuh"
#include "cuda/utils.cuh"
#include "quantized_checks.h"

namespace dlrm_ops::cuda {
namespace {

using torch::stable::accelerator::DeviceGuard;

constexpr int kThreads = 256;
constexpr int kCols = 8;  // columns per lane in one window of 256

__device__ __forceinline__ int64_t warp_id() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
}
int64_t warp_blocks(int64_t warps) {
  return std::max<int64_t>(1, ceil_div(warps * kWarp, kThreads));
}

__device__ __forceinline__ int64_t row_bytes(int64_t D, int bits) {
  return bits == 8 ? D + 8 : D / 2 + 4;
}

// Rows start at any byte, so scale and bias are read and written bytewise.
__device__ __forceinline__ float load_f32(const uint8_t* p) {
  float v;
  memcpy(&v, p, 4);
  return v;
}
__device__ __forceinline__ float load_f16(const uint8_t* p) {
  __half h;
  memcpy(&h, p, 2);
  return __half2float(h);
}
template <int Bits>
__device__ __forceinline__ void scale_bias(const uint8_t* row, int64_t D, float& scale,
                                           float& bias) {
  if (Bits == 8) {
    scale = load_f32(row + D);
    bias = load_f32(row + D + 4);
  } else {
    scale = load_f16(row + D / 2);
    bias = load_f16(row + D / 2 + 2);
  }
}
template <int Bits>
__device__ __forceinline__ float q_at(const uint8_t* row, int64_t d) {
  return Bits == 8 ? row[d] : (row[d / 2] >> ((d & 1) * 4)) & 0xF;
}

template <typename T, int Bits>
__global__ void __launch_bounds__(kThreads)
    quantize_kernel(const T* __restrict__ w, int64_t R, int64_t D, uint8_t* __restrict__ packed) {
  const int64_t r = warp_id();
  if (r >= R) return;
  const int lane = threadIdx.x % kWarp;
  const T* x = w + r * D;
  uint8_t* out = packed + r * row_bytes(D, Bits);
  float mn = INFINITY, mx = -INFINITY, fin = 0.f;  // fin is NaN iff some x is not finite
  for (int64_t d = lane; d < D; d += kWarp) {
    const float v = to_f32(x[d]);
    mn = fminf(mn, v);
    mx = fmaxf(mx, v);
    fin += v * 0.f;
  }
  for (int o = kWarp / 2; o > 0; o /= 2) {
    mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, o));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  }
  fin = warp_sum(fin);
  const int64_t qbytes = Bits == 8 ? D : D / 2;
  if (fin != 0.f) {  // inf or NaN: NaN scale and bias, q = 0
    for (int64_t d = lane; d < qbytes; d += kWarp) out[d] = 0;
    if (lane == 0) {
      if (Bits == 8) {
        const float nan = NAN;
        memcpy(out + D, &nan, 4);
        memcpy(out + D + 4, &nan, 4);
      } else {
        const __half nan = __ushort_as_half(0x7E00);  // the CPU's fp16 quiet NaN
        memcpy(out + D / 2, &nan, 2);
        memcpy(out + D / 2 + 2, &nan, 2);
      }
    }
    return;
  }
  if (Bits == 8) {
    const float range = __fsub_rn(mx, mn);
    const float scale = range / 255.0f;
    const float inv = 255.0f / __fadd_rn(range, 1e-8f);
    for (int64_t d = lane; d < D; d += kWarp) {
      out[d] = static_cast<uint8_t>(
          static_cast<int32_t>(rintf(__fmul_rn(__fsub_rn(to_f32(x[d]), mn), inv))));
    }
    if (lane == 0) {
      memcpy(out + D, &scale, 4);
      memcpy(out + D + 4, &mn, 4);
    }
  } else {
    const __half mn_h = __float2half_rn(mn);
    mn = __half2float(mn_h);
    const float range = __fsub_rn(mx, mn);
    float scale = range == 0 ? 1.0f : range / 15.0f;
    scale = __half2float(__float2half_rn(scale));
    if (scale == 0) scale = 1.0f;
    float inv = 1.0f / scale;
    if (isinf(inv)) {
      scale = 1.0f;
      inv = 1.0f;
    }
    const __half scale_h = __float2half_rn(scale);
    auto q = [&](int64_t c) {
      const float v = rintf(__fmul_rn(__fsub_rn(to_f32(x[c]), mn), inv));
      return static_cast<uint8_t>(fminf(fmaxf(v, 0.f), 15.f));
    };
    for (int64_t d = lane; d < D / 2; d += kWarp) {
      out[d] = static_cast<uint8_t>(q(2 * d) | (q(2 * d + 1) << 4));
    }
    if (lane == 0) {
      memcpy(out + D / 2, &scale_h, 2);
      memcpy(out + D / 2 + 2, &mn_h, 2);
    }
  }
}

template <typename T, int Bits>
__global__ void __launch_bounds__(kThreads)
    dequantize_kernel(const uint8_t* __restrict__ packed, int64_t R, int64_t D,
                      T* __restrict__ out) {
  const int64_t r = warp_id();
  if (r >= R) return;
  const uint8_t* row = packed + r * row_bytes(D, Bits);
  float scale, bias;
  scale_bias<Bits>(row, D, scale, bias);
  for (int64_t d = threadIdx.x % kWarp; d < D; d += kWarp) {
    out[r * D + d] = from_f32<T>(scale * q_at<Bits>(row, d) + bias);
  }
}

// One bag: sum_l s_l (scale_l q_l + bias_l) = sum_l (s_l scale_l) q_l + sum_l s_l bias_l,
// as the CPU kernel computes it.
template <typename O, typename I, int Bits>
__global__ void __launch_bounds__(kThreads)
    qforward_kernel(LookupView v, const uint8_t* __restrict__ packed, O* __restrict__ out,
                    int64_t out_stride) {
  const int64_t bag = warp_id();
  if (bag >= v.T * v.B) return;
  const int lane = threadIdx.x % kWarp;
  if (lookups_bad(v)) {  // zeros: the warps of table 0's bags clear their output rows
    for (int64_t c = lane; bag < v.B && c < out_stride; c += kWarp) {
      out[bag * out_stride + c] = from_f32<O>(0.f);
    }
    return;
  }
  const int64_t t = bag / v.B, b = bag % v.B;
  const int64_t n = v.rows[t];
  const int64_t d0 = v.dim_offsets[t], D = v.dim_offsets[t + 1] - d0;
  const uint8_t* table = packed + v.weights_offsets[t];
  const int64_t stride = row_bytes(D, Bits);
  const int64_t lo = offset_at<I>(v, bag), hi = offset_at<I>(v, bag + 1);
  const float scale_out = pooling_scale(v.pooling, hi - lo);
  O* o = out + b * out_stride + d0;
  for (int64_t c0 = lane; c0 < D; c0 += kCols * kWarp) {
    float acc[kCols] = {};
    float bias_sum = 0.f;
    for (int64_t l = lo; l < hi; ++l) {
      const int64_t idx = index_at<I>(v, l);
      if (!row_in_range(idx, n)) continue;  // a bad lookup adds nothing and reads nothing
      const uint8_t* row = table + idx * stride;
      const float s = v.per_sample_weights ? v.per_sample_weights[l] : 1.f;
      float scale, bias;
      scale_bias<Bits>(row, D, scale, bias);
      bias_sum += s * bias;
      const float sc = s * scale;
#pragma unroll
      for (int k = 0; k < kCols; ++k) {
        if (c0 + k * kWarp < D) acc[k] += sc * q_at<Bits>(row, c0 + k * kWarp);
      }
    }
#pragma unroll
    for (int k = 0; k < kCols; ++k) {
      if (c0 + k * kWarp < D) o[c0 + k * kWarp] = from_f32<O>((acc[k] + bias_sum) * scale_out);
    }
  }
}

template <typename F>
void dispatch_bits(int64_t bits, F&& f) {
  if (bits == 8)
    f(std::integral_constant<int, 8>{});
  else
    f(std::integral_constant<int, 4>{});
}

Tensor quantize_rowwise(Tensor weight, int64_t bits) {
  check_cuda(weight, "weight");
  check_quantize_args(weight, bits);
  DeviceGuard guard(weight.get_device());
  const int64_t R = weight.size(0), D = weight.size(1);
  Tensor w = torch::stable::contiguous(weight);
  Tensor packed = torch::stable::new_empty(w, {R, packed_row_bytes(D, bits)}, ScalarType::Byte);
  if (R == 0) return packed;
  dispatch_float(w.scalar_type(), "weight", [&](auto t) {
    using T = decltype(t);
    dispatch_bits(bits, [&](auto b) {
      quantize_kernel<T, decltype(b)::value><<<warp_blocks(R), kThreads, 0, stream_of(w)>>>(
          static_cast<const T*>(w.const_data_ptr()), R, D, packed.mutable_data_ptr<uint8_t>());
    });
  });
  DLRM_LAUNCH_CHECK();
  return packed;
}

Tensor dequantize_rowwise(Tensor packed, int64_t bits, std::optional<ScalarType> dtype) {
  check_cuda(packed, "packed");
  check_packed_rows(packed, bits);
  DeviceGuard guard(packed.get_device());
  const ScalarType out_t = float_dtype(dtype, "dtype");
  const int64_t R = packed.size(0), D = dim_of_packed(packed, bits);
  Tensor p = torch::stable::contiguous(packed);
  Tensor out = torch::stable::new_empty(p, {R, D}, out_t);
  if (R == 0) return out;
  dispatch_float(out_t, "dtype", [&](auto t) {
    using T = decltype(t);
    dispatch_bits(bits, [&](auto b) {
      dequantize_kernel<T, decltype(b)::value><<<warp_blocks(R), kThreads, 0, stream_of(p)>>>(
          p.const_data_ptr<uint8_t>(), R, D, static_cast<T*>(out.mutable_data_ptr()));
    });
  });
  DLRM_LAUNCH_CHECK();
  return out;
}

Tensor quantized_embedding_bag_forward(Tensor packed, Tensor weights_offsets, Tensor dim_offsets,
                                       Tensor rows, Tensor indices, Tensor offsets, int64_t pooling,
                                       std::optional<Tensor> per_sample_weights, int64_t total_dim,
                                       int64_t bits, std::optional<ScalarType> output_dtype,
                                       int64_t check) {
  check_cuda(packed, "packed");
  const ScalarType out_t = check_packed_tables(packed, bits, output_dtype);
  DeviceGuard guard(packed.get_device());
  LookupSpec spec{packed, "packed", packed.numel(), bits, total_dim};
  spec.check = check;
  const DeviceLookups lk = validate_lookups(spec, weights_offsets, dim_offsets, rows, indices,
                                            offsets, pooling, per_sample_weights);
  Tensor out = torch::stable::new_empty(packed, {lk.v.B, total_dim}, out_t);
  if (lk.v.B == 0) return out;
  dispatch_float(out_t, "output_dtype", [&](auto o) {
    using O = decltype(o);
    dispatch_index(lk.int64, [&](auto i) {
      dispatch_bits(bits, [&](auto b) {
        qforward_kernel<O, decltype(i), decltype(b)::value>
            <<<warp_blocks(lk.v.T * lk.v.B), kThreads, 0, stream_of(packed)>>>(
                lk.v, packed.const_data_ptr<uint8_t>(), static_cast<O*>(out.mutable_data_ptr()),
                total_dim);
      });
    });
  });
  DLRM_LAUNCH_CHECK();
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(dlrm_ops, CUDA, m) {
  m.impl("quantize_rowwise", TORCH_BOX(&quantize_rowwise));
  m.impl("dequantize_rowwise", TORCH_BOX(&dequantize_rowwise));
  m.impl("quantized_embedding_bag_forward", TORCH_BOX(&quantized_embedding_bag_forward));
}

}  // namespace dlrm_ops::cuda
