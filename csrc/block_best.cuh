// The block-wide argmax the CUDA sampling kernels share (gumbel_cuda.cu, hybrid_cuda.cu): one thread
// block per row of kThreadsPerRow threads, each holding its best (score, column), reduced with beats()
// of gumbel_rule.h. beats() is a total order, so the shuffle tree gives the winner of a left-to-right
// scan, the reference's.
#pragma once

#include "gumbel_rule.h"

namespace hdlm {
namespace block_best_detail {

constexpr int kThreadsPerRow = 256;  // one block per row; a multiple of the warp size
constexpr int kWarpSize = 32;
constexpr int kWarpsPerRow = kThreadsPerRow / kWarpSize;
constexpr unsigned kFullWarp = 0xffffffffu;

}  // namespace block_best_detail

__device__ __forceinline__ void take_if_better(Candidate& best, const Candidate& challenger) {
  if (beats(challenger, best)) {
    best = challenger;
  }
}

// The best of the warp's candidates, in lane 0.
__device__ __forceinline__ Candidate warp_best(Candidate best) {
  using namespace block_best_detail;
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const Candidate other{__shfl_down_sync(kFullWarp, best.score, offset),
                          static_cast<int64_t>(__shfl_down_sync(kFullWarp, static_cast<long long>(best.column), offset))};
    take_if_better(best, other);
  }
  return best;
}

// The best candidate of the whole block, valid in thread 0 only. Every thread of the block must call it.
__device__ __forceinline__ Candidate block_best(Candidate best) {
  using namespace block_best_detail;
  __shared__ double warp_scores[kWarpsPerRow];
  __shared__ int64_t warp_columns[kWarpsPerRow];
  best = warp_best(best);
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (lane == 0) {
    warp_scores[warp] = best.score;
    warp_columns[warp] = best.column;
  }
  __syncthreads();
  if (warp == 0) {
    best = lane < kWarpsPerRow ? Candidate{warp_scores[lane], warp_columns[lane]} : no_candidate();
    best = warp_best(best);
  }
  return best;
}

}  // namespace hdlm
