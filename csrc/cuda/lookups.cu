#include "cuda/lookups.cuh"

#include <torch/csrc/stable/ops.h>

#include "cuda/utils.cuh"
#include "lookups.h"

namespace dlrm_ops::cuda {
namespace {

// meta = [bad, ~first bad index position, total_rows, total_values, max_dim,
//         total_dim, row_offsets[T], value_offsets[T]]
constexpr int64_t kHeader = 6;

__device__ int64_t row_size(int64_t D, int64_t bits) {
  return bits == 0 ? D : bits == 8 ? D + 8 : D / 2 + 4;
}

// Table t's span [start, end) of the buffer, in units of row_size; false if
// its metadata is invalid or it does not fit. Bounds are compared before any
// difference or product is formed: every int64 input is safe.
__device__ bool table_span(const LookupView& v, int64_t t, int64_t ref_size, int64_t bits,
                           int64_t& start, int64_t& end) {
  const int64_t lo = v.dim_offsets[t], hi = v.dim_offsets[t + 1], n = v.rows[t];
  start = v.weights_offsets[t];
  if (lo < 0 || hi <= lo || n < 0 || n >= (int64_t{1} << 32) || start < 0) return false;
  const int64_t D = hi - lo;
  if (bits == 4 && D % 2 != 0) return false;
  const int64_t row = D > ref_size ? ref_size + 1 : row_size(D, bits);
  if (!span_fits(start, n, row, ref_size)) return false;
  end = start + n * row;
  return true;
}

// Warp 0 of block 0 checks the table metadata (with `disjoint`, that no two
// tables with rows share an element) and writes the per-table prefix sums, a
// table per lane.
template <typename I>
__global__ void inspect_kernel(LookupView v, int64_t ref_size, int64_t bits, int64_t total_dim,
                               bool disjoint, int64_t* meta) {
  const int64_t TB = v.T * v.B;
  const int lane = threadIdx.x % kWarp;
  if (blockIdx.x == 0 && threadIdx.x < kWarp) {
    bool bad = lane == 0 &&
               (v.dim_offsets[0] != 0 || (total_dim >= 0 && v.dim_offsets[v.T] != total_dim) ||
                (TB == 0 && (offset_at<I>(v, 0) != 0 || v.N != 0)));
    int64_t rows = 0, values = 0, max_dim = 0;  // over the tables before this chunk
    for (int64_t t0 = 0; t0 < v.T; t0 += kWarp) {
      const int64_t t = t0 + lane;
      int64_t n = 0, vals = 0;
      if (t < v.T) {
        int64_t start, end;
        if (table_span(v, t, ref_size, bits, start, end)) {
          const int64_t D = v.dim_offsets[t + 1] - v.dim_offsets[t];
          const int64_t count = offset_at<I>(v, (t + 1) * v.B) - offset_at<I>(v, t * v.B);
          n = v.rows[t];
          bad |= count < 0 || (count > 0 && D > INT64_MAX / count);
          vals = count * D;
          max_dim = max(max_dim, D);
          for (int64_t u = t + 1; disjoint && n > 0 && u < v.T; ++u) {
            int64_t s2, e2;
            bad |=
                v.rows[u] > 0 && table_span(v, u, ref_size, bits, s2, e2) && start < e2 && s2 < end;
          }
        } else {
          bad = true;
        }
      }
      int64_t n_incl = n, vals_incl = vals;  // inclusive scans over the lanes
      for (int o = 1; o < kWarp; o *= 2) {
        const int64_t a = __shfl_up_sync(0xffffffffu, n_incl, o);
        const int64_t b = __shfl_up_sync(0xffffffffu, vals_incl, o);
        if (lane >= o) {
          n_incl += a;
          vals_incl += b;
        }
      }
      if (t < v.T) {
        meta[kHeader + t] = rows + n_incl - n;
        meta[kHeader + v.T + t] = values + vals_incl - vals;
      }
      rows += __shfl_sync(0xffffffffu, n_incl, kWarp - 1);
      values += __shfl_sync(0xffffffffu, vals_incl, kWarp - 1);
    }
    for (int o = kWarp / 2; o > 0; o /= 2)
      max_dim = max(max_dim, __shfl_xor_sync(0xffffffffu, max_dim, o));
    if (__any_sync(0xffffffffu, bad) && lane == 0) meta[0] = 1;
    if (lane == 0) {
      meta[2] = rows;
      meta[3] = values;
      meta[4] = max_dim;
      meta[5] = v.dim_offsets[v.T];
    }
  }
  // Thread i checks bag i's offsets and lookup i's index, whose table is the
  // last one starting at or before i (exact once the offsets are valid).
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < TB) {
    const int64_t lo = offset_at<I>(v, i), hi = offset_at<I>(v, i + 1);
    if ((i == 0 && lo != 0) || hi < lo || lo < 0 || hi > v.N || (i == TB - 1 && hi != v.N)) {
      meta[0] = 1;
    }
  }
  if (i < v.N && v.T > 0) {
    int64_t t = 0;
    for (int64_t step = int64_t{1} << (63 - __clzll(v.T)); step > 0; step >>= 1) {
      if (t + step < v.T && offset_at<I>(v, (t + step) * v.B) <= i) t += step;
    }
    const int64_t idx = index_at<I>(v, i);
    if (idx < 0 || idx >= v.rows[t]) {
      atomicMax(reinterpret_cast<unsigned long long*>(meta + 1),
                ~static_cast<unsigned long long>(i));
    }
  }
}

// Page-locked host memory for the verdict, so that its copy is one DMA; one
// buffer per host thread, kept for the thread's life.
int64_t* pinned_header() {
  thread_local int64_t* buf = [] {
    void* p = nullptr;
    DLRM_CUDA_CHECK(cudaHostAlloc(&p, kHeader * sizeof(int64_t), cudaHostAllocPortable));
    return static_cast<int64_t*>(p);
  }();
  return buf;
}

[[noreturn]] void throw_cpu_error(const Tensor& ref, const char* ref_name, int64_t ref_size,
                                  int64_t bits, int64_t total_dim, bool disjoint,
                                  const Tensor& weights_offsets, const Tensor& dim_offsets,
                                  const Tensor& rows, const Tensor& indices, const Tensor& offsets,
                                  int64_t pooling, int64_t bad_pos) {
  const torch::stable::Device cpu(torch::headeronly::DeviceType::CPU);
  auto host = [&](const Tensor& t) { return torch::stable::to(t, cpu); };
  const Tensor rows_c = host(rows), woff_c = host(weights_offsets), doff_c = host(dim_offsets);
  const Tensor idx_c = host(indices), off_c = host(offsets);
  ValidatedLookups v = dlrm_ops::validate_lookups(rows_c, "rows", woff_c, doff_c, rows_c, idx_c,
                                                  off_c, pooling, std::nullopt);
  DLRM_CHECK(total_dim < 0 || v.tb.dim_offsets[v.tb.T] == total_dim,
             "total_dim must equal dim_offsets[-1] = ", v.tb.dim_offsets[v.tb.T], ", got ",
             total_dim);
  check_tables_fit(v.tb, ref_size, bits, ref_name);
  if (disjoint) check_tables_disjoint(v.tb, ref_name);
  if (bad_pos >= 0) throw_bad_index(v, bad_pos);
  DLRM_CHECK(false, "invalid lookups for ", ref_name);
  __builtin_unreachable();
}

}  // namespace

