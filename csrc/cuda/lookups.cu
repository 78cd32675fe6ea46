#include "cuda/lookups.cuh"

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include "cuda/utils.cuh"
#include "lookups.h"

namespace dlrm_ops::cuda {
namespace {

using torch::stable::accelerator::DeviceGuard;

// The first lookup error of a device since the last take_lookup_error:
// [kind, source, table, bag, pos, value, limit, count, check], kind 0 when
// none, check the mode of the call that recorded it;
// source names the tensor: 0 weights, 1 packed, 2 momentum1, 3 momentum2
// (dlrm_ops/errors.py formats it as the CPU op's message). A module global,
// so recording it needs no allocation and no host work.
constexpr int kRecord = 9;
__device__ int64_t g_error[kRecord];

__device__ int64_t row_size(int64_t D, int64_t bits) {
  return bits == 0 ? D : bits == 8 ? D + 8 : D / 2 + 4;
}

__device__ void flag_first(int64_t* slot, int64_t i) {
  atomicMax(reinterpret_cast<unsigned long long*>(slot), ~static_cast<unsigned long long>(i));
}
__host__ __device__ int64_t first_of(int64_t slot) {
  return static_cast<int64_t>(~static_cast<uint64_t>(slot));
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

// The last bag starting at or before lookup i (valid offsets).
template <typename I>
__device__ int64_t bag_of_lookup(const LookupView& v, int64_t i) {
  int64_t lo = 0, hi = v.T * v.B - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (offset_at<I>(v, mid) <= i)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// Warp 0 of block 0 checks the table metadata (with `disjoint`, that no two
// tables with rows share an element) and writes the per-table prefix sums, a
// table per lane; thread i checks bag i's offsets and lookup i's index.
template <typename I>
__global__ void inspect_kernel(LookupView v, int64_t ref_size, int64_t bits, int64_t total_dim,
                               bool disjoint, int64_t state_rows, int64_t* meta) {
  const int64_t TB = v.T * v.B;
  const int lane = threadIdx.x % kWarp;
  if (blockIdx.x == 0 && threadIdx.x < kWarp) {
    if (lane == 0 && (v.dim_offsets[0] != 0 || v.dim_offsets[v.T] != total_dim)) {
      flag_first(meta, 0);
    }
    if (lane == 0 && TB == 0 && (offset_at<I>(v, 0) != 0 || v.N != 0)) flag_first(meta + 1, 0);
    int64_t rows = 0, values = 0;  // over the tables before this chunk
    for (int64_t t0 = 0; t0 < v.T; t0 += kWarp) {
      const int64_t t = t0 + lane;
      int64_t n = 0, vals = 0;
      if (t < v.T) {
        int64_t start, end;
        if (table_span(v, t, ref_size, bits, start, end)) {
          const int64_t D = v.dim_offsets[t + 1] - v.dim_offsets[t];
          // Bad offsets are flagged below; the count only sizes the sparse gradient.
          const int64_t count =
              max(int64_t{0}, min(v.N, offset_at<I>(v, (t + 1) * v.B) - offset_at<I>(v, t * v.B)));
          n = v.rows[t];
          vals = count * D;  // count < 2^31, D <= ref_size: no overflow
          bool overlap = false;
          for (int64_t u = t + 1; disjoint && n > 0 && u < v.T; ++u) {
            int64_t s2, e2;
            overlap |=
                v.rows[u] > 0 && table_span(v, u, ref_size, bits, s2, e2) && start < e2 && s2 < end;
          }
          if (overlap) flag_first(meta, t + 1);
        } else {
          flag_first(meta, t + 1);
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
        meta[kStatus + t] = rows + n_incl - n;
        meta[kStatus + v.T + t] = values + vals_incl - vals;
      }
      rows += __shfl_sync(0xffffffffu, n_incl, kWarp - 1);
      values += __shfl_sync(0xffffffffu, vals_incl, kWarp - 1);
    }
    if (lane == 0) {
      meta[3] = state_rows >= 0 && rows != state_rows;
      meta[4] = rows;
      meta[5] = values;
    }
  }
  // Lookup i's table is the last one starting at or before i (exact once the
  // offsets are valid; always a table, so rows[t] is always readable).
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < TB) {
    const int64_t lo = offset_at<I>(v, i), hi = offset_at<I>(v, i + 1);
    if ((i == 0 && lo != 0) || hi < lo || lo < 0 || hi > v.N || (i == TB - 1 && hi != v.N)) {
      flag_first(meta + 1, i);
    }
  }
  if (i < v.N && v.T > 0) {
    int64_t t = 0;
    for (int64_t step = int64_t{1} << (63 - __clzll(v.T)); step > 0; step >>= 1) {
      if (t + step < v.T && offset_at<I>(v, (t + step) * v.B) <= i) t += step;
    }
    if (!row_in_range(index_at<I>(v, i), v.rows[t])) flag_first(meta + 2, i);
  }
}

// One thread: if this call failed and the device holds no error yet, records
// the call's first error, found in the CPU op's order (tables, optimizer
// state, offsets, indices).
template <typename I>
__global__ void record_kernel(LookupView v, const int64_t* meta, int64_t source, int64_t state_rows,
                              int64_t check) {
  if (g_error[0] != kNone || (meta[0] | meta[1] | meta[2] | meta[3]) == 0) return;
  int64_t r[kRecord] = {};
  r[1] = source >= 2 ? 0 : source;
  r[8] = check;
  if (meta[0] != 0) {
    r[0] = kTables;
    r[2] = first_of(meta[0]) - 1;  // -1: dim_offsets[0] or dim_offsets[-1]
  } else if (meta[3] != 0) {
    r[0] = kStateRows;
    r[1] = source;
    r[5] = state_rows;
    r[6] = meta[4];
  } else if (meta[1] != 0) {
    const int64_t TB = v.T * v.B;
    r[0] = kOffsets;
    r[7] = v.N;
    int64_t i = 0;
    if (offset_at<I>(v, 0) == 0) {  // else offsets[0] is the error
      i = 1;
      while (i <= TB && offset_at<I>(v, i) >= offset_at<I>(v, i - 1)) ++i;
      if (i > TB) i = TB;  // ordered: offsets[-1] is not N
    }
    r[4] = i;
    r[5] = offset_at<I>(v, i);
    r[6] = i > 0 ? offset_at<I>(v, i - 1) : 0;
    r[2] = i > 0 ? (i - 1) / max(v.B, int64_t{1}) : 0;
    r[3] = i > 0 ? (i - 1) % max(v.B, int64_t{1}) : 0;
  } else {
    const int64_t pos = first_of(meta[2]);
    const int64_t bag = bag_of_lookup<I>(v, pos);
    r[0] = kIndex;
    r[2] = bag / v.B;
    r[3] = bag % v.B;
    r[4] = pos;
    r[5] = index_at<I>(v, pos);
    r[6] = v.rows[r[2]];
  }
  for (int k = 1; k < kRecord; ++k) g_error[k] = r[k];
  __threadfence();
  g_error[0] = r[0];
}

// Page-locked host memory for the status, so that its copy is one DMA; one
// buffer per host thread, kept for the thread's life.
int64_t* pinned_status() {
  thread_local int64_t* buf = [] {
    void* p = nullptr;
    DLRM_CUDA_CHECK(cudaHostAlloc(&p, kStatus * sizeof(int64_t), cudaHostAllocPortable));
    return static_cast<int64_t*>(p);
  }();
  return buf;
}

// The CPU op's error for these lookups, from copies of them on the host.
[[noreturn]] void throw_cpu_error(const LookupSpec& s, const Tensor& weights_offsets,
                                  const Tensor& dim_offsets, const Tensor& rows,
                                  const Tensor& indices, const Tensor& offsets, int64_t pooling,
                                  const int64_t* status) {
  const torch::stable::Device cpu(torch::headeronly::DeviceType::CPU);
  auto host = [&](const Tensor& t) { return torch::stable::to(t, cpu); };
  const Tensor rows_c = host(rows), woff_c = host(weights_offsets), doff_c = host(dim_offsets);
  const Tensor idx_c = host(indices), off_c = host(offsets);
  ValidatedLookups v = dlrm_ops::validate_lookups(rows_c, "rows", woff_c, doff_c, rows_c, idx_c,
                                                  off_c, pooling, std::nullopt);
  const int64_t width = v.tb.dim_offsets[v.tb.T];
  if (s.grad_output) {
    DLRM_CHECK(width == s.total_dim, "grad_output must have shape [", v.tb.B, ", ", width, "]");
  }
  DLRM_CHECK(width == s.total_dim, "total_dim must equal dim_offsets[-1] = ", width, ", got ",
             s.total_dim);
  check_tables_fit(v.tb, s.size, s.bits, s.ref_name);
  if (s.disjoint) check_tables_disjoint(v.tb, s.ref_name);
  DLRM_CHECK(status[3] == 0, "momentum", s.state_arg, " must have ", status[4],
             " elements for this optimizer, got ", s.state_rows);
  if (status[2] != 0) throw_bad_index(v, first_of(status[2]));
  DLRM_CHECK(false, "invalid lookups for ", s.ref_name);
  __builtin_unreachable();
}

Tensor take_lookup_error(Tensor device) {
  check_cuda(device, "device");
  DeviceGuard guard(device.get_device());
  const cudaStream_t stream = stream_of(device);
  void* record = nullptr;
  DLRM_CUDA_CHECK(cudaGetSymbolAddress(&record, g_error));
  Tensor out = torch::stable::new_empty(device, {kRecord}, ScalarType::Long);
  DLRM_CUDA_CHECK(cudaMemcpyAsync(out.mutable_data_ptr(), record, sizeof(g_error),
                                  cudaMemcpyDeviceToDevice, stream));
  DLRM_CUDA_CHECK(cudaMemsetAsync(record, 0, sizeof(g_error), stream));
  return torch::stable::to(out, torch::stable::Device(torch::headeronly::DeviceType::CPU));
}

}  // namespace

DeviceLookups validate_lookups(const LookupSpec& s, const Tensor& weights_offsets,
                               const Tensor& dim_offsets, const Tensor& rows, const Tensor& indices,
                               const Tensor& offsets, int64_t pooling,
                               const std::optional<Tensor>& per_sample_weights) {
  check_cuda(s.ref, s.ref_name);
  check_mode(s.check);
  const LookupShape shape = check_lookup_args(s.ref, s.ref_name, weights_offsets, dim_offsets, rows,
                                              indices, offsets, pooling, per_sample_weights);
  DLRM_CHECK(shape.N < (int64_t{1} << 31),
             "indices must have fewer than 2^31 entries on CUDA, got ", shape.N);
  DLRM_CHECK(shape.T * shape.B < (int64_t{1} << 31),
             "tables x batch size must be below 2^31 on CUDA, got ", shape.T, " x ", shape.B);
  DeviceLookups lk;
  lk.int64 = indices.scalar_type() == ScalarType::Long;
  lk.total_values = -1;
  lk.meta = torch::stable::new_empty(rows, {kStatus + 2 * shape.T});
  if (per_sample_weights.has_value()) lk.psw_f32 = per_sample_weights_f32(*per_sample_weights);
  int64_t* meta = lk.meta.mutable_data_ptr<int64_t>();
  lk.v = LookupView{shape.T,
                    shape.B,
                    shape.N,
                    weights_offsets.const_data_ptr<int64_t>(),
                    dim_offsets.const_data_ptr<int64_t>(),
                    rows.const_data_ptr<int64_t>(),
                    indices.const_data_ptr(),
                    offsets.const_data_ptr(),
                    per_sample_weights ? lk.psw_f32.const_data_ptr<float>() : nullptr,
                    pooling,
                    meta,
                    meta + kStatus,
                    meta + kStatus + shape.T};
  const cudaStream_t stream = stream_of(s.ref);
  DLRM_CUDA_CHECK(cudaMemsetAsync(meta, 0, 3 * sizeof(int64_t), stream));  // the error slots
  constexpr int kThreads = 256;
  const int64_t blocks =
      std::max<int64_t>(1, ceil_div(std::max(shape.T * shape.B, shape.N), kThreads));
  // The record's source: the buffer (weights 0, packed 1), or with a
  // row-wise optimizer state its momentum (2 or 3), named if that is wrong.
  const int64_t source = s.state_arg > 0 ? 1 + s.state_arg : s.bits != 0;
  dispatch_index(lk.int64, [&](auto i) {
    using I = decltype(i);
    inspect_kernel<I><<<blocks, kThreads, 0, stream>>>(lk.v, s.size, s.bits, s.total_dim,
                                                       s.disjoint, s.state_rows, meta);
    if (!s.wait && (s.check == kDeferred || s.check == kWarn)) {
      record_kernel<I><<<1, 1, 0, stream>>>(lk.v, meta, source, s.state_rows, s.check);
    }
  });
  DLRM_LAUNCH_CHECK();
  if (s.wait || s.check == kImmediate) {
    int64_t* h = pinned_status();
    DLRM_CUDA_CHECK(
        cudaMemcpyAsync(h, meta, kStatus * sizeof(int64_t), cudaMemcpyDeviceToHost, stream));
    DLRM_CUDA_CHECK(cudaStreamSynchronize(stream));
    if ((h[0] | h[1] | h[2] | h[3]) != 0) {
      throw_cpu_error(s, weights_offsets, dim_offsets, rows, indices, offsets, pooling, h);
    }
    lk.total_values = h[5];
  }
  return lk;
}

}  // namespace dlrm_ops::cuda

STABLE_TORCH_LIBRARY_IMPL(dlrm_ops, CUDA, m) {
  m.impl("take_lookup_error", TORCH_BOX(&dlrm_ops::cuda::take_lookup_error));
}
