// CPU backend of the uniform53 stream (docs/sampling-stream.md); the arithmetic lives in philox.h.
#include "uniform53.h"

#include "philox.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

namespace hdlm {

at::Tensor uniform53_cpu(uint64_t seed, int64_t step, int64_t stream, const at::Tensor& index) {
  check_uniform53_args(step, stream, index, c10::DeviceType::CPU);
  const at::Tensor index_contiguous = index.contiguous();
  at::Tensor out = at::empty(index.sizes(), index.options().dtype(at::kDouble));
  const int64_t* elements = index_contiguous.const_data_ptr<int64_t>();
  double* uniforms = out.mutable_data_ptr<double>();
  // One Philox block costs ~100 ns; smaller chunks would be dominated by thread hand-off.
  constexpr int64_t kGrainSize = 4096;
  at::parallel_for(0, index_contiguous.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      uniforms[i] = uniform53(seed, static_cast<uint64_t>(step), static_cast<uint32_t>(stream),
                              static_cast<uint64_t>(elements[i]));
    }
  });
  return out;
}

std::array<uint32_t, 4> philox4x32_10_block(const std::array<uint32_t, 4>& counter,
                                            const std::array<uint32_t, 2>& key) {
  const PhiloxBlock block = philox4x32_10(counter[0], counter[1], counter[2], counter[3], key[0], key[1]);
  return {block.w[0], block.w[1], block.w[2], block.w[3]};
}

}  // namespace hdlm
