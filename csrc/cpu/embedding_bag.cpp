// CPU ops of the table-batched embedding bag: argument checks, output
// allocation, and the call into the per-ISA kernels (embedding_bag_kernel.cpp).
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <optional>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/embedding_bag_kernel.h"

namespace dlrm_ops {
namespace {

using cpu::EmbeddingBagArgs;

// Validated views of the op arguments plus owners of any converted copies.
struct Prepared {
  EmbeddingBagArgs args;
  int64_t N;
  Tensor psw_f32;  // per_sample_weights as contiguous fp32, kept alive
};

template <typename I>
void check_offsets(const I* off, int64_t T, int64_t B, int64_t N) {
  DLRM_CHECK(off[0] == 0, "offsets[0] must be 0, got ", static_cast<int64_t>(off[0]));
  for (int64_t i = 1; i <= T * B; ++i) {
    if (off[i] < off[i - 1]) {
      DLRM_CHECK(false, "offsets must be non-decreasing, but offsets[", i, "] = ",
                 static_cast<int64_t>(off[i]), " < offsets[", i - 1, "] = ",
                 static_cast<int64_t>(off[i - 1]), " (table ", (i - 1) / B, ", bag ",
                 (i - 1) % B, ")");
    }
  }
  DLRM_CHECK(off[T * B] == N, "offsets[-1] must equal the number of indices (", N, "), got ",
             static_cast<int64_t>(off[T * B]));
}

Prepared prepare(const Tensor& weights, const Tensor& weights_offsets, const Tensor& dim_offsets,
                 const Tensor& rows, const Tensor& indices, const Tensor& offsets, int64_t pooling,
                 const std::optional<Tensor>& per_sample_weights) {
  check_cpu(weights, "weights");
  check_dtype(weights, "weights", {ScalarType::Float, ScalarType::Half, ScalarType::BFloat16});
  check_contiguous(weights, "weights");
  for (auto [t, name] : {std::pair{&weights_offsets, "weights_offsets"},
                         std::pair{&dim_offsets, "dim_offsets"}, std::pair{&rows, "rows"}}) {
    check_cpu(*t, name);
    check_dtype(*t, name, {ScalarType::Long});
    check_dim(*t, name, 1);
    check_contiguous(*t, name);
  }
  const int64_t T = rows.numel();
  DLRM_CHECK(T >= 1, "rows must list at least one table");
  DLRM_CHECK(weights_offsets.numel() == T, "weights_offsets must have one entry per table (", T,
             "), got ", weights_offsets.numel());
  DLRM_CHECK(dim_offsets.numel() == T + 1, "dim_offsets must have T+1 = ", T + 1,
             " entries, got ", dim_offsets.numel());
  const int64_t* woff = weights_offsets.const_data_ptr<int64_t>();
  const int64_t* doff = dim_offsets.const_data_ptr<int64_t>();
  const int64_t* nrows = rows.const_data_ptr<int64_t>();
  DLRM_CHECK(doff[0] == 0, "dim_offsets[0] must be 0");
  for (int64_t t = 0; t < T; ++t) {
    const int64_t D = doff[t + 1] - doff[t];
    DLRM_CHECK(D >= 1, "table ", t, " must have dim >= 1, dim_offsets gives ", D);
    DLRM_CHECK(nrows[t] >= 0 && nrows[t] < (int64_t{1} << 32), "table ", t,
               " must have 0 <= rows < 2^32, got ", nrows[t]);
    DLRM_CHECK(woff[t] >= 0 && woff[t] + nrows[t] * D <= weights.numel(), "table ", t,
               " (", nrows[t], " x ", D, " at element ", woff[t],
               ") does not fit in weights of ", weights.numel(), " elements");
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
  const int64_t B = (offsets.numel() - 1) / T;
  const int64_t N = indices.numel();
  DLRM_CHECK(B < (int64_t{1} << 31), "batch size must be < 2^31, got ", B);
  const bool int64 = indices.scalar_type() == ScalarType::Long;
  if (int64) check_offsets(offsets.const_data_ptr<int64_t>(), T, B, N);
  else check_offsets(offsets.const_data_ptr<int32_t>(), T, B, N);
  {
    // Each table's lookups are addressed by a 32-bit position (sorted_lookups.h).
    std::vector<int64_t> starts(T + 1);
    for (int64_t t = 0; t <= T; ++t) {
      starts[t] = int64 ? offsets.const_data_ptr<int64_t>()[t * B]
                        : offsets.const_data_ptr<int32_t>()[t * B];
    }
    for (int64_t t = 0; t < T; ++t) {
      DLRM_CHECK(starts[t + 1] - starts[t] < (int64_t{1} << 32), "table ", t,
                 " has more than 2^32 indices in one call");
    }
  }

  DLRM_CHECK(pooling == cpu::kSum || pooling == cpu::kMean,
             "pooling must be 0 (sum) or 1 (mean), got ", pooling);
  Prepared p;
  p.N = N;
  if (per_sample_weights.has_value()) {
    const Tensor& psw = *per_sample_weights;
    DLRM_CHECK(pooling == cpu::kSum, "per_sample_weights is only supported with sum pooling");
    check_cpu(psw, "per_sample_weights");
    check_dtype(psw, "per_sample_weights", {ScalarType::Float, ScalarType::Half, ScalarType::BFloat16});
    check_dim(psw, "per_sample_weights", 1);
    DLRM_CHECK(psw.numel() == N, "per_sample_weights must have one entry per index (", N,
               "), got ", psw.numel());
    p.psw_f32 = torch::stable::contiguous(psw.scalar_type() == ScalarType::Float
                                              ? psw
                                              : torch::stable::to(psw, ScalarType::Float));
  }
  p.args = EmbeddingBagArgs{
      cpu::TableBatch{T, B, woff, doff, nrows},
      cpu::Lookups{indices.const_data_ptr(), offsets.const_data_ptr(), int64,
                   p.psw_f32.defined() ? p.psw_f32.const_data_ptr<float>() : nullptr, pooling},
      weights.scalar_type(), weights.const_data_ptr()};
  return p;
}

[[noreturn]] void throw_bad_index(const Prepared& p, const Tensor& indices, int64_t pos) {
  const auto& tb = p.args.tb;
  auto read = [&](const void* data, int64_t i) {
    return p.args.lk.int64 ? static_cast<const int64_t*>(data)[i]
                           : static_cast<int64_t>(static_cast<const int32_t*>(data)[i]);
  };
  int64_t bag = 0;  // last bag whose start is <= pos and that is non-empty
  int64_t lo = 0, hi = tb.T * tb.B - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (read(p.args.lk.offsets, mid) <= pos) lo = mid; else hi = mid - 1;
  }
  bag = lo;
  const int64_t t = bag / tb.B;
  DLRM_CHECK(false, "indices[", pos, "] = ", read(indices.const_data_ptr(), pos),
             " is out of range for table ", t, " with ", tb.rows[t], " rows (bag ",
             bag % tb.B, " of table ", t, ")");
  __builtin_unreachable();
}

void check_grad_output(const Tensor& grad_output, const Tensor& weights, const Prepared& p) {
  check_cpu(grad_output, "grad_output");
  DLRM_CHECK(grad_output.scalar_type() == weights.scalar_type(),
             "grad_output must have the dtype of weights");
  check_dim(grad_output, "grad_output", 2);
  check_contiguous(grad_output, "grad_output");
  DLRM_CHECK(grad_output.size(0) == p.args.tb.B &&
                 grad_output.size(1) == p.args.tb.dim_offsets[p.args.tb.T],
             "grad_output must have shape [", p.args.tb.B, ", ",
             p.args.tb.dim_offsets[p.args.tb.T], "]");
}

Tensor embedding_bag_forward(Tensor weights, Tensor weights_offsets, Tensor dim_offsets,
                             Tensor rows, Tensor indices, Tensor offsets, int64_t pooling,
                             std::optional<Tensor> per_sample_weights, int64_t total_dim,
                             bool /*sparse*/) {
  Prepared p = prepare(weights, weights_offsets, dim_offsets, rows, indices, offsets, pooling,
                       per_sample_weights);
  const auto& tb = p.args.tb;
  DLRM_CHECK(total_dim == tb.dim_offsets[tb.T], "total_dim must equal dim_offsets[-1] = ",
             tb.dim_offsets[tb.T], ", got ", total_dim);
  Tensor out = torch::stable::new_empty(weights, {tb.B, tb.dim_offsets[tb.T]});
  const int64_t bad = cpu::embedding_bag_forward_stub(p.args, out.mutable_data_ptr());
  if (bad >= 0) throw_bad_index(p, indices, bad);
  return out;
}

Tensor embedding_bag_backward_dense(Tensor grad_output, Tensor weights, Tensor weights_offsets,
                                    Tensor dim_offsets, Tensor rows, Tensor indices,
                                    Tensor offsets, int64_t pooling,
                                    std::optional<Tensor> per_sample_weights) {
  Prepared p = prepare(weights, weights_offsets, dim_offsets, rows, indices, offsets, pooling,
                       per_sample_weights);
  check_grad_output(grad_output, weights, p);
  Tensor grad_weight = torch::stable::new_zeros(weights, weights.sizes());
  const int64_t bad = cpu::embedding_bag_backward_dense_stub(p.args, grad_output.const_data_ptr(),
                                                             grad_weight.mutable_data_ptr());
  if (bad >= 0) throw_bad_index(p, indices, bad);
  return grad_weight;
}

Tensor embedding_bag_backward_sparse(Tensor grad_output, Tensor weights, Tensor weights_offsets,
                                     Tensor dim_offsets, Tensor rows, Tensor indices,
                                     Tensor offsets, int64_t pooling,
                                     std::optional<Tensor> per_sample_weights) {
  Prepared p = prepare(weights, weights_offsets, dim_offsets, rows, indices, offsets, pooling,
                       per_sample_weights);
  check_grad_output(grad_output, weights, p);
  const auto& tb = p.args.tb;
  std::vector<int64_t> value_offsets(tb.T);
  int64_t total = 0;
  for (int64_t t = 0; t < tb.T; ++t) {
    auto at = [&](int64_t i) {
      return p.args.lk.int64 ? static_cast<const int64_t*>(p.args.lk.offsets)[i]
                             : static_cast<int64_t>(static_cast<const int32_t*>(p.args.lk.offsets)[i]);
    };
    value_offsets[t] = total;
    total += (at((t + 1) * tb.B) - at(t * tb.B)) * (tb.dim_offsets[t + 1] - tb.dim_offsets[t]);
  }
  Tensor values = torch::stable::new_empty(weights, {total});
  cpu::embedding_bag_backward_sparse_stub(p.args, grad_output.const_data_ptr(),
                                          value_offsets.data(), values.mutable_data_ptr());
  return values;
}

Tensor embedding_bag_per_sample_weights_grad(Tensor grad_output, Tensor weights,
                                             Tensor weights_offsets, Tensor dim_offsets,
                                             Tensor rows, Tensor indices, Tensor offsets,
                                             int64_t pooling) {
  Prepared p = prepare(weights, weights_offsets, dim_offsets, rows, indices, offsets, pooling,
                       std::nullopt);
  check_grad_output(grad_output, weights, p);
  Tensor grad = torch::stable::new_empty(weights, {p.N}, ScalarType::Float);
  cpu::embedding_bag_psw_grad_stub(p.args, grad_output.const_data_ptr(),
                                   grad.mutable_data_ptr<float>());
  return grad;
}

Tensor embedding_bag_forward_with_optimizer(
    Tensor weights, Tensor weights_offsets, Tensor dim_offsets, Tensor rows, Tensor indices,
    Tensor offsets, int64_t pooling, std::optional<Tensor> per_sample_weights, int64_t total_dim,
    Tensor /*momentum1*/, Tensor /*momentum2*/, Tensor /*step*/, Tensor /*hparams*/,
    int64_t /*optimizer*/, bool /*stochastic_rounding*/) {
  return embedding_bag_forward(weights, weights_offsets, dim_offsets, rows, indices, offsets,
                               pooling, per_sample_weights, total_dim, false);
}

void check_state(const Tensor& t, const char* name, int64_t numel) {
  check_cpu(t, name);
  check_dtype(t, name, {ScalarType::Float});
  check_contiguous(t, name);
  DLRM_CHECK(t.numel() == numel, name, " must have ", numel, " elements for this optimizer, got ",
             t.numel());
}

void embedding_bag_update_(Tensor grad_output, Tensor weights, Tensor momentum1,
                           Tensor momentum2, Tensor step, Tensor weights_offsets,
                           Tensor dim_offsets, Tensor rows, Tensor indices, Tensor offsets,
                           int64_t pooling, std::optional<Tensor> per_sample_weights,
                           Tensor hparams, int64_t optimizer, bool stochastic_rounding) {
  Prepared p = prepare(weights, weights_offsets, dim_offsets, rows, indices, offsets, pooling,
                       per_sample_weights);
  check_grad_output(grad_output, weights, p);
  const auto& tb = p.args.tb;
  DLRM_CHECK(optimizer >= cpu::kSGD && optimizer <= cpu::kAdam,
             "optimizer must be 1 (sgd), 2 (adagrad), 3 (rowwise_adagrad) or 4 (adam), got ",
             optimizer);
  check_cpu(hparams, "hparams");
  check_dtype(hparams, "hparams", {ScalarType::Double});
  DLRM_CHECK(hparams.numel() == 5 && hparams.is_contiguous(),
             "hparams must hold [lr, eps, beta1, beta2, weight_decay]");
  check_cpu(step, "step");
  check_dtype(step, "step", {ScalarType::Long});
  DLRM_CHECK(step.numel() == 1, "step must have one element");
  std::vector<int64_t> row_offsets(tb.T);
  int64_t total_rows = 0;
  for (int64_t t = 0; t < tb.T; ++t) {
    row_offsets[t] = total_rows;
    total_rows += tb.rows[t];
  }
  const int64_t n1 = optimizer == cpu::kSGD ? 0
                     : optimizer == cpu::kRowwiseAdagrad ? total_rows
                                                          : weights.numel();
  check_state(momentum1, "momentum1", n1);
  check_state(momentum2, "momentum2", optimizer == cpu::kAdam ? weights.numel() : 0);
  const double* hp = hparams.const_data_ptr<double>();
  int64_t* step_ptr = step.mutable_data_ptr<int64_t>();
  cpu::UpdateArgs args{p.args,
                       grad_output.const_data_ptr(),
                       weights.mutable_data_ptr(),
                       n1 ? momentum1.mutable_data_ptr<float>() : nullptr,
                       optimizer == cpu::kAdam ? momentum2.mutable_data_ptr<float>() : nullptr,
                       row_offsets.data(),
                       optimizer,
                       {hp[0], hp[1], hp[2], hp[3], hp[4]},
                       *step_ptr + 1,
                       stochastic_rounding};
  const int64_t bad = cpu::embedding_bag_update_stub(args);
  if (bad >= 0) throw_bad_index(p, indices, bad);
  *step_ptr += 1;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(dlrm_ops, CPU, m) {
  m.impl("embedding_bag_forward_with_optimizer",
         TORCH_BOX(&embedding_bag_forward_with_optimizer));
  m.impl("embedding_bag_update_", TORCH_BOX(&embedding_bag_update_));
  m.impl("embedding_bag_forward", TORCH_BOX(&embedding_bag_forward));
  m.impl("embedding_bag_backward_dense", TORCH_BOX(&embedding_bag_backward_dense));
  m.impl("embedding_bag_backward_sparse", TORCH_BOX(&embedding_bag_backward_sparse));
  m.impl("embedding_bag_per_sample_weights_grad",
         TORCH_BOX(&embedding_bag_per_sample_weights_grad));
}

}  // namespace dlrm_ops

namespace dlrm_ops::cpu {
DispatchStub<ForwardFn> embedding_bag_forward_stub;
DispatchStub<UpdateFn> embedding_bag_update_stub;
DispatchStub<BackwardDenseFn> embedding_bag_backward_dense_stub;
DispatchStub<BackwardSparseFn> embedding_bag_backward_sparse_stub;
DispatchStub<PerSampleWeightsGradFn> embedding_bag_psw_grad_stub;
}  // namespace dlrm_ops::cpu
