// CUDA ops of the pairwise dot interaction. One block per sample: its F = T+1
// feature rows are staged in shared memory as fp32 (rows padded to D+1 floats
// so that threads reading different rows at one column hit different banks);
// the forward computes each pair's dot product, the backward
// grad x_i = sum_j G_ij x_j with G the symmetric matrix of pair gradients.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <tuple>

#include "cuda/utils.cuh"
#include "interaction_checks.h"

namespace dlrm_ops::cuda {
namespace {

using torch::stable::accelerator::DeviceGuard;

constexpr int kThreads = 256;

// Features (i, j) of pair p: tril lists i > j (i >= j with self), triu i < j
// (i <= j), both row-major as in interaction_pairs.
__device__ __forceinline__ void pair_of(int p, int F, bool self, bool triu, int& i, int& j) {
  int row = 0;
  for (;; ++row) {
    const int n = triu ? (self ? F - row : F - 1 - row) : (self ? row + 1 : row);
    if (p < n) break;
    p -= n;
  }
  i = row;
  j = triu ? row + p + (self ? 0 : 1) : p;
}

// Stages [dense[b]; sparse[b]] as fp32 rows of stride D+1.
template <typename T>
__device__ __forceinline__ void load_features(const InteractionArgs& a, int64_t b, float* x) {
  const int D = static_cast<int>(a.D), Dp = D + 1;
  const T* dense = static_cast<const T*>(a.dense) + b * a.D;
  const T* sparse = static_cast<const T*>(a.sparse) + b * a.sparse_stride;
  for (int e = threadIdx.x; e < D; e += blockDim.x) x[e] = to_f32(dense[e]);
  for (int e = threadIdx.x; e < a.T * D; e += blockDim.x)
    x[(e / D + 1) * Dp + e % D] = to_f32(sparse[e]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(InteractionArgs a, int P, T* __restrict__ out) {
  extern __shared__ float x[];
  const int64_t b = blockIdx.x;
  const int D = static_cast<int>(a.D), Dp = D + 1, F = static_cast<int>(a.T) + 1;
  load_features<T>(a, b, x);
  T* o = out + b * (a.D + P);
  const T* dense = static_cast<const T*>(a.dense) + b * a.D;
  for (int e = threadIdx.x; e < D; e += blockDim.x) o[e] = dense[e];
  __syncthreads();
  for (int p = threadIdx.x; p < P; p += blockDim.x) {
    int i, j;
    pair_of(p, F, a.self_interaction, a.order == kTriu, i, j);
    const float* xi = x + i * Dp;
    const float* xj = x + j * Dp;
    float acc = 0.f;
    for (int k = 0; k < D; ++k) acc += xi[k] * xj[k];
    o[D + p] = from_f32<T>(acc);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(InteractionArgs a, int P, const T* __restrict__ grad_out,
                    T* __restrict__ grad_dense, T* __restrict__ grad_sparse) {
  extern __shared__ float x[];
  const int64_t b = blockIdx.x;
  const int D = static_cast<int>(a.D), Dp = D + 1, F = static_cast<int>(a.T) + 1;
  float* G = x + F * Dp;  // [F][F]
  load_features<T>(a, b, x);
  for (int e = threadIdx.x; e < F * F; e += blockDim.x) G[e] = 0.f;
  __syncthreads();
  const T* go = grad_out + b * (a.D + P);
  for (int p = threadIdx.x; p < P; p += blockDim.x) {
    int i, j;
    pair_of(p, F, a.self_interaction, a.order == kTriu, i, j);
    const float g = to_f32(go[D + p]);
    if (i == j) {
      G[i * F + i] = 2.f * g;
    } else {
      G[i * F + j] = g;
      G[j * F + i] = g;
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < F * D; e += blockDim.x) {
    const int i = e / D, k = e % D;
    float acc = 0.f;
    for (int j = 0; j < F; ++j) acc += G[i * F + j] * x[j * Dp + k];
    if (i == 0) {
      grad_dense[b * a.D + k] = from_f32<T>(to_f32(go[k]) + acc);
    } else {
      grad_sparse[b * a.T * a.D + e - D] = from_f32<T>(acc);
    }
  }
}

InteractionArgs prepare(const Tensor& dense, const Tensor& sparse, bool self_interaction,
                        int64_t order, Tensor& sparse_c) {
  check_cuda(dense, "dense");
  InteractionArgs a = check_interaction(dense, sparse, self_interaction, order, sparse_c);
  DLRM_CHECK(a.T + 1 <= 1024 && a.D <= 4096,
             "the CUDA interaction supports up to 1023 sparse "
             "features of dim up to 4096, got ",
             a.T, " of dim ", a.D);
  return a;
}

size_t smem_bytes(const InteractionArgs& a, bool backward) {
  const int64_t F = a.T + 1;
  return sizeof(float) * (F * (a.D + 1) + (backward ? F * F : 0));
}

template <typename K>
void set_smem(K kernel, size_t bytes) {
  int max_bytes = 0, dev = 0;
  DLRM_CUDA_CHECK(cudaGetDevice(&dev));
  DLRM_CUDA_CHECK(cudaDeviceGetAttribute(&max_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  DLRM_CHECK(bytes <= static_cast<size_t>(max_bytes), "the interaction's features (", bytes,
             " bytes) do not fit in shared memory (", max_bytes, " bytes)");
  DLRM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(bytes)));
}

Tensor dot_interaction(Tensor dense, Tensor sparse, bool self_interaction, int64_t order) {
  DeviceGuard guard(dense.get_device());
  Tensor sparse_c;
  const InteractionArgs a = prepare(dense, sparse, self_interaction, order, sparse_c);
  const int P = static_cast<int>(interaction_pairs(a.T + 1, self_interaction));
  Tensor out = torch::stable::new_empty(dense, {a.B, a.D + P});
  if (a.B == 0) return out;
  const size_t smem = smem_bytes(a, false);
  dispatch_float(a.dtype, "dense", [&](auto t) {
    using T = decltype(t);
    set_smem(forward_kernel<T>, smem);
    forward_kernel<T>
        <<<a.B, kThreads, smem, stream_of(dense)>>>(a, P, static_cast<T*>(out.mutable_data_ptr()));
  });
  DLRM_LAUNCH_CHECK();
  return out;
}

std::tuple<Tensor, Tensor> dot_interaction_backward(Tensor grad_output, Tensor dense, Tensor sparse,
                                                    bool self_interaction, int64_t order) {
  DeviceGuard guard(dense.get_device());
  Tensor sparse_c;
  const InteractionArgs a = prepare(dense, sparse, self_interaction, order, sparse_c);
  const Tensor go = check_interaction_grad(grad_output, dense, a);
  const int P = static_cast<int>(interaction_pairs(a.T + 1, self_interaction));
  Tensor grad_dense = torch::stable::new_empty(dense, dense.sizes());
  Tensor grad_sparse = torch::stable::new_empty(sparse, sparse.sizes());
  if (a.B == 0) return {grad_dense, grad_sparse};
  const size_t smem = smem_bytes(a, true);
  dispatch_float(a.dtype, "dense", [&](auto t) {
    using T = decltype(t);
    set_smem(backward_kernel<T>, smem);
    backward_kernel<T><<<a.B, kThreads, smem, stream_of(dense)>>>(
        a, P, static_cast<const T*>(go.const_data_ptr()),
        static_cast<T*>(grad_dense.mutable_data_ptr()),
        static_cast<T*>(grad_sparse.mutable_data_ptr()));
  });
  DLRM_LAUNCH_CHECK();
  return {grad_dense, grad_sparse};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(dlrm_ops, CUDA, m) {
  m.impl("dot_interaction", TORCH_BOX(&dot_interaction));
  m.impl("dot_interaction_backward", TORCH_BOX(&dot_interaction_backward));
}

}  // namespace dlrm_ops::cuda
