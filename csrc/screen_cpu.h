// Elementwise access to the screening rule (csrc/screen.h) for the tests of the bound
// (tests/test_screen_math.py, docs/sampling-screen.md).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace hdlm {

// For words (int64 tensors of uint32 values, one shape) and float32 logits of the same shape: the cheap
// noise screen_noise(word_a, word_b) and the interval screen_bounds(logit, noise, scale), all float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> screen_scores_cpu(const at::Tensor& word_a, const at::Tensor& word_b,
                                                                 const at::Tensor& logit, double scale);

}  // namespace hdlm
