// dlrm_ops._C: what was built and what the running CPU uses. No tensors here;
// the ops live in the stable-ABI library _kernels.
#include <pybind11/pybind11.h>

#include "cpu/dispatch.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "dlrm_ops build information";
  m.def("build_info", [] {
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
  }, "Version, torch it was built against, CPU instruction set in use, CUDA or not.");
  m.def("cpu_capability", [] {
    return dlrm_ops::cpu::capability_name(dlrm_ops::cpu::capability());
  });
}
