// CUDA ops of the table-batched embedding bag: pooled forward, dense and
// sparse weight gradients, per-sample-weight gradient, and the fused optimizer.
//
// A warp handles one bag (forward) or one distinct row (backward); its lanes
// stride the row's columns, kCols per lane per 128-column window. The backward
// sorts the lookups by row (a stable radix sort, so duplicates stay in lookup
// order) and sums each row's gradients in that order; a row looked up more
// than kLongRun times goes to a block whose warps sum slices of it, added in
// a fixed order. Gradients and updates are deterministic: the same on every
// run, and in the CPU's summation order for rows of at most kLongRun lookups.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_run_length_encode.cuh>
#include <cub/device/device_scan.cuh>

#include <optional>

#include "cuda/lookups.cuh"
#include "cuda/utils.cuh"
#include "embedding_bag_checks.h"
#include "stochastic_rounding.h"

namespace dlrm_ops::cuda {
namespace {

using torch::stable::accelerator::DeviceGuard;

constexpr int kCols = 4;                    // columns per lane in one window
constexpr int64_t kWindow = kCols * kWarp;  // columns a warp covers at once
constexpr int kThreads = 256;

__device__ __forceinline__ int64_t warp_id() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
}

int64_t warp_blocks(int64_t warps) {
  return std::max<int64_t>(1, ceil_div(warps * kWarp, kThreads));
}

// Table t of bag `bag` (global, table-major), and its columns.
struct BagInfo {
  int64_t t, b, d0, D, lo, hi;
};
template <typename I>
__device__ __forceinline__ BagInfo bag_info(const LookupView& v, int64_t bag) {
  const int64_t t = bag / v.B;
  const int64_t d0 = v.dim_offsets[t];
  return {
      t, bag % v.B, d0, v.dim_offsets[t + 1] - d0, offset_at<I>(v, bag), offset_at<I>(v, bag + 1)};
}

template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(LookupView v, const T* __restrict__ w, T* __restrict__ out, int64_t out_stride) {
  const int64_t bag = warp_id();
  if (bag >= v.T * v.B) return;
  const int lane = threadIdx.x % kWarp;
  if (lookups_bad(v)) {  // zeros: the warps of table 0's bags clear their output rows
    for (int64_t c = lane; bag < v.B && c < out_stride; c += kWarp) {
      out[bag * out_stride + c] = from_f32<T>(0.f);
    }
    return;
  }
  const BagInfo g = bag_info<I>(v, bag);
  const T* table = w + v.weights_offsets[g.t];
  const int64_t n = v.rows[g.t];
  T* o = out + g.b * out_stride + g.d0;
  const int64_t len = g.hi - g.lo;
  for (int64_t c0 = lane; c0 < g.D; c0 += kWindow) {
    float acc[kCols] = {};
    int64_t l = g.lo;
    for (; l + 4 <= g.hi; l += 4) {  // four rows in flight
      const T* r[4];
      float s[4];
      bool ok[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int64_t idx = index_at<I>(v, l + u);
        ok[u] = row_in_range(idx, n);  // a bad lookup adds nothing and reads nothing
        r[u] = table + (ok[u] ? idx : 0) * g.D + c0;
        s[u] = lookup_scale(v, l + u, len);
      }
#pragma unroll
      for (int k = 0; k < kCols; ++k) {
        if (c0 + k * kWarp < g.D) {
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            if (ok[u]) acc[k] += s[u] * to_f32(__ldg(r[u] + k * kWarp));
          }
        }
      }
    }
    for (; l < g.hi; ++l) {
      const int64_t idx = index_at<I>(v, l);
      if (!row_in_range(idx, n)) continue;
      const T* r = table + idx * g.D + c0;
      const float s = lookup_scale(v, l, len);
#pragma unroll
      for (int k = 0; k < kCols; ++k) {
        if (c0 + k * kWarp < g.D) acc[k] += s * to_f32(__ldg(r + k * kWarp));
      }
    }
#pragma unroll
    for (int k = 0; k < kCols; ++k) {
      if (c0 + k * kWarp < g.D) o[c0 + k * kWarp] = from_f32<T>(acc[k]);
    }
  }
}

// bag_of[l] = the (global) bag of lookup l.
template <typename I>
__global__ void bag_of_kernel(LookupView v, int32_t* bag_of) {
  const int64_t bag = warp_id();
  if (bag >= v.T * v.B || lookups_bad(v)) return;
  for (int64_t l = offset_at<I>(v, bag) + threadIdx.x % kWarp; l < offset_at<I>(v, bag + 1);
       l += kWarp) {
    bag_of[l] = static_cast<int32_t>(bag);
  }
}

