// Declarations of the FP64 Gumbel-max operators (docs/sampling-stream.md) shared by the bindings and the backends;
// the per-token arithmetic lives in gumbel_rule.h and log64.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace hdlm {

// One token per sampled row by FP64 Gumbel-max, the reference backend's semantics
// (hdlm_kernels/sampling/gumbel.py, _gumbel_argmax_reference):
//   logits  [K, V] float32 / float64 / float16 / bfloat16, any strides (never copied);
//   take    None (n = K, row i is logits row i) or int64 [n] of logits rows, in output order;
//   row_ids int64 [n], the rows' identities (noise of element row_id * V + v of stream 0), >= 0 and
//           with row_id * V + V - 1 < 2^63;
//   exclude None or int64 ids in [0, V) (sorted and distinct from the Python wrapper) set to -inf.
// score[v] = double(logit) / temperature + gumbel_noise(uniform53(seed, step, 0, row_id * V + v))
// (temperature 1: no division; temperature 0: greedy, no noise). Returns (tokens int64 [n], winning
// scores float64 [n]): ties go to the lowest column; a NaN score wins (best NaN, the first NaN column);
// a row without candidates reports -inf and column 0. The caller raises for NaN / -inf winners.
std::tuple<at::Tensor, at::Tensor> gumbel_argmax_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& take,
                                                     const at::Tensor& row_ids, uint64_t seed, int64_t step,
                                                     double temperature, const std::optional<at::Tensor>& exclude);
// The same draw, plus (when `count`) the number of tokens of each row whose exact FP64 score was computed
// (docs/sampling-screen.md: the screen's candidates, or V on the exact path); an empty tensor otherwise.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gumbel_argmax_counted_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& take, const at::Tensor& row_ids, uint64_t seed,
    int64_t step, double temperature, const std::optional<at::Tensor>& exclude, bool count);
#ifdef HDLM_WITH_CUDA
// The same on CUDA tensors (all on logits' device). The values of take, row_ids and exclude are not
// checked here (that would cost a device sync): the Python wrapper validates them.
std::tuple<at::Tensor, at::Tensor> gumbel_argmax_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& take,
                                                      const at::Tensor& row_ids, uint64_t seed, int64_t step,
                                                      double temperature, const std::optional<at::Tensor>& exclude);
// gumbel_argmax_cuda plus, with count = true, the number of tokens of each row whose exact FP64 score was
// computed (the screened kernel's candidates, or V on the exact walk), as gumbel_argmax_counted_cpu; an empty
// tensor otherwise. Without count it launches the kernels gumbel_argmax_cuda does (counting is a template flag).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gumbel_argmax_counted_cuda(
    const at::Tensor& logits, const std::optional<at::Tensor>& take, const at::Tensor& row_ids, uint64_t seed,
    int64_t step, double temperature, const std::optional<at::Tensor>& exclude, bool count);
#endif

// Metadata checks shared by the backends: dtypes, ranks, sizes and devices, named in the errors.
inline void check_gumbel_args(const at::Tensor& logits, const std::optional<at::Tensor>& take,
                              const at::Tensor& row_ids, int64_t step, double temperature,
                              const std::optional<at::Tensor>& exclude, c10::DeviceType expected_device) {
  const std::string device_name = c10::DeviceTypeName(expected_device);
  TORCH_CHECK(logits.device().type() == expected_device, "gumbel_argmax: logits must be on ", device_name,
              ", got a tensor on ", logits.device());
  const at::ScalarType dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "gumbel_argmax: logits must have dtype float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(logits.dim() == 2, "gumbel_argmax: logits must have shape [K, V], got shape ", logits.sizes());
  const int64_t vocab = logits.size(1);
  TORCH_CHECK(vocab >= 1 && vocab < (int64_t{1} << 31), "gumbel_argmax: logits must have 1 <= V < 2^31 tokens, got V = ",
              vocab);
  TORCH_CHECK(row_ids.scalar_type() == at::kLong && row_ids.dim() == 1,
              "gumbel_argmax: row_ids must be an int64 tensor [n], got ", row_ids.scalar_type(), " of shape ",
              row_ids.sizes());
  TORCH_CHECK(row_ids.device() == logits.device(), "gumbel_argmax: row_ids must be on logits' device ", logits.device(),
              ", got ", row_ids.device());
  if (take.has_value()) {
    TORCH_CHECK(take->scalar_type() == at::kLong && take->dim() == 1, "gumbel_argmax: take must be None or an int64 ",
                "tensor [n], got ", take->scalar_type(), " of shape ", take->sizes());
    TORCH_CHECK(take->device() == logits.device(), "gumbel_argmax: take must be on logits' device ", logits.device(),
                ", got ", take->device());
    TORCH_CHECK(take->size(0) == row_ids.size(0), "gumbel_argmax: take and row_ids must have one entry per sampled ",
                "row, got ", take->size(0), " and ", row_ids.size(0));
  } else {
    TORCH_CHECK(row_ids.size(0) == logits.size(0), "gumbel_argmax: row_ids must have shape [K] = [", logits.size(0),
                "] when take is None, got shape ", row_ids.sizes());
  }
  if (exclude.has_value()) {
    TORCH_CHECK(exclude->scalar_type() == at::kLong && exclude->dim() == 1,
                "gumbel_argmax: exclude must be None or an int64 tensor [m], got ", exclude->scalar_type(),
                " of shape ", exclude->sizes());
    TORCH_CHECK(exclude->device() == logits.device(), "gumbel_argmax: exclude must be on logits' device ",
                logits.device(), ", got ", exclude->device());
  }
  TORCH_CHECK(step >= 0, "gumbel_argmax: step must be >= 0, got ", step);
  TORCH_CHECK(std::isfinite(temperature) && temperature >= 0.0,
              "gumbel_argmax: temperature must be a finite float >= 0, got ", temperature);
}

}  // namespace hdlm
