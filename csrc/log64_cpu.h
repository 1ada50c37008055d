// The float64 functions of log64.h applied elementwise to CPU tensors, for the tests that check them
// bit for bit against their Python twins (hdlm_kernels/sampling/log64.py), and their constants.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace hdlm {

// log64 (gumbel = false) or gumbel_noise (gumbel = true) of every element of a float64 CPU tensor; same shape.
at::Tensor log64_cpu(const at::Tensor& x, bool gumbel);

// exp64 of every element of a float64 CPU tensor; same shape.
at::Tensor exp64_cpu(const at::Tensor& x);

// The constants of log64.h: the 11 Horner coefficients C[0..10], then LN2_HI and LN2_LO.
std::vector<double> log64_constants();

// The constants of exp64 in log64.h: E[2..5] = 1/n!, 64 / ln 2, ln 2 / 64 (high and low parts), EXP64_MIN,
// then the table 2^(j/64) = high[j] + low[j]: the 64 high parts, the 64 low parts.
std::vector<double> exp64_constants();

}  // namespace hdlm