// Sort key of lookup l: its row among all tables' rows, or `invalid` (above
// every row) for a bad lookup, whose run the per-row kernels skip.
template <typename I>
__global__ void row_keys_kernel(LookupView v, const int32_t* bag_of, uint64_t invalid,
                                uint64_t* keys, int32_t* pos) {
  const int64_t l = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (l >= v.N) return;
  pos[l] = static_cast<int32_t>(l);
  if (lookups_bad(v)) {
    keys[l] = invalid;
    return;
  }
  const int64_t t = bag_of[l] / v.B, idx = index_at<I>(v, l);
  keys[l] = row_in_range(idx, v.rows[t]) ? static_cast<uint64_t>(v.row_offsets[t] + idx) : invalid;
}

// The bag and the weight of the lookup at each sorted position, so that the
// per-row kernels read them in one coalesced load instead of a chain of
// dependent gathers.
template <typename I>
__global__ void sorted_lookups_kernel(LookupView v, const int32_t* bag_of, const int32_t* pos,
                                      int32_t* bag, float* scale) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= v.N || lookups_bad(v)) return;
  const int64_t l = pos[p];
  const int32_t b = bag_of[l];
  bag[p] = b;
  scale[p] = lookup_scale(v, l, offset_at<I>(v, b + 1) - offset_at<I>(v, b));
}

// Runs longer than this go to a block of kLongWarps warps (a Zipf-hot row can
// hold thousands of lookups; one warp summing them would be the whole
// kernel's tail).
constexpr int64_t kLongRun = 128;
constexpr int kLongWarps = 16;

// Lookups grouped by row, in lookup order within a row (a stable sort): run r
// covers sorted positions start[r] .. start[r+1] and its row among all tables'
// rows is key[r] (keys holds the sort's input, sorted keys and the runs' keys,
// N each); counts = [touched rows, long runs], long_runs lists the latter
// (filled by the per-row kernels). Bad lookups sort last, under `invalid`.
struct Runs {
  Tensor bag, scale, start, keys, counts, long_runs, scratch;
  uint64_t invalid;
};

Runs sort_by_row(const Tensor& ref, const DeviceLookups& lk, cudaStream_t stream) {
  const LookupView& v = lk.v;
  const int64_t N = v.N;
  Runs r;
  // Keys below 2^end_bit: every row (total_rows <= numel(weights)) and `invalid`.
  int end_bit = 1;
  while (end_bit < 63 && (int64_t{1} << end_bit) <= ref.numel()) ++end_bit;
  r.invalid = (uint64_t{1} << end_bit) - 1;
  r.bag = torch::stable::new_empty(ref, {N}, ScalarType::Int);
  r.scale = torch::stable::new_empty(ref, {N}, ScalarType::Float);
  r.start = torch::stable::new_zeros(ref, {N + 1}, ScalarType::Int);
  r.counts = torch::stable::new_zeros(ref, {2}, ScalarType::Int);
  r.long_runs = torch::stable::new_empty(ref, {N / (kLongRun + 1) + 1}, ScalarType::Int);
  r.keys = torch::stable::new_empty(ref, {3 * N}, ScalarType::Long);
  if (N == 0) return r;
  Tensor pos = torch::stable::new_empty(ref, {3 * N}, ScalarType::Int);
  auto* k_in = reinterpret_cast<uint64_t*>(r.keys.mutable_data_ptr<int64_t>());
  uint64_t* k_sorted = k_in + N;
  uint64_t* k_unique = k_in + 2 * N;
  int32_t* p_in = pos.mutable_data_ptr<int32_t>();
  int32_t* p_sorted = p_in + N;
  int32_t* bag_of = p_in + 2 * N;
  int32_t* counts = r.start.mutable_data_ptr<int32_t>() + 1;  // scanned in place below
  int32_t* num_runs = r.counts.mutable_data_ptr<int32_t>();
  dispatch_index(lk.int64, [&](auto i) {
    using I = decltype(i);
    bag_of_kernel<I><<<warp_blocks(v.T * v.B), kThreads, 0, stream>>>(v, bag_of);
    row_keys_kernel<I>
        <<<ceil_div(N, kThreads), kThreads, 0, stream>>>(v, bag_of, r.invalid, k_in, p_in);
  });
  DLRM_LAUNCH_CHECK();
  const int n = static_cast<int>(N);
  size_t sort_bytes = 0, rle_bytes = 0, scan_bytes = 0;
  DLRM_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, k_in, k_sorted, p_in,
                                                  p_sorted, n, 0, end_bit, stream));
  DLRM_CUDA_CHECK(cub::DeviceRunLengthEncode::Encode(nullptr, rle_bytes, k_sorted, k_unique, counts,
                                                     num_runs, n, stream));
  DLRM_CUDA_CHECK(cub::DeviceScan::InclusiveSum(nullptr, scan_bytes, counts, counts, n, stream));
  r.scratch = torch::stable::new_empty(
      ref, {static_cast<int64_t>(std::max({sort_bytes, rle_bytes, scan_bytes, size_t{1}}))},
      ScalarType::Byte);
  void* tmp = r.scratch.mutable_data_ptr();
  DLRM_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(tmp, sort_bytes, k_in, k_sorted, p_in, p_sorted,
                                                  n, 0, end_bit, stream));
  DLRM_CUDA_CHECK(cub::DeviceRunLengthEncode::Encode(tmp, rle_bytes, k_sorted, k_unique, counts,
                                                     num_runs, n, stream));
  // Counts past the last run stay 0, so start[r] = sum of counts before r for every r <= N.
  DLRM_CUDA_CHECK(cub::DeviceScan::InclusiveSum(tmp, scan_bytes, counts, counts, n, stream));
  dispatch_index(lk.int64, [&](auto i) {
    sorted_lookups_kernel<decltype(i)><<<ceil_div(N, kThreads), kThreads, 0, stream>>>(
        v, bag_of, p_sorted, r.bag.mutable_data_ptr<int32_t>(), r.scale.mutable_data_ptr<float>());
  });
  DLRM_LAUNCH_CHECK();
  return r;
}

