// Python bindings of the CUDA kernels in lro_kernels.cu (built by lowrank_optim/kernels/cuda_ext.py).
#include <torch/extension.h>

#include <vector>

namespace lro {
at::Tensor stochastic_round_bf16(const at::Tensor& x, int64_t seed);
std::vector<at::Tensor> quantize_grouped(const at::Tensor& x, int64_t levels, int64_t group, bool stochastic,
                                         int64_t seed);
at::Tensor dequantize_int4(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero, int64_t n,
                           int64_t group, at::ScalarType dtype);
}  // namespace lro

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lowrank-optim CUDA kernels: stochastic rounding, grouped min-max quantization, INT4 dequantize";
  m.def("stochastic_round_bf16", &lro::stochastic_round_bf16, "float32 -> bfloat16 by stochastic rounding",
        pybind11::arg("x"), pybind11::arg("seed"));
  m.def("quantize_grouped", &lro::quantize_grouped, "grouped min-max codes, scale, zero",
        pybind11::arg("x"), pybind11::arg("levels"), pybind11::arg("group"), pybind11::arg("stochastic"),
        pybind11::arg("seed"));
  m.def("dequantize_int4", &lro::dequantize_int4, "fused INT4 unpack + dequantize", pybind11::arg("packed"),
        pybind11::arg("scale"), pybind11::arg("zero"), pybind11::arg("n"), pybind11::arg("group"),
        pybind11::arg("dtype"));
}
