// Schemas of every dlrm_ops operator. Kernels register per device in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; autograd and fake (meta) kernels are
// registered in Python (dlrm_ops/ops.py).
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(dlrm_ops, m) {
  // Table-batched embedding bag (csrc/cpu/embedding_bag.cpp). `total_dim`
  // (= dim_offsets[-1]) gives fake kernels the output width; `sparse` only
  // selects the layout of the weight gradient, as in aten::embedding_bag.
  // `check` (every op that takes lookups) is when CUDA reports a bad lookup
  // (csrc/kernel_common.h's Check); take_lookup_error returns and clears the
  // error recorded on the device of `device` (csrc/cuda/lookups.cu).
  m.def(
      "embedding_bag_forward(Tensor weights, Tensor weights_offsets, Tensor dim_offsets, "
      "Tensor rows, Tensor indices, Tensor offsets, int pooling, Tensor? per_sample_weights, "
      "int total_dim, bool sparse=False, int check=0) -> Tensor");
  // Same forward; its autograd applies the optimizer in place instead of
  // returning a weight gradient (dlrm_ops/ops.py). `optimizer` is 1 sgd,
  // 2 adagrad, 3 rowwise_adagrad, 4 adam; hparams = [lr, eps, beta1, beta2,
  // weight_decay] (float64).
  m.def(
      "embedding_bag_forward_with_optimizer(Tensor weights, Tensor weights_offsets, "
      "Tensor dim_offsets, Tensor rows, Tensor indices, Tensor offsets, int pooling, "
      "Tensor? per_sample_weights, int total_dim, Tensor momentum1, Tensor momentum2, "
      "Tensor step, Tensor hparams, int optimizer, bool stochastic_rounding, int check=0) "
      "-> Tensor");
  m.def(
      "embedding_bag_update_(Tensor grad_output, Tensor(a!) weights, Tensor(b!) momentum1, "
      "Tensor(c!) momentum2, Tensor(d!) step, Tensor weights_offsets, Tensor dim_offsets, "
      "Tensor rows, Tensor indices, Tensor offsets, int pooling, Tensor? per_sample_weights, "
      "Tensor hparams, int optimizer, bool stochastic_rounding, int check=0) -> ()");
  m.def("take_lookup_error(Tensor device) -> Tensor");
  m.def(
      "embedding_bag_backward_dense(Tensor grad_output, Tensor weights, Tensor weights_offsets, "
      "Tensor dim_offsets, Tensor rows, Tensor indices, Tensor offsets, int pooling, "
      "Tensor? per_sample_weights, int check=0) -> Tensor");
  m.def(
      "embedding_bag_backward_sparse(Tensor grad_output, Tensor weights, Tensor weights_offsets, "
      "Tensor dim_offsets, Tensor rows, Tensor indices, Tensor offsets, int pooling, "
      "Tensor? per_sample_weights, int check=0) -> Tensor");
  m.def(
      "embedding_bag_per_sample_weights_grad(Tensor grad_output, Tensor weights, "
      "Tensor weights_offsets, Tensor dim_offsets, Tensor rows, Tensor indices, Tensor offsets, "
      "int pooling, int check=0) -> Tensor");

  // Pairwise dot interaction (csrc/cpu/interaction.cpp): order 0 tril, 1 triu.
  m.def(
      "dot_interaction(Tensor dense, Tensor sparse, bool self_interaction=False, int order=0) -> "
      "Tensor");
  m.def(
      "dot_interaction_backward(Tensor grad_output, Tensor dense, Tensor sparse, "
      "bool self_interaction, int order) -> (Tensor, Tensor)");

  // Row-wise quantized embeddings (csrc/cpu/quantized_embedding.cpp), in the
  // byte layouts of quantized::embedding_bag_{byte,4bit}_prepack.
  m.def("quantize_rowwise(Tensor weight, int bits) -> Tensor");
  m.def("dequantize_rowwise(Tensor packed, int bits, ScalarType? dtype=None) -> Tensor");
  m.def(
      "quantized_embedding_bag_forward(Tensor packed, Tensor weights_offsets, "
      "Tensor dim_offsets, Tensor rows, Tensor indices, Tensor offsets, int pooling, "
      "Tensor? per_sample_weights, int total_dim, int bits, ScalarType? output_dtype=None, "
      "int check=0) -> Tensor");
}
