// Elementwise screen (screen_cpu.h): the scalar rule of screen.h over tensors, for the tests.
#include "screen_cpu.h"

#include "screen.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

namespace hdlm {

std::tuple<at::Tensor, at::Tensor, at::Tensor> screen_scores_cpu(const at::Tensor& word_a, const at::Tensor& word_b,
                                                                 const at::Tensor& logit, double scale) {
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
    noise_data[i] = screen_noise(static_cast<uint32_t>(a_data[i]), static_cast<uint32_t>(b_data[i]));
    const ScreenBounds bounds = screen_bounds(l_data[i], noise_data[i], scale_float);
    lo_data[i] = bounds.lo;
    hi_data[i] = bounds.hi;
  }
  return {noise, lo, hi};
}

}  // namespace hdlm
