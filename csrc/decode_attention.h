// Declaration of the CUDA decode-attention operator (docs/attention.md) shared by the bindings and the
// backend. There is no CPU twin in C++: on the CPU, hdlm_kernels.attention.decode uses the reference.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace hdlm {

#ifdef HDLM_WITH_CUDA
// KV-cached attention of the rows computed this step over the cache, with the two-interval mask:
// row i of sequence b attends key c in [0, L) iff c < prefix_end[bm, i] or
// window_start[bm, i] <= c < window_end[bm, i] (bm = b, or 0 when the mask is shared by the batch).
//
//   q                           [B, S, H, D] CUDA, float32/float16/bfloat16, stride(-1) == 1
//   k, v                        [B, L, H, D] same dtype and device, stride(-1) == 1 (views of a cache)
//   prefix_end, window_start,   int32 [Bm, S] contiguous on q's device, Bm in {1, B}, values in [0, L]
//   window_end
//   scale                       softmax scale applied to q·k
//   num_splits                  0: chosen from the GPU's size (split-KV when the blocks are too few);
//                               n >= 1: exactly n key-range splits (n >= 2 goes through the combine)
//
// Returns [B, S, H, D] contiguous in q's dtype; a row without keys is zeros. Softmax and
// accumulation in float32. D must be 64 or 128. float16 and bfloat16 run on tensor cores (mma.sync, the
// probabilities rounded to the input type before P·V); float32 on CUDA cores (mma.sync has no float32
// operands, and tf32 would round the inputs).
at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& prefix_end, const at::Tensor& window_start,
                                 const at::Tensor& window_end, double scale, int64_t num_splits);
#endif

}  // namespace hdlm
