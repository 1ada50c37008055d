// Declarations of the fused γ-hybrid step operators (docs/hybrid-step.md, "The fused form") shared by
// the bindings and the backends; the per-row and per-token arithmetic lives in hybrid_rule.h,
// gumbel_rule.h and log64.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <tuple>

namespace hdlm {

// One token per row after a reverse step of the γ-hybrid process, the reference backend's semantics
// (hdlm_kernels/sampling/hybrid.py, _hybrid_step_reference):
//   log_score    [R, V] float32 / float64 / float16 / bfloat16, any strides (read three times, never
//                copied or widened as a whole);
//   x            int64 [R], the current tokens in [0, V);
//   coefficients float64 [R, 6], c1..c6 of step_coefficients;
//   row_ids      int64 [R], the rows' identities (noise of element row_id * V + y of stream 0), >= 0 and
//                with row_id * V + V - 1 < 2^63;
//   mask_id      the MASK id in [0, V).
// Returns (tokens int64 [R], winning scores float64 [R]): the winning score is NaN for a row with a NaN
// or +inf log-score at a read entry (a real token other than x), and -inf (token 0) for a row without a
// token of positive weight. The caller raises for both.
std::tuple<at::Tensor, at::Tensor> hybrid_step_cpu(const at::Tensor& log_score, const at::Tensor& x,
                                                   const at::Tensor& coefficients, const at::Tensor& row_ids,
                                                   int64_t mask_id, uint64_t seed, int64_t step);
// hybrid_step_cpu plus, with count = true, the number of tokens per row whose exact score was computed
// (int64 [R]): the current cell and the screen's candidates (docs/sampling-screen.md, "The γ step"), or V for
// a row on the full exact race (float64 log-scores, a bad row, extreme constants).
std::tuple<at::Tensor, at::Tensor, at::Tensor> hybrid_step_counted_cpu(const at::Tensor& log_score, const at::Tensor& x,
                                                                    const at::Tensor& coefficients,
                                                                    const at::Tensor& row_ids, int64_t mask_id,
                                                                    uint64_t seed, int64_t step, bool count);
#ifdef HDLM_WITH_CUDA
// The same on CUDA tensors (all on log_score's device). The values of x and row_ids are not checked here
// (that would cost a device sync): the Python wrapper validates them.
std::tuple<at::Tensor, at::Tensor> hybrid_step_cuda(const at::Tensor& log_score, const at::Tensor& x,
                                                    const at::Tensor& coefficients, const at::Tensor& row_ids,
                                                    int64_t mask_id, uint64_t seed, int64_t step);
// hybrid_step_cuda plus, with count = true, the number of tokens per row whose exact score was computed, as
// hybrid_step_counted_cpu (the current cell and the screen's candidates, or V on the full race); an empty
// tensor otherwise. Without count it launches the kernels hybrid_step_cuda does (counting is a template flag).
std::tuple<at::Tensor, at::Tensor, at::Tensor> hybrid_step_counted_cuda(const at::Tensor& log_score,
                                                                     const at::Tensor& x,
                                                                     const at::Tensor& coefficients,
                                                                     const at::Tensor& row_ids, int64_t mask_id,
                                                                     uint64_t seed, int64_t step, bool count);
#endif

// Metadata checks shared by the backends: dtypes, ranks, sizes, devices and the scalars, named in the
// errors with the expected and the given value.
inline void check_hybrid_args(const at::Tensor& log_score, const at::Tensor& x, const at::Tensor& coefficients,
                              const at::Tensor& row_ids, int64_t mask_id, int64_t step,
                              c10::DeviceType expected_device) {
  const std::string device_name = c10::DeviceTypeName(expected_device);
  TORCH_CHECK(log_score.device().type() == expected_device, "hybrid_step: log_score must be on ", device_name,
              ", got a tensor on ", log_score.device());
  const at::ScalarType dtype = log_score.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "hybrid_step: log_score must have dtype float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(log_score.dim() == 2, "hybrid_step: log_score must have shape [R, V], got shape ", log_score.sizes());
  const int64_t num_rows = log_score.size(0);
  const int64_t vocab = log_score.size(1);
  // V < 2^31 keeps the fixed-point sums exact: V * 2^32 < 2^63.
  TORCH_CHECK(vocab >= 1 && vocab < (int64_t{1} << 31),
              "hybrid_step: log_score must have 1 <= V < 2^31 tokens, got V = ", vocab);
  TORCH_CHECK(x.scalar_type() == at::kLong && x.dim() == 1 && x.size(0) == num_rows,
              "hybrid_step: x must be an int64 tensor [R] = [", num_rows, "], got ", x.scalar_type(), " of shape ",
              x.sizes());
  TORCH_CHECK(coefficients.scalar_type() == at::kDouble && coefficients.dim() == 2 &&
                  coefficients.size(0) == num_rows && coefficients.size(1) == 6,
              "hybrid_step: coefficients must be a float64 tensor [R, 6] = [", num_rows, ", 6], got ",
              coefficients.scalar_type(), " of shape ", coefficients.sizes());
  TORCH_CHECK(row_ids.scalar_type() == at::kLong && row_ids.dim() == 1 && row_ids.size(0) == num_rows,
              "hybrid_step: row_ids must be an int64 tensor [R] = [", num_rows, "], got ", row_ids.scalar_type(),
              " of shape ", row_ids.sizes());
  TORCH_CHECK(x.device() == log_score.device(), "hybrid_step: x must be on log_score's device ", log_score.device(),
              ", got ", x.device());
  TORCH_CHECK(coefficients.device() == log_score.device(), "hybrid_step: coefficients must be on log_score's device ",
              log_score.device(), ", got ", coefficients.device());
  TORCH_CHECK(row_ids.device() == log_score.device(), "hybrid_step: row_ids must be on log_score's device ",
              log_score.device(), ", got ", row_ids.device());
  TORCH_CHECK(mask_id >= 0 && mask_id < vocab, "hybrid_step: mask_id must be in [0, V) = [0, ", vocab, "), got ",
              mask_id);
  TORCH_CHECK(step >= 0, "hybrid_step: step must be >= 0, got ", step);
}

}  // namespace hdlm