struct RunView {
  const int32_t* bag;    // [N] by sorted position
  const float* scale;    // [N] by sorted position
  const int32_t* start;  // [runs + 1]
  const uint64_t* key;   // [runs]
  int32_t* counts;       // [touched rows, long runs]
  int32_t* long_runs;
  uint64_t invalid;  // the key of bad lookups
};
RunView view(const Runs& r) {
  return {r.bag.const_data_ptr<int32_t>(),
          r.scale.const_data_ptr<float>(),
          r.start.const_data_ptr<int32_t>(),
          reinterpret_cast<const uint64_t*>(r.keys.const_data_ptr<int64_t>()) + 2 * r.bag.numel(),
          r.counts.mutable_data_ptr<int32_t>(),
          r.long_runs.mutable_data_ptr<int32_t>(),
          r.invalid};
}

// A touched row: its dims, its row among all tables' rows (the row-wise
// state's index), its first element in the weights, its sorted lookups.
struct RowInfo {
  int64_t D, d0, key, elem0, lo, hi;
};
// The row `key` of table t, whose lookups are at sorted positions lo .. hi.
__device__ __forceinline__ RowInfo row_info(const LookupView& v, int64_t t, int64_t key, int64_t lo,
                                            int64_t hi) {
  const int64_t d0 = v.dim_offsets[t], D = v.dim_offsets[t + 1] - d0;
  return {D, d0, key, v.weights_offsets[t] + (key - v.row_offsets[t]) * D, lo, hi};
}

// The gradient of sorted lookups lo .. hi (all of one row) over the columns
// c0 + k*32 of one window, summed in lookup order. Called by the whole warp
// (c0 = window start + lane): lane j fetches lookup p0 + j's bag and weight,
// the loop broadcasts them and keeps eight gradient rows in flight.
template <typename T>
__device__ __forceinline__ void row_grad(const LookupView& v, const RunView& rv, int64_t lo,
                                         int64_t hi, int64_t d0, int64_t D,
                                         const T* __restrict__ grad_out, int64_t go_stride,
                                         int64_t c0, float (&g)[kCols]) {
  constexpr int kInFlight = 8;
#pragma unroll
  for (int k = 0; k < kCols; ++k) g[k] = 0.f;
  const int lane = threadIdx.x % kWarp;
  for (int64_t p0 = lo; p0 < hi; p0 += kWarp) {
    int64_t my_row = 0;
    float my_s = 0.f;
    if (p0 + lane < hi) {
      my_row = (rv.bag[p0 + lane] % v.B) * go_stride;
      my_s = rv.scale[p0 + lane];
    }
    const int n = static_cast<int>(min(static_cast<int64_t>(kWarp), hi - p0));
    for (int j0 = 0; j0 < n; j0 += kInFlight) {  // j0 + u < kWarp: every lane a valid source
      float x[kInFlight][kCols], s[kInFlight];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        const T* go = grad_out + __shfl_sync(0xffffffffu, my_row, j0 + u) + d0 + c0;
        s[u] = __shfl_sync(0xffffffffu, my_s, j0 + u);
#pragma unroll
        for (int k = 0; k < kCols; ++k) {
          x[u][k] = j0 + u < n && c0 + k * kWarp < D ? to_f32(go[k * kWarp]) : 0.f;
        }
      }
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        if (j0 + u < n) {
#pragma unroll
          for (int k = 0; k < kCols; ++k) g[k] += s[u] * x[u][k];
        }
      }
    }
  }
}

