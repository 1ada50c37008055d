// Elementwise access to the screening rule (csrc/screen.h) for the tests of the bound
// (tests/test_screen_math.py, docs/sampling-screen.md).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace hdlm {

// For words (int64 tensors of uint32 values, one shape) and float32 logits of the same shape: the cheap
// noise screen_noise_fast(word_a, word_b) (the CPU tiles' noise; screen_noise with atanh = true) and the interval
// screen_bounds(logit, noise, scale), all float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> screen_scores_cpu(const at::Tensor& word_a, const at::Tensor& word_b,
                                                                 const at::Tensor& logit, double scale, bool atanh);

// screen_noise_bound(word_a) (screen.h) of every word of an int64 tensor holding uint32 values, float32, same
// shape: the prefilter's upper bound of the exact noise of every uniform whose first word is word_a.
at::Tensor screen_noise_bound_cpu(const at::Tensor& word_a);

// The words of Philox pairs first_pair .. first_pair + 127 of `stream` from the AVX2 tile stage
// (philox_tile_avx2), as an int64 tensor [4, 128]; an error where the processor lacks AVX2.
at::Tensor screen_philox_words_cpu(uint64_t seed, int64_t step, int64_t stream, uint64_t first_pair);

}  // namespace hdlm
