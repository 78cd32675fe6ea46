// dlrm_ops._C: what was built and what the running CPU uses. No tensors here;
// the ops live in the stable-ABI library _kernels.
#include <pybind11/pybind11.h>

#include "cpu/dispatch.h"
#include "kernel_common.h"
#include "optimizers.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "dlrm_ops build information";
  m.def(
      "build_info",
      [] {
        py::dict info;
        info["version"] = DLRM_OPS_VERSION;
        info["torch_built_with"] = DLRM_OPS_TORCH_VERSION;
        info["build_type"] = DLRM_OPS_BUILD_TYPE;
        info["cuda"] = static_cast<bool>(DLRM_OPS_WITH_CUDA);
        info["cpu_capability"] = dlrm_ops::cpu::capability_name(dlrm_ops::cpu::capability());
#ifdef __VERSION__
        info["compiler"] = __VERSION__;
#endif
        return info;
      },
      "Version, torch it was built against, CPU instruction set in use, CUDA or not.");
  m.def("cpu_capability",
        [] { return dlrm_ops::cpu::capability_name(dlrm_ops::cpu::capability()); });
  // The kernels' enums and optimizer table, for the check that Python's
  // mirrors (dlrm_ops/ops.py, dlrm_ops/optimizers.py) agree.
  m.def("enums", [] {
    using namespace dlrm_ops;
    py::dict e;
    e["pooling"] = py::dict(py::arg("sum") = int64_t{kSum}, py::arg("mean") = int64_t{kMean});
    e["order"] = py::dict(py::arg("tril") = int64_t{kTril}, py::arg("triu") = int64_t{kTriu});
    e["hparam"] = py::dict(py::arg("lr") = int{kLr}, py::arg("eps") = int{kEps},
                           py::arg("beta1") = int{kBeta1}, py::arg("beta2") = int{kBeta2},
                           py::arg("weight_decay") = int{kWeightDecay});
    return e;
  });
  m.def(
      "optimizers",
      [] {
        using namespace dlrm_ops;
        py::list out;
        for (int64_t o = kFirstOptimizer; o <= kLastOptimizer; ++o) {
          with_rule(o, [&](auto r) {
            using R = decltype(r);
            out.append(py::dict(py::arg("name") = R::kName, py::arg("id") = int64_t{R::kId},
                                py::arg("momentum1") = static_cast<int>(R::kM1),
                                py::arg("momentum2") = static_cast<int>(R::kM2),
                                py::arg("hparams") = R::kHParams));
          });
        }
        return out;
      },
      "The fused optimizers: name, id, state layouts (0 none, 1 element, 2 row), "
      "hyperparameters read (bits of 1 << HParam).");
}
