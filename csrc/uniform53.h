// Declarations of the uniform53 operators (docs/sampling-stream.md) shared by the bindings and the backends.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>

namespace hdlm {

// Float64 uniforms of elements `index` (int64, any shape, values >= 0) of stream `stream` at
// sampler step `step` under `seed`; returns a float64 tensor of index's shape on index's device.
at::Tensor uniform53_cpu(uint64_t seed, int64_t step, int64_t stream, const at::Tensor& index);
#ifdef HDLM_WITH_CUDA
at::Tensor uniform53_cuda(uint64_t seed, int64_t step, int64_t stream, const at::Tensor& index);
#endif

// Philox4x32-10 of one counter under one key, for known-answer tests.
std::array<uint32_t, 4> philox4x32_10_block(const std::array<uint32_t, 4>& counter,
                                            const std::array<uint32_t, 2>& key);

// Checks shared by the backends. Index values are not checked here (that would cost a device sync
// on CUDA): the Python wrapper hdlm_kernels.sampling.uniform53 rejects negative ids.
inline void check_uniform53_args(int64_t step, int64_t stream, const at::Tensor& index,
                                 c10::DeviceType expected_device) {
  TORCH_CHECK(step >= 0, "uniform53: step must be >= 0, got ", step);
  TORCH_CHECK(stream >= 0 && stream <= static_cast<int64_t>(UINT32_MAX),
              "uniform53: stream must be in [0, 2^32), got ", stream);
  TORCH_CHECK(index.scalar_type() == at::kLong, "uniform53: index must be an int64 tensor, got ",
              index.scalar_type());
  TORCH_CHECK(index.device().type() == expected_device, "uniform53: index must be on ",
              c10::DeviceTypeName(expected_device), ", got ", index.device());
}

}  // namespace hdlm
