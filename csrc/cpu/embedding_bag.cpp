// CPU ops of the table-batched embedding bag: argument checks, output
// allocation, and the call into the per-ISA kernels (embedding_bag_kernel.cpp).
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <optional>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/embedding_bag_kernel.h"
#include "embedding_bag_checks.h"
#include "lookups.h"

namespace dlrm_ops {
namespace {

using cpu::EmbeddingBagArgs;

struct Prepared {
  ValidatedLookups v;
  EmbeddingBagArgs args;
};

Prepared prepare(const Tensor& weights, const Tensor& weights_offsets, const Tensor& dim_offsets,
                 const Tensor& rows, const Tensor& indices, const Tensor& offsets, int64_t pooling,
                 const std::optional<Tensor>& per_sample_weights) {
  check_cpu(weights, "weights");
  check_dtype(weights, "weights", {ScalarType::Float, ScalarType::Half, ScalarType::BFloat16});
  check_contiguous(weights, "weights");
  ValidatedLookups v = validate_lookups(weights, "weights", weights_offsets, dim_offsets, rows,
                                        indices, offsets, pooling, per_sample_weights);
  check_tables_fit(v.tb, weights.numel(), 0, "weights");
  EmbeddingBagArgs args{v.tb, v.lk, weights.scalar_type(), weights.const_data_ptr()};
  return Prepared{std::move(v), args};
}

void check_grad_output(const Tensor& grad_output, const Tensor& weights, const Prepared& p) {
  dlrm_ops::check_grad_output(grad_output, weights, p.args.tb.B,
                              p.args.tb.dim_offsets[p.args.tb.T]);
}

// The forward op on the kernels of Stub: embedding_bag_forward on the plain
// forward's, forward_with_optimizer on the training forward's (which also
// holds its sorted lookups for the update).
template <cpu::DispatchStub<cpu::ForwardFn>& Stub>
Tensor pooled(Tensor weights, Tensor weights_offsets, Tensor dim_offsets, Tensor rows,
              Tensor indices, Tensor offsets, int64_t pooling,
              std::optional<Tensor> per_sample_weights, int64_t total_dim, bool /*sparse*/,
              int64_t check) {
  check_mode(check);
  Prepared p = prepare(weights, weights_offsets, dim_offsets, rows, indices, offsets, pooling,
                       per_sample_weights);
  const auto& tb = p.args.tb;
  DLRM_CHECK(total_dim == tb.dim_offsets[tb.T],
             "total_dim must equal dim_offsets[-1] = ", tb.dim_offsets[tb.T], ", got ", total_dim);
  // The training forward's backward is the fused update: refuse shared rows now.
  if (&Stub == &cpu::embedding_bag_train_forward_stub) check_tables_disjoint(tb, "weights");
  Tensor out = torch::stable::new_empty(weights, {tb.B, tb.dim_offsets[tb.T]});
  const int64_t bad = Stub(p.args, out.mutable_data_ptr());
  if (bad >= 0) throw_bad_index(p.v, bad);
  return out;
}

Tensor embedding_bag_backward_dense(Tensor grad_output, Tensor weights, Tensor weights_offsets,
                                    Tensor dim_offsets, Tensor rows, Tensor indices, Tensor offsets,
                                    int64_t pooling, std::optional<Tensor> per_sample_weights,
                                    int64_t check) {
  check_mode(check);
  Prepared p = prepare(weights, weights_offsets, dim_offsets, rows, indices, offsets, pooling,
                       per_sample_weights);
  check_grad_output(grad_output, weights, p);
  check_tables_disjoint(p.args.tb, "weights");
  Tensor grad_weight = torch::stable::new_zeros(weights, weights.sizes());
  const int64_t bad = cpu::embedding_bag_backward_dense_stub(p.args, grad_output.const_data_ptr(),
                                                             grad_weight.mutable_data_ptr());
  if (bad >= 0) throw_bad_index(p.v, bad);
  return grad_weight;
}

Tensor embedding_bag_backward_sparse(Tensor grad_output, Tensor weights, Tensor weights_offsets,
                                     Tensor dim_offsets, Tensor rows, Tensor indices,
                                     Tensor offsets, int64_t pooling,
                                     std::optional<Tensor> per_sample_weights, int64_t check) {
  check_mode(check);
  Prepared p = prepare(weights, weights_offsets, dim_offsets, rows, indices, offsets, pooling,
                       per_sample_weights);
  check_grad_output(grad_output, weights, p);
  const auto& tb = p.args.tb;
  std::vector<int64_t> value_offsets(tb.T);
  int64_t total = 0;
  for (int64_t t = 0; t < tb.T; ++t) {
    value_offsets[t] = total;
    int64_t n;
    DLRM_CHECK(
        !__builtin_mul_overflow(offset_at(p.v.lk, (t + 1) * tb.B) - offset_at(p.v.lk, t * tb.B),
                                tb.dim_offsets[t + 1] - tb.dim_offsets[t], &n) &&
            !__builtin_add_overflow(total, n, &total),
        "the sparse gradient of weights has more than 2^63 values");
  }
  Tensor values = torch::stable::new_empty(weights, {total});
  const int64_t bad = cpu::embedding_bag_backward_sparse_stub(
      p.args, grad_output.const_data_ptr(), value_offsets.data(), values.mutable_data_ptr());
  if (bad >= 0) throw_bad_index(p.v, bad);
  return values;
}

Tensor embedding_bag_per_sample_weights_grad(Tensor grad_output, Tensor weights,
                                             Tensor weights_offsets, Tensor dim_offsets,
                                             Tensor rows, Tensor indices, Tensor offsets,
                                             int64_t pooling, int64_t check) {
  check_mode(check);
  Prepared p =
      prepare(weights, weights_offsets, dim_offsets, rows, indices, offsets, pooling, std::nullopt);
  check_grad_output(grad_output, weights, p);
  Tensor grad = torch::stable::new_empty(weights, {p.v.N}, ScalarType::Float);
  const int64_t bad = cpu::embedding_bag_psw_grad_stub(p.args, grad_output.const_data_ptr(),
                                                       grad.mutable_data_ptr<float>());
  if (bad >= 0) throw_bad_index(p.v, bad);
  return grad;
}

void embedding_bag_update_(Tensor grad_output, Tensor weights, Tensor momentum1, Tensor momentum2,
                           Tensor step, Tensor weights_offsets, Tensor dim_offsets, Tensor rows,
                           Tensor indices, Tensor offsets, int64_t pooling,
                           std::optional<Tensor> per_sample_weights, Tensor hparams,
                           int64_t optimizer, bool stochastic_rounding, int64_t check) {
  check_mode(check);
  Prepared p = prepare(weights, weights_offsets, dim_offsets, rows, indices, offsets, pooling,
                       per_sample_weights);
  check_grad_output(grad_output, weights, p);
  const auto& tb = p.args.tb;
  std::vector<int64_t> row_offsets(tb.T);
  int64_t total_rows = 0;
  for (int64_t t = 0; t < tb.T; ++t) {
    row_offsets[t] = total_rows;
    total_rows += tb.rows[t];
  }
  check_optimizer_args(weights, momentum1, momentum2, step, hparams, optimizer, total_rows);
  check_tables_disjoint(tb, "weights");
  const double* hp = hparams.const_data_ptr<double>();
  check_hparams(hp, optimizer);
  const bool has_m1 = momentum1.numel() > 0;
  int64_t* step_ptr = step.mutable_data_ptr<int64_t>();
  cpu::UpdateArgs args{p.args,
                       grad_output.const_data_ptr(),
                       weights.mutable_data_ptr(),
                       has_m1 ? momentum1.mutable_data_ptr<float>() : nullptr,
                       momentum2.numel() > 0 ? momentum2.mutable_data_ptr<float>() : nullptr,
                       row_offsets.data(),
                       optimizer,
                       make_hyper(hp, *step_ptr + 1),
                       *step_ptr + 1,
                       stochastic_rounding};
  const int64_t bad = cpu::embedding_bag_update_stub(args);
  if (bad >= 0) throw_bad_index(p.v, bad);
  *step_ptr += 1;
}

// The CPU raises a bad lookup at the call: there is never an error to take.
Tensor take_lookup_error(Tensor device) {
  check_cpu(device, "device");
  return torch::stable::new_zeros(device, {9}, ScalarType::Long);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(dlrm_ops, CPU, m) {
  m.impl("take_lookup_error", TORCH_BOX(&take_lookup_error));
  m.impl("embedding_bag_forward_with_optimizer",
         TORCH_BOX(&forward_with_optimizer<&pooled<cpu::embedding_bag_train_forward_stub>>));
  m.impl("embedding_bag_update_", TORCH_BOX(&embedding_bag_update_));
  m.impl("embedding_bag_forward", TORCH_BOX(&pooled<cpu::embedding_bag_forward_stub>));
  m.impl("embedding_bag_backward_dense", TORCH_BOX(&embedding_bag_backward_dense));
  m.impl("embedding_bag_backward_sparse", TORCH_BOX(&embedding_bag_backward_sparse));
  m.impl("embedding_bag_per_sample_weights_grad",
         TORCH_BOX(&embedding_bag_per_sample_weights_grad));
}

}  // namespace dlrm_ops

namespace dlrm_ops::cpu {
DispatchStub<ScanOffsetsFn> scan_offsets_stub;
DispatchStub<ForwardFn> embedding_bag_forward_stub;
DispatchStub<ForwardFn> embedding_bag_train_forward_stub;
DispatchStub<UpdateFn> embedding_bag_update_stub;
DispatchStub<BackwardDenseFn> embedding_bag_backward_dense_stub;
DispatchStub<BackwardSparseFn> embedding_bag_backward_sparse_stub;
DispatchStub<PerSampleWeightsGradFn> embedding_bag_psw_grad_stub;
}  // namespace dlrm_ops::cpu
