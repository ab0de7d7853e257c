// Python bindings of the CUDA extension (module cosmos_fast._C, or cosmos_fast_C when JIT-compiled).
#include <torch/extension.h>

#include <vector>

namespace cosmos_fast {
void ema_update_cuda(const std::vector<at::Tensor>& teacher, const std::vector<at::Tensor>& student,
                     double momentum, const std::vector<at::Tensor>& bf16_copy);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "cosmos_fast CUDA kernels";
  m.def("ema_update", &cosmos_fast::ema_update_cuda,
        "teacher <- m teacher + (1 - m) student over tensor lists, in one launch (optionally a bf16 copy)",
        pybind11::arg("teacher"), pybind11::arg("student"), pybind11::arg("momentum"),
        pybind11::arg("bf16_copy"));
}
