// Python bindings of hdlm_kernels._C. Import torch before this module (it links against libc10).
#include <torch/extension.h>
#include <pybind11/stl.h>  // std::array <-> Python list, for philox4x32_10

#include "uniform53.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hdlm-kernels compiled operators (DESIGN.md §6); use them through hdlm_kernels.sampling";

#ifdef HDLM_WITH_CUDA
  m.attr("with_cuda") = pybind11::bool_(true);
#else
  m.attr("with_cuda") = pybind11::bool_(false);
#endif

  m.def("philox4x32_10", &hdlm::philox4x32_10_block, pybind11::arg("counter"), pybind11::arg("key"),
        "Philox4x32-10 of counter (4 uint32) under key (2 uint32) -> 4 uint32 words");
  m.def("uniform53_cpu", &hdlm::uniform53_cpu, pybind11::arg("seed"), pybind11::arg("step"),
        pybind11::arg("stream"), pybind11::arg("index"),
        "float64 uniforms of the int64 CPU tensor of element ids `index` (any shape), same shape");
#ifdef HDLM_WITH_CUDA
  m.def("uniform53_cuda", &hdlm::uniform53_cuda, pybind11::arg("seed"), pybind11::arg("step"),
        pybind11::arg("stream"), pybind11::arg("index"),
        "float64 uniforms of the int64 CUDA tensor of element ids `index` (any shape), same shape");
#endif
}
