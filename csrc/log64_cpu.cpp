// log64.h's functions over CPU tensors (see log64_cpu.h), compiled like the samplers (-ffp-contract=off).
#include "log64_cpu.h"

#include "log64.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

namespace hdlm {
namespace {

// f of every element of the float64 CPU tensor x, in parallel; `name` for the error.
template <typename Function>
at::Tensor map_float64(const at::Tensor& x, const char* name, Function f) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kDouble, name, ": x must be a float64 CPU tensor, got ",
              x.scalar_type(), " on ", x.device());
  const at::Tensor x_contiguous = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const double* in = x_contiguous.const_data_ptr<double>();
  double* result = out.mutable_data_ptr<double>();
  at::parallel_for(0, x_contiguous.numel(), 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      result[i] = f(in[i]);
    }
  });
  return out;
}

}  // namespace

at::Tensor log64_cpu(const at::Tensor& x, bool gumbel) {
  return map_float64(x, "log64_cpu", [gumbel](double v) { return gumbel ? gumbel_noise(v) : log64(v); });
}

at::Tensor exp64_cpu(const at::Tensor& x) {
  return map_float64(x, "exp64_cpu", [](double v) { return exp64(v); });
}

std::vector<double> log64_constants() {
  using namespace log64_detail;
  return {kC0, kC1, kC2, kC3, kC4, kC5, kC6, kC7, kC8, kC9, kC10, kLn2Hi, kLn2Lo};
}

std::vector<double> exp64_constants() {
  using namespace log64_detail;
  std::vector<double> constants = {kE2, kE3, kE4, kE5, kInvLn2Times64, kLn2Over64Hi, kLn2Over64Lo, kExp64Min};
  constants.insert(constants.end(), std::begin(kExpTableHi), std::end(kExpTableHi));
  constants.insert(constants.end(), std::begin(kExpTableLo), std::end(kExpTableLo));
  return constants;
}

}  // namespace hdlm
