// Helpers shared by the CUDA kernels: the current stream, error checks, dtype
// conversions (all arithmetic is fp32), warp reductions and dtype dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include "common.h"

namespace dlrm_ops::cuda {

#define DLRM_CUDA_CHECK(expr)                                                  \
  do {                                                                         \
    const cudaError_t err_ = (expr);                                           \
    DLRM_CHECK(err_ == cudaSuccess, "CUDA error: ", cudaGetErrorString(err_)); \
  } while (0)
#define DLRM_LAUNCH_CHECK() DLRM_CUDA_CHECK(cudaGetLastError())

constexpr int kWarp = 32;

inline void check_cuda(const Tensor& t, const char* name) {
  DLRM_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
}

// The stream torch is using on t's device; kernels are launched on it.
inline cudaStream_t stream_of(const Tensor& t) {
  void* s = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device(), &s));
  return static_cast<cudaStream_t>(s);
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Calls f(T{}) with T the CUDA type of a float dtype (fp32, fp16, bf16).
template <typename F>
void dispatch_float(ScalarType t, const char* name, F&& f) {
  switch (t) {
    case ScalarType::Float:
      f(float{});
      break;
    case ScalarType::Half:
      f(__half{});
      break;
    case ScalarType::BFloat16:
      f(__nv_bfloat16{});
      break;
    default:
      DLRM_CHECK(false, name, " must be float32, float16 or bfloat16, got ", dtype_name(t));
  }
}

// Calls f(I{}) with I the index type (int32 or int64).
template <typename F>
void dispatch_index(bool int64, F&& f) {
  if (int64)
    f(int64_t{});
  else
    f(int32_t{});
}

}  // namespace dlrm_ops::cuda