// Touched rows per warp and batch of rows_kernel.
constexpr int kBatch = 8;

// One warp per touched row, for rows of at most kLongRun lookups: calls
// op(ri, writer, grad) with grad(c0, g) the row's gradient window, and lists
// the longer rows for long_rows_kernel. Lane i of a warp first reads row i of
// its batch of kBatch (a grid-stride loop over the touched rows, whose count
// only the device knows), so the batch's dependent metadata loads overlap.
template <typename T, typename Op>
__global__ void __launch_bounds__(kThreads)
    rows_kernel(LookupView v, RunView rv, const T* __restrict__ grad_out, int64_t go_stride,
                Op op) {
  if (lookups_bad(v)) return;  // then long_rows_kernel finds no long row either
  op.begin();
  const int lane = threadIdx.x % kWarp;
  const int64_t num_runs = rv.counts[0];
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp * kBatch;
  for (int64_t base = warp_id() * kBatch; base < num_runs; base += step) {
    int64_t lo = 0, hi = 0, key = 0, t = 0;
    if (lane < kBatch && base + lane < num_runs) {
      lo = rv.start[base + lane];
      hi = rv.start[base + lane + 1];
      const uint64_t k = rv.key[base + lane];
      if (k == rv.invalid) {
        hi = lo;  // bad lookups: no row to touch
      } else {
        key = static_cast<int64_t>(k);
        t = rv.bag[lo] / v.B;
      }
    }
    const int n = static_cast<int>(min(int64_t{kBatch}, num_runs - base));
    for (int j = 0; j < n; ++j) {
      const int64_t lo_j = __shfl_sync(0xffffffffu, lo, j), hi_j = __shfl_sync(0xffffffffu, hi, j);
      if (hi_j == lo_j) continue;
      if (hi_j - lo_j > kLongRun) {
        if (lane == 0) rv.long_runs[atomicAdd(rv.counts + 1, 1)] = static_cast<int32_t>(base + j);
        continue;
      }
      const RowInfo ri =
          row_info(v, __shfl_sync(0xffffffffu, t, j), __shfl_sync(0xffffffffu, key, j), lo_j, hi_j);
      op(ri, true, [&](int64_t c0, float (&g)[kCols]) {
        row_grad<T>(v, rv, ri.lo, ri.hi, ri.d0, ri.D, grad_out, go_stride, c0, g);
      });
    }
  }
}

// One block per long row: warp w sums a contiguous slice of the row's
// lookups, the slices' sums are added in warp order (the same order on every
// run), every warp computes the update and warp 0 writes it.
template <typename T, typename Op>
__global__ void __launch_bounds__(kLongWarps* kWarp)
    long_rows_kernel(LookupView v, RunView rv, const T* __restrict__ grad_out, int64_t go_stride,
                     Op op) {
  __shared__ float part[kLongWarps][kWindow];
  op.begin();
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t num_long = rv.counts[1];
  for (int64_t i = blockIdx.x; i < num_long; i += gridDim.x) {
    const int64_t run = rv.long_runs[i], lo0 = rv.start[run];
    const RowInfo ri =
        row_info(v, rv.bag[lo0] / v.B, static_cast<int64_t>(rv.key[run]), lo0, rv.start[run + 1]);
    const int64_t slice = ceil_div(ri.hi - ri.lo, int64_t{kLongWarps});
    const int64_t lo = min(ri.hi, ri.lo + warp * slice), hi = min(ri.hi, lo + slice);
    op(ri, warp == 0, [&](int64_t c0, float (&g)[kCols]) {
      float mine[kCols];
      row_grad<T>(v, rv, lo, hi, ri.d0, ri.D, grad_out, go_stride, c0, mine);
      __syncthreads();  // every warp has read the previous window's sums
#pragma unroll
      for (int k = 0; k < kCols; ++k) part[warp][lane + k * kWarp] = mine[k];
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kCols; ++k) {
        float sum = 0.f;
        for (int w = 0; w < kLongWarps; ++w) sum += part[w][lane + k * kWarp];
        g[k] = sum;
      }
    });
  }
}

