// Enums and helpers shared by the CPU and CUDA kernels and their checks
// (host and device code alike; no torch headers). Python mirrors the enums
// in dlrm_ops/ops.py, checked against dlrm_ops._C by tests/test_structure.py.
#pragma once

#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>

#ifdef __CUDACC__
#define DLRM_HOST_DEVICE __host__ __device__
#else
#define DLRM_HOST_DEVICE
#endif

namespace dlrm_ops {

// How a bag's rows are combined. Adding a mode: docs/architecture.md.
enum Pooling : int64_t { kSum = 0, kMean = 1 };

// Weight of each of a bag's `len` lookups (without per-sample weights).
DLRM_HOST_DEVICE inline float pooling_scale(int64_t pooling, int64_t len) {
  return pooling == kMean && len > 0 ? 1.f / static_cast<float>(len) : 1.f;
}

// When a bad lookup (an index out of its table's range, bad offsets or table
// metadata) is reported on CUDA (docs/errors.md). The CPU raises at the call
// in every mode. In every mode a bad lookup reads and writes nothing: it adds
// nothing to its bag and updates no row; a call with bad offsets or metadata
// outputs zeros and updates nothing.
//   kDeferred: recorded on the device, raised by dlrm_ops.check_errors();
//   kImmediate: the host waits for the check and raises at the call;
//   kWarn: recorded, check_errors() warns; kOff: not recorded.
enum Check : int64_t { kDeferred = 0, kImmediate = 1, kWarn = 2, kOff = 3 };

// What a recorded CUDA lookup error is about (csrc/cuda/lookups.cu).
enum ErrorKind : int64_t { kNone = 0, kTables = 1, kOffsets = 2, kIndex = 3, kStateRows = 4 };

// Pair order of the dot interaction: facebookresearch/dlrm's i > j (tril) or
// torchrec's i < j (triu), row-major.
enum InteractionOrder : int64_t { kTril = 0, kTriu = 1 };

// Pairs of F features (with each feature and itself if `self`).
DLRM_HOST_DEVICE inline int64_t interaction_pairs(int64_t F, bool self) {
  return self ? F * (F + 1) / 2 : F * (F - 1) / 2;
}

// Positions in the float64 `hparams` tensor of the fused optimizers.
enum HParam : int { kLr = 0, kEps = 1, kBeta1 = 2, kBeta2 = 3, kWeightDecay = 4, kNumHParams = 5 };

// Bytes of a packed row of D values, the layouts of
// torch.ops.quantized.embedding_bag_{byte,4bit}_prepack:
//   8-bit: [D x uint8][fp32 scale][fp32 bias]
//   4-bit: [D/2 bytes, even column in the low nibble][fp16 scale][fp16 bias]
DLRM_HOST_DEVICE inline int64_t packed_row_bytes(int64_t D, int64_t bits) {
  return bits == 8 ? D + 8 : D / 2 + 4;
}

// Whether n items of `item` units each, starting at unit `start`, fit in a
// buffer of `size` units (all >= 0). Sizes and offsets come from user tensors,
// so the product is never formed: no int64 overflow for any inputs.
DLRM_HOST_DEVICE inline bool span_fits(int64_t start, int64_t n, int64_t item, int64_t size) {
  return start <= size && (n == 0 || item <= (size - start) / n);
}

// T tables in one flat buffer, FBGEMM's table-batched layout. Table t holds
// rows[t] rows of D_t = dim_offsets[t+1] - dim_offsets[t] elements starting at
// element weights_offsets[t]; its pooled vectors fill output columns
// [dim_offsets[t], dim_offsets[t+1]). Host pointers.
struct TableBatch {
  int64_t T;
  int64_t B;
  const int64_t* weights_offsets;
  const int64_t* dim_offsets;
  const int64_t* rows;
};

// Bag b of table t is indices[offsets[t*B+b] : offsets[t*B+b+1]]; offsets
// were validated (start 0, non-decreasing, end numel(indices)). Host
// pointers (the CUDA ops' device view is cuda::LookupView).
struct HostLookups {
  const void* indices;
  const void* offsets;
  bool int64;                       // dtype of indices and offsets
  const float* per_sample_weights;  // [N] or nullptr
  int64_t pooling;
  bool one_per_bag = false;  // every bag holds exactly one lookup
};

// The dot interaction's F = T + 1 features per sample: x0 = dense[b] ([D])
// and x1..xT = the T consecutive D-vectors at sparse + b * sparse_stride.
struct InteractionArgs {
  int64_t B, T, D;
  bool self_interaction;
  int64_t order;
  torch::headeronly::ScalarType dtype;  // of dense, sparse, output and gradients
  const void* dense;
  const void* sparse;
  int64_t sparse_stride;  // elements between samples in sparse
};

}  // namespace dlrm_ops