DeviceLookups validate_lookups(const Tensor& ref, const char* ref_name, int64_t ref_size,
                               int64_t bits, int64_t total_dim, bool disjoint,
                               const Tensor& weights_offsets, const Tensor& dim_offsets,
                               const Tensor& rows, const Tensor& indices, const Tensor& offsets,
                               int64_t pooling, const std::optional<Tensor>& per_sample_weights) {
  check_cuda(ref, ref_name);
  const LookupShape s = check_lookup_args(ref, ref_name, weights_offsets, dim_offsets, rows,
                                          indices, offsets, pooling, per_sample_weights);
  DLRM_CHECK(s.N < (int64_t{1} << 31), "indices must have fewer than 2^31 entries on CUDA, got ",
             s.N);
  DLRM_CHECK(s.T * s.B < (int64_t{1} << 31), "tables x batch size must be below 2^31 on CUDA, got ",
             s.T, " x ", s.B);
  DeviceLookups lk;
  lk.int64 = indices.scalar_type() == ScalarType::Long;
  lk.meta = torch::stable::new_empty(rows, {kHeader + 2 * s.T});
  if (per_sample_weights.has_value()) lk.psw_f32 = per_sample_weights_f32(*per_sample_weights);
  int64_t* meta = lk.meta.mutable_data_ptr<int64_t>();
  lk.v = LookupView{s.T,
                    s.B,
                    s.N,
                    weights_offsets.const_data_ptr<int64_t>(),
                    dim_offsets.const_data_ptr<int64_t>(),
                    rows.const_data_ptr<int64_t>(),
                    indices.const_data_ptr(),
                    offsets.const_data_ptr(),
                    per_sample_weights ? lk.psw_f32.const_data_ptr<float>() : nullptr,
                    pooling,
                    meta + kHeader,
                    meta + kHeader + s.T};
  const cudaStream_t stream = stream_of(ref);
  DLRM_CUDA_CHECK(cudaMemsetAsync(meta, 0, 2 * sizeof(int64_t), stream));  // the error slots
  constexpr int kThreads = 256;
  const int64_t blocks = std::max<int64_t>(1, ceil_div(std::max(s.T * s.B, s.N), kThreads));
  dispatch_index(lk.int64, [&](auto i) {
    inspect_kernel<decltype(i)>
        <<<blocks, kThreads, 0, stream>>>(lk.v, ref_size, bits, total_dim, disjoint, meta);
  });
  DLRM_LAUNCH_CHECK();
  int64_t* h = pinned_header();
  DLRM_CUDA_CHECK(
      cudaMemcpyAsync(h, meta, kHeader * sizeof(int64_t), cudaMemcpyDeviceToHost, stream));
  DLRM_CUDA_CHECK(cudaStreamSynchronize(stream));
  if (h[0] != 0 || h[1] != 0) {
    throw_cpu_error(ref, ref_name, ref_size, bits, total_dim, disjoint, weights_offsets,
                    dim_offsets, rows, indices, offsets, pooling,
                    h[1] != 0 ? static_cast<int64_t>(~h[1]) : -1);
  }
  lk.total_rows = h[2];
  lk.total_values = h[3];
  lk.max_dim = h[4];
  lk.total_dim = h[5];
  return lk;
}

}  // namespace dlrm_ops::cuda
