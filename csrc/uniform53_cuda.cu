// CUDA backend of the uniform53 stream (docs/sampling-stream.md); the arithmetic lives in philox.h, shared with
// the CPU backend, so both return bit-identical doubles. Only c10/ATen core headers here: neither
// <torch/extension.h> (pybind11 and the autograd API would dominate nvcc's compile time) nor
// <ATen/cuda/CUDAContext.h> (it needs the cuBLAS/cuSPARSE headers, absent from a bare toolkit).
#include "uniform53.h"

#include "philox.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>

namespace hdlm {
namespace {

constexpr int kThreadsPerBlock = 256;

__global__ void uniform53_kernel(uint64_t seed, uint64_t step, uint32_t stream, const int64_t* __restrict__ elements,
                                 double* __restrict__ uniforms, int64_t numel) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    uniforms[i] = uniform53(seed, step, stream, static_cast<uint64_t>(elements[i]));
  }
}

}  // namespace

at::Tensor uniform53_cuda(uint64_t seed, int64_t step, int64_t stream, const at::Tensor& index) {
  check_uniform53_args(step, stream, index, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(index.device());
  const at::Tensor index_contiguous = index.contiguous();
  at::Tensor out = at::empty(index.sizes(), index.options().dtype(at::kDouble));
  const int64_t numel = index_contiguous.numel();
  if (numel == 0) {
    return out;
  }
  // Enough blocks to fill every SM several times over; the grid-stride loop covers the rest.
  int multiprocessors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, index.device().index()));
  const int64_t max_blocks = static_cast<int64_t>(multiprocessors) * 32;
  const int64_t blocks = std::min<int64_t>((numel + kThreadsPerBlock - 1) / kThreadsPerBlock, max_blocks);
  const cudaStream_t cuda_stream = c10::cuda::getCurrentCUDAStream(index.device().index());
  uniform53_kernel<<<static_cast<unsigned int>(blocks), kThreadsPerBlock, 0, cuda_stream>>>(
      seed, static_cast<uint64_t>(step), static_cast<uint32_t>(stream), index_contiguous.const_data_ptr<int64_t>(),
      out.mutable_data_ptr<double>(), numel);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace hdlm