// The dense weight gradient: each touched row's summed gradient.
template <typename T>
struct DenseGradOp {
  T* grad_w;
  __device__ void begin() {}
  template <typename Grad>
  __device__ __forceinline__ void operator()(const RowInfo& ri, bool writer, Grad&& grad) const {
    const int lane = threadIdx.x % kWarp;
    for (int64_t w0 = 0; w0 < ri.D; w0 += kWindow) {
      const int64_t c0 = w0 + lane;
      float g[kCols];
      grad(c0, g);
#pragma unroll
      for (int k = 0; k < kCols; ++k) {
        if (writer && c0 + k * kWarp < ri.D) grad_w[ri.elem0 + c0 + k * kWarp] = from_f32<T>(g[k]);
      }
    }
  }
};

// One gradient row per lookup: table t's rows from element value_offsets[t].
template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
    sparse_grad_kernel(LookupView v, const int32_t* bag_of, const T* __restrict__ grad_out,
                       int64_t go_stride, T* __restrict__ values) {
  const int64_t l = warp_id();
  if (l >= v.N) return;
  const int64_t bag = bag_of[l];
  const BagInfo g = bag_info<I>(v, bag);
  const float s = lookup_scale(v, l, g.hi - g.lo);
  const T* go = grad_out + g.b * go_stride + g.d0;
  T* out = values + v.value_offsets[g.t] + (l - offset_at<I>(v, g.t * v.B)) * g.D;
  for (int64_t c = threadIdx.x % kWarp; c < g.D; c += kWarp)
    out[c] = from_f32<T>(s * to_f32(go[c]));
}

template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
    psw_grad_kernel(LookupView v, const int32_t* bag_of, const T* __restrict__ grad_out,
                    int64_t go_stride, const T* __restrict__ w, float* __restrict__ grad_psw) {
  const int64_t l = warp_id();
  if (l >= v.N) return;
  const int64_t idx = index_at<I>(v, l);
  if (lookups_bad(v) || !row_in_range(idx, v.rows[bag_of[l] / v.B])) {
    if (threadIdx.x % kWarp == 0) grad_psw[l] = 0.f;  // a bad lookup has no gradient
    return;
  }
  const BagInfo g = bag_info<I>(v, bag_of[l]);
  const T* go = grad_out + g.b * go_stride + g.d0;
  const T* row = w + v.weights_offsets[g.t] + idx * g.D;
  float acc = 0.f;
  for (int64_t c = threadIdx.x % kWarp; c < g.D; c += kWarp) acc += to_f32(go[c]) * to_f32(row[c]);
  acc = warp_sum(acc);
  if (threadIdx.x % kWarp == 0) grad_psw[l] = acc;
}

// ---- fused optimizer -------------------------------------------------------

