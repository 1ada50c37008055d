// Elementwise screen (screen_cpu.h): the scalar rule of screen.h over tensors, for the tests.
#include "screen_cpu.h"

#include "cpu_isa.h"
#include "screen.h"
#include "screen_avx2.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

namespace hdlm {

std::tuple<at::Tensor, at::Tensor, at::Tensor> screen_scores_cpu(const at::Tensor& word_a, const at::Tensor& word_b,
                                                                 const at::Tensor& logit, double scale, bool atanh) {
  TORCH_CHECK(word_a.scalar_type() == at::kLong && word_b.scalar_type() == at::kLong,
              "screen_scores_cpu: word_a and word_b must be int64 tensors, got ", word_a.scalar_type(), " and ",
              word_b.scalar_type());
  TORCH_CHECK(logit.scalar_type() == at::kFloat, "screen_scores_cpu: logit must be a float32 tensor, got ",
              logit.scalar_type());
  TORCH_CHECK(word_a.device().is_cpu() && word_b.device().is_cpu() && logit.device().is_cpu(),
              "screen_scores_cpu: tensors must be on the CPU");
  TORCH_CHECK(word_a.sizes() == word_b.sizes() && word_a.sizes() == logit.sizes(),
              "screen_scores_cpu: word_a, word_b and logit must have one shape, got ", word_a.sizes(), ", ",
              word_b.sizes(), " and ", logit.sizes());
  const at::Tensor a = word_a.contiguous(), b = word_b.contiguous(), l = logit.contiguous();
  at::Tensor noise = at::empty(l.sizes(), l.options());
  at::Tensor lo = at::empty(l.sizes(), l.options());
  at::Tensor hi = at::empty(l.sizes(), l.options());
  const int64_t* a_data = a.const_data_ptr<int64_t>();
  const int64_t* b_data = b.const_data_ptr<int64_t>();
  const float* l_data = l.const_data_ptr<float>();
  float* noise_data = noise.mutable_data_ptr<float>();
  float* lo_data = lo.mutable_data_ptr<float>();
  float* hi_data = hi.mutable_data_ptr<float>();
  const float scale_float = static_cast<float>(scale);
  for (int64_t i = 0; i < l.numel(); ++i) {
    const uint32_t word_a = static_cast<uint32_t>(a_data[i]), word_b = static_cast<uint32_t>(b_data[i]);
    noise_data[i] = atanh ? screen_noise(word_a, word_b) : screen_noise_fast(word_a, word_b);
    const ScreenBounds bounds = screen_bounds(l_data[i], noise_data[i], scale_float);
    lo_data[i] = bounds.lo;
    hi_data[i] = bounds.hi;
  }
  return {noise, lo, hi};
}

at::Tensor screen_noise_bound_cpu(const at::Tensor& word_a) {
  TORCH_CHECK(word_a.scalar_type() == at::kLong, "screen_noise_bound_cpu: word_a must be an int64 tensor, got ",
              word_a.scalar_type());
  TORCH_CHECK(word_a.device().is_cpu(), "screen_noise_bound_cpu: word_a must be on the CPU");
  const at::Tensor a = word_a.contiguous();
  at::Tensor bound = at::empty(a.sizes(), a.options().dtype(at::kFloat));
  const int64_t* a_data = a.const_data_ptr<int64_t>();
  float* bound_data = bound.mutable_data_ptr<float>();
  for (int64_t i = 0; i < a.numel(); ++i) {
    bound_data[i] = screen_noise_bound(static_cast<uint32_t>(a_data[i]));
  }
  return bound;
}

at::Tensor screen_philox_words_cpu(uint64_t seed, int64_t step, int64_t stream, uint64_t first_pair) {
  TORCH_CHECK(cpu_has_avx2(), "screen_philox_words_cpu: needs AVX2, which this processor (or build) lacks");
  TORCH_CHECK(step >= 0, "screen_philox_words_cpu: step must be >= 0, got ", step);
  TORCH_CHECK(stream >= 0 && stream <= static_cast<int64_t>(UINT32_MAX),
              "screen_philox_words_cpu: stream must be in [0, 2^32), got ", stream);
  uint32_t words[4][kTilePairs];
  philox_tile_avx2(seed, static_cast<uint64_t>(step), static_cast<uint32_t>(stream), first_pair, words[0], words[1],
                   words[2], words[3]);
  at::Tensor out = at::empty({4, kTilePairs}, at::TensorOptions().dtype(at::kLong));
  int64_t* data = out.mutable_data_ptr<int64_t>();
  for (int w = 0; w < 4; ++w) {
    for (int p = 0; p < kTilePairs; ++p) {
      data[w * kTilePairs + p] = words[w][p];
    }
  }
  return out;
}

}  // namespace hdlm
