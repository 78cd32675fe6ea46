// Schemas of every dlrm_ops operator. Kernels register per device in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; autograd and fake (meta) kernels are
// registered in Python (dlrm_ops/_meta.py, dlrm_ops/ops.py).
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(dlrm_ops, m) {
  // Table-batched embedding bag (csrc/cpu/embedding_bag.cpp). `total_dim`
  // (= dim_offsets[-1]) gives fake kernels the output width; `sparse` only
  // selects the layout of the weight gradient, as in aten::embedding_bag.
  m.def(
      "embedding_bag_forward(Tensor weights, Tensor weights_offsets, Tensor dim_offsets, "
      "Tensor rows, Tensor indices, Tensor offsets, int pooling, Tensor? per_sample_weights, "
      "int total_dim, bool sparse=False) -> Tensor");
  m.def(
      "embedding_bag_backward_dense(Tensor grad_output, Tensor weights, Tensor weights_offsets, "
      "Tensor dim_offsets, Tensor rows, Tensor indices, Tensor offsets, int pooling, "
      "Tensor? per_sample_weights) -> Tensor");
  m.def(
      "embedding_bag_backward_sparse(Tensor grad_output, Tensor weights, Tensor weights_offsets, "
      "Tensor dim_offsets, Tensor rows, Tensor indices, Tensor offsets, int pooling, "
      "Tensor? per_sample_weights) -> Tensor");
  m.def(
      "embedding_bag_per_sample_weights_grad(Tensor grad_output, Tensor weights, "
      "Tensor weights_offsets, Tensor dim_offsets, Tensor rows, Tensor indices, Tensor offsets, "
      "int pooling) -> Tensor");
}