// Stochastic rounding with the CPU's random bits and rule
// (csrc/stochastic_rounding.h), so both devices round alike.
template <typename W>
__device__ __forceinline__ W round_stochastic(float v, uint32_t u);
template <>
__device__ __forceinline__ float round_stochastic<float>(float v, uint32_t) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 round_stochastic<__nv_bfloat16>(float v, uint32_t u) {
  uint16_t bits;
  return bf16_round_stochastic(v, u, bits) ? __ushort_as_bfloat16(bits) : __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half round_stochastic<__half>(float v, uint32_t u) {
  const __half h = __float2half_rn(v);
  return __ushort_as_half(
      fp16_round_stochastic(v, __half_as_ushort(h), __half2float(h), u,
                            [](uint16_t b) { return __half2float(__ushort_as_half(b)); }));
}

// Every touched row gets its summed gradient and Rule (csrc/optimizers.h),
// with the CPU's fp32 arithmetic.
template <typename T, typename Rule>
struct UpdateOp {
  T* w;
  float* m1;
  float* m2;
  const double* hparams;  // HParam order
  const int64_t* step;    // before this update
  bool stochastic_rounding;
  // Set by begin() from the device-side hyper-parameters.
  Hyper h;
  uint64_t seed;

  static constexpr bool kRowState = Rule::kM1 == State::kRow || Rule::kM2 == State::kRow;

  __device__ void begin() {
    const int64_t t = *step + 1;
    h = make_hyper(hparams, t);
    seed = rounding_seed(t);
  }

  template <typename Grad>
  __device__ __forceinline__ void operator()(const RowInfo& ri, bool writer, Grad&& grad) const {
    const int lane = threadIdx.x % kWarp;
    float g[kCols], wf[kCols];
    // The fp32 weights of the window at c0 (loaded first, so that their
    // latency overlaps the gradient's) and its gradient with weight decay.
    auto window = [&](int64_t c0) {
#pragma unroll
      for (int k = 0; k < kCols; ++k) {
        wf[k] = c0 + k * kWarp < ri.D ? to_f32(w[ri.elem0 + c0 + k * kWarp]) : 0.f;
      }
      grad(c0, g);
#pragma unroll
      for (int k = 0; k < kCols; ++k) {
        if (h.weight_decay != 0.f) g[k] += h.weight_decay * wf[k];
      }
    };
    float coef = 0.f;  // the row's coefficient, where the rule keeps a per-row state
    const bool one_window = ri.D <= kWindow;
    if constexpr (kRowState) {
      float sq = 0.f;
      for (int64_t w0 = 0; w0 < ri.D; w0 += kWindow) {
        window(w0 + lane);
#pragma unroll
        for (int k = 0; k < kCols; ++k) sq += g[k] * g[k];
      }
      float* s = (Rule::kM1 == State::kRow ? m1 : m2) + ri.key;
      const float s_new = Rule::row_state(h, *s, warp_sum(sq) / static_cast<float>(ri.D));
      coef = Rule::row_coef(h, s_new);
      __syncwarp();
      if (writer && lane == 0) *s = s_new;
    }
    for (int64_t w0 = 0; w0 < ri.D; w0 += kWindow) {
      const int64_t c0 = w0 + lane;
      if (!(kRowState && one_window)) window(c0);
      if (!writer) continue;
#pragma unroll
      for (int k = 0; k < kCols; ++k) {
        const int64_t c = c0 + k * kWarp;
        if (c >= ri.D) continue;
        const int64_t e = ri.elem0 + c;
        const float x =
            Rule::apply(h, coef, g[k], wf[k], Rule::kM1 == State::kElement ? m1 + e : nullptr,
                        Rule::kM2 == State::kElement ? m2 + e : nullptr);
        w[e] =
            stochastic_rounding ? round_stochastic<T>(x, rounding_bits(seed, e)) : from_f32<T>(x);
      }
    }
  }
};

// rows_kernel, then long_rows_kernel for the rows it listed.
template <typename T, typename Op>
void launch_rows(const DeviceLookups& lk, const Runs& runs, const Tensor& grad_output, const Op& op,
                 cudaStream_t stream) {
  const RunView rv = view(runs);
  const T* go = static_cast<const T*>(grad_output.const_data_ptr());
  const int64_t stride = grad_output.size(1);
  const int64_t warps = std::min<int64_t>(ceil_div(lk.v.N, kBatch), 1 << 16);
  rows_kernel<T, Op><<<warp_blocks(warps), kThreads, 0, stream>>>(lk.v, rv, go, stride, op);
  const int64_t blocks = std::min<int64_t>(lk.v.N / (kLongRun + 1) + 1, 256);
  long_rows_kernel<T, Op><<<blocks, kLongWarps * kWarp, 0, stream>>>(lk.v, rv, go, stride, op);
  DLRM_LAUNCH_CHECK();
}

__global__ void increment_kernel(int64_t* step) { *step += 1; }

// ---- ops -------------------------------------------------------------------

// What every op checks its lookups against (cuda/lookups.cuh): the buffer
// `weights`, `total_dim`, the mode `check`. The backward ops also set
// grad_output, disjoint (dense gradient and update), wait (sparse gradient)
// and the row-wise state.
LookupSpec weights_spec(const Tensor& weights, int64_t total_dim, int64_t check) {
  check_cuda(weights, "weights");
  check_dtype(weights, "weights", {ScalarType::Float, ScalarType::Half, ScalarType::BFloat16});
  check_contiguous(weights, "weights");
  LookupSpec s{weights, "weights", weights.numel(), 0, total_dim};
  s.check = check;
  return s;
}

// The width of grad_output [B, dim_offsets[-1]] of the backward ops: the
// total_dim the device checks.
int64_t grad_width(const Tensor& grad_output) {
  check_dim(grad_output, "grad_output", 2);
  return grad_output.size(1);
}

Tensor embedding_bag_forward(Tensor weights, Tensor weights_offsets, Tensor dim_offsets,
                             Tensor rows, Tensor indices, Tensor offsets, int64_t pooling,
                             std::optional<Tensor> per_sample_weights, int64_t total_dim,
                             bool /*sparse*/, int64_t check) {
  DeviceGuard guard(weights.get_device());
  const DeviceLookups lk =
      validate_lookups(weights_spec(weights, total_dim, check), weights_offsets, dim_offsets, rows,
                       indices, offsets, pooling, per_sample_weights);
  Tensor out = torch::stable::new_empty(weights, {lk.v.B, total_dim});
  if (lk.v.B == 0 || total_dim == 0) return out;
  const cudaStream_t stream = stream_of(weights);
  dispatch_float(weights.scalar_type(), "weights", [&](auto w) {
    using T = decltype(w);
    dispatch_index(lk.int64, [&](auto i) {
      forward_kernel<T, decltype(i)><<<warp_blocks(lk.v.T * lk.v.B), kThreads, 0, stream>>>(
          lk.v, static_cast<const T*>(weights.const_data_ptr()),
          static_cast<T*>(out.mutable_data_ptr()), total_dim);
    });
  });
  DLRM_LAUNCH_CHECK();
  return out;
}

// Launches kernel<T, I> for the weight dtype and the index dtype.
template <typename F>
void dispatch(const Tensor& weights, const DeviceLookups& lk, F&& f) {
  dispatch_float(weights.scalar_type(), "weights",
                 [&](auto w) { dispatch_index(lk.int64, [&](auto i) { f(w, i); }); });
  DLRM_LAUNCH_CHECK();
}

Tensor embedding_bag_backward_dense(Tensor grad_output, Tensor weights, Tensor weights_offsets,
                                    Tensor dim_offsets, Tensor rows, Tensor indices, Tensor offsets,
                                    int64_t pooling, std::optional<Tensor> per_sample_weights,
                                    int64_t check) {
  DeviceGuard guard(weights.get_device());
  const int64_t width = grad_width(grad_output);
  LookupSpec spec = weights_spec(weights, width, check);
  spec.grad_output = spec.disjoint = true;
  const DeviceLookups lk = validate_lookups(spec, weights_offsets, dim_offsets, rows, indices,
                                            offsets, pooling, per_sample_weights);
  check_grad_output(grad_output, weights, lk.v.B, width);
  Tensor grad_weight = torch::stable::new_zeros(weights, weights.sizes());
  if (lk.v.N == 0) return grad_weight;
  const cudaStream_t stream = stream_of(weights);
  const Runs runs = sort_by_row(weights, lk, stream);
  dispatch_float(weights.scalar_type(), "weights", [&](auto w) {
    using T = decltype(w);
    launch_rows<T>(lk, runs, grad_output,
                   DenseGradOp<T>{static_cast<T*>(grad_weight.mutable_data_ptr())}, stream);
  });
  return grad_weight;
}

// bag_of[l] for every lookup (the kernels below run one warp per lookup).
Tensor bags_of(const Tensor& ref, const DeviceLookups& lk, cudaStream_t stream) {
  Tensor bag_of = torch::stable::new_empty(ref, {lk.v.N}, ScalarType::Int);
  dispatch_index(lk.int64, [&](auto i) {
    bag_of_kernel<decltype(i)><<<warp_blocks(lk.v.T * lk.v.B), kThreads, 0, stream>>>(
        lk.v, bag_of.mutable_data_ptr<int32_t>());
  });
  DLRM_LAUNCH_CHECK();
  return bag_of;
}

// The values' count depends on the offsets, so the host waits for the
// validation here in every mode (as PyTorch's sparse embedding backward does)
// and raises a bad lookup's error at once.
Tensor embedding_bag_backward_sparse(Tensor grad_output, Tensor weights, Tensor weights_offsets,
                                     Tensor dim_offsets, Tensor rows, Tensor indices,
                                     Tensor offsets, int64_t pooling,
                                     std::optional<Tensor> per_sample_weights, int64_t check) {
  DeviceGuard guard(weights.get_device());
  const int64_t width = grad_width(grad_output);
  LookupSpec spec = weights_spec(weights, width, check);
  spec.grad_output = spec.wait = true;
  const DeviceLookups lk = validate_lookups(spec, weights_offsets, dim_offsets, rows, indices,
                                            offsets, pooling, per_sample_weights);
  check_grad_output(grad_output, weights, lk.v.B, width);
  Tensor values = torch::stable::new_empty(weights, {lk.total_values});
  if (lk.v.N == 0) return values;
  const cudaStream_t stream = stream_of(weights);
  const Tensor bag_of = bags_of(weights, lk, stream);
  dispatch(weights, lk, [&](auto w, auto i) {
    using T = decltype(w);
    sparse_grad_kernel<T, decltype(i)><<<warp_blocks(lk.v.N), kThreads, 0, stream>>>(
        lk.v, bag_of.const_data_ptr<int32_t>(), static_cast<const T*>(grad_output.const_data_ptr()),
        width, static_cast<T*>(values.mutable_data_ptr()));
  });
  return values;
}

Tensor embedding_bag_per_sample_weights_grad(Tensor grad_output, Tensor weights,
                                             Tensor weights_offsets, Tensor dim_offsets,
                                             Tensor rows, Tensor indices, Tensor offsets,
                                             int64_t pooling, int64_t check) {
  DeviceGuard guard(weights.get_device());
  const int64_t width = grad_width(grad_output);
  LookupSpec spec = weights_spec(weights, width, check);
  spec.grad_output = true;
  const DeviceLookups lk = validate_lookups(spec, weights_offsets, dim_offsets, rows, indices,
                                            offsets, pooling, std::nullopt);
  check_grad_output(grad_output, weights, lk.v.B, width);
  Tensor grad = torch::stable::new_empty(weights, {lk.v.N}, ScalarType::Float);
  if (lk.v.N == 0) return grad;
  const cudaStream_t stream = stream_of(weights);
  const Tensor bag_of = bags_of(weights, lk, stream);
  dispatch(weights, lk, [&](auto w, auto i) {
    using T = decltype(w);
    psw_grad_kernel<T, decltype(i)><<<warp_blocks(lk.v.N), kThreads, 0, stream>>>(
        lk.v, bag_of.const_data_ptr<int32_t>(), static_cast<const T*>(grad_output.const_data_ptr()),
        width, static_cast<const T*>(weights.const_data_ptr()), grad.mutable_data_ptr<float>());
  });
  return grad;
}

void embedding_bag_update_(Tensor grad_output, Tensor weights, Tensor momentum1, Tensor momentum2,
                           Tensor step, Tensor weights_offsets, Tensor dim_offsets, Tensor rows,
                           Tensor indices, Tensor offsets, int64_t pooling,
                           std::optional<Tensor> per_sample_weights, Tensor hparams,
                           int64_t optimizer, bool stochastic_rounding, int64_t check) {
  DeviceGuard guard(weights.get_device());
  const int64_t width = grad_width(grad_output);
  // A row-wise state's size (one element per row of all tables) is checked on the device.
  check_optimizer_args(weights, momentum1, momentum2, step, hparams, optimizer, -1);
  LookupSpec spec = weights_spec(weights, width, check);
  spec.grad_output = spec.disjoint = true;
  const StateLayout layout = state_layout(optimizer);
  spec.state_arg = layout.m1 == State::kRow ? 1 : layout.m2 == State::kRow ? 2 : 0;
  if (spec.state_arg > 0) spec.state_rows = (spec.state_arg == 1 ? momentum1 : momentum2).numel();
  const DeviceLookups lk = validate_lookups(spec, weights_offsets, dim_offsets, rows, indices,
                                            offsets, pooling, per_sample_weights);
  check_grad_output(grad_output, weights, lk.v.B, width);
  const cudaStream_t stream = stream_of(weights);
  if (lk.v.N > 0) {
    const Runs runs = sort_by_row(weights, lk, stream);
    dispatch_float(weights.scalar_type(), "weights", [&](auto w) {
      using T = decltype(w);
      with_rule(optimizer, [&](auto rule) {
        UpdateOp<T, decltype(rule)> op{};
        op.w = static_cast<T*>(weights.mutable_data_ptr());
        op.m1 = momentum1.numel() ? momentum1.mutable_data_ptr<float>() : nullptr;
        op.m2 = momentum2.numel() ? momentum2.mutable_data_ptr<float>() : nullptr;
        op.hparams = hparams.const_data_ptr<double>();
        op.step = step.const_data_ptr<int64_t>();
        op.stochastic_rounding = stochastic_rounding;
        launch_rows<T>(lk, runs, grad_output, op, stream);
      });
    });
  }
  increment_kernel<<<1, 1, 0, stream>>>(step.mutable_data_ptr<int64_t>());
  DLRM_LAUNCH_CHECK();
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(dlrm_ops, CUDA, m) {
  m.impl("embedding_bag_forward_with_optimizer",
         TORCH_BOX(&forward_with_optimizer<&embedding_bag_forward>));
  m.impl("embedding_bag_update_", TORCH_BOX(&embedding_bag_update_));
  m.impl("embedding_bag_forward", TORCH_BOX(&embedding_bag_forward));
  m.impl("embedding_bag_backward_dense", TORCH_BOX(&embedding_bag_backward_dense));
  m.impl("embedding_bag_backward_sparse", TORCH_BOX(&embedding_bag_backward_sparse));
  m.impl("embedding_bag_per_sample_weights_grad",
         TORCH_BOX(&embedding_bag_per_sample_weights_grad));
}

}  // namespace dlrm_ops::cuda
