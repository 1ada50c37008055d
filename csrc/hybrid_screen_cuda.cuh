// The device side of the γ step's screen (docs/sampling-screen.md, "The γ step" and "GPU kernels"): the
// chunks of a row with the tokens that are not read set to -inf, and the screened race of one row, run by a
// whole thread block once the row's exact m and S are known. The rule of the interval is hybrid_screen.h's
// (the very functions the C++ backend runs, compiled for the device); the chunks, the float32 reductions
// and the 16-byte loads are screen_cuda.cuh's. The screen loop holds no FP64 instruction
// (scripts/screen_sass_counts.py counts them in the sm_90 machine code); the exact decision is the header
// code of the full race (hybrid_rule.h, gumbel_rule.h, log64.h), so the winner is the full race's, bit for
// bit.
#pragma once

#include <cstdint>

#include "block_best.cuh"
#include "gumbel_rule.h"
#include "hybrid_rule.h"
#include "hybrid_screen.h"
#include "log64.h"
#include "philox.h"
#include "screen.h"
#include "screen_cuda.cuh"

namespace hdlm {

// The chunk of kColumns columns starting at `first` (screen_cuda.cuh's load_chunk), with the columns that
// are not read (the current token and the MASK column) at -inf: their ratio is 0 in the row's max and sum,
// and the race scores them apart (the current cell exactly, the MASK column never).
template <typename scalar_t, bool kVector>
__device__ __forceinline__ Chunk<scalar_t> load_read_chunk(const scalar_t* __restrict__ row, int64_t stride_col,
                                                           int64_t vocab, int64_t first, int64_t current,
                                                           int64_t mask_id) {
  Chunk<scalar_t> chunk = load_chunk<scalar_t, kVector>(row, stride_col, vocab, first);
#pragma unroll
  for (int c = 0; c < Chunk<scalar_t>::kColumns; ++c) {
    const int64_t column = first + c;
    chunk.x[c] = column == current || column == mask_id ? __int_as_float(0xFF800000) : chunk.x[c];
  }
  return chunk;
}

// The largest of the block's float values (none NaN), in every thread. `scratch` is this reduction's own
// shared array (not reused, so no barrier is needed after reading it).
__device__ __forceinline__ float block_max_float(float value, float* scratch) {
  using namespace block_best_detail;
  value = warp_max_float(value);
  if (threadIdx.x % kWarpSize == 0) {
    scratch[threadIdx.x / kWarpSize] = value;
  }
  __syncthreads();
  value = scratch[0];
#pragma unroll
  for (int warp = 1; warp < kWarpsPerRow; ++warp) {
    value = fmaxf(value, scratch[warp]);
  }
  return value;
}

// The largest float32 value at most v (v finite): a lower bound of an exact score, as a floor.
__device__ __forceinline__ float float_at_most_device(double v) { return __double2float_rd(v); }

// What the screened race of a row reads.
struct HybridScreenedRow {
  int64_t vocab;
  int64_t current;
  int64_t mask_id;
  uint64_t row_id;
  uint64_t seed;
  uint64_t step;
  HybridScreenRow screen;  // the float32 constants of hybrid_screen_row
  bool no_read_weight;     // c1 = 0: no read token has a weight, only the current cell is scored
};

// The best candidate of this thread in a row that is not bad and whose constants passed hybrid_screen_row
// (or c1 = 0), by screen, then decide: block_best of the block's results is the full race's (score,
// column). Every thread of the block calls it (it synchronizes the block).
//   0. the current cell's exact score (when it has a weight): the first best, its float32 value rounded
//      down the first floor;
//   1. float32 and integer work only (screen_row_floor): thread t at iteration k takes chunk q = 256 k + t
//      (whole Philox pairs: chunk q starts at column kColumns q - parity), its Philox blocks and each read
//      column's prefilter bound (the K = 0 form of the interval with the first word's noise bound, an upper
//      bound of the score whatever K is: docs/sampling-screen.md, "The γ step"); where a lane of the warp
//      reaches the running floor, the cheap intervals, the floor raised, and the warp's largest upper bound
//      into the iteration's slot in shared memory;
//   2. L = the block's floor; a warp re-walks only the iterations whose slot reaches L and holds a token
//      that may have a weight (a warp-uniform branch), and the lanes with a candidate compute its exact
//      score (hybrid_read_log_weight, log64, the FP64 noise) and keep the best with beats().
// kCount: `candidates` receives this thread's number of candidates, the read columns whose upper bound
// reaches L (their exact score computed, or -inf proved by hi = -inf in a row whose floor is -inf), as the
// C++ and Triton backends count them; without kCount it is left alone.
template <typename scalar_t, bool kVector, bool kKZero, bool kCount>
__device__ __forceinline__ Candidate hybrid_race_screened(const scalar_t* __restrict__ row, int64_t stride_col,
                                                          const HybridScreenedRow& r, const HybridRow& weights,
                                                          int& candidates) {
  using namespace block_best_detail;
  constexpr int kColumns = Chunk<scalar_t>::kColumns;
  constexpr int kPairs = kColumns / 2;
  __shared__ ScreenShared screen_shared;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const float minus_inf = __int_as_float(0xFF800000);
  const double minus_inf_double = hybrid_detail::minus_infinity();

  // 0. The current cell, exactly (every thread: the same bits, no broadcast needed).
  Candidate best = no_candidate();
  float floor = minus_inf;
  if (weights.current_log_weight != minus_inf_double) {
    const double noise = gumbel_noise(uniform53(r.seed, r.step, kGumbelStream,
                                                r.row_id * static_cast<uint64_t>(r.vocab) +
                                                    static_cast<uint64_t>(r.current)));
    best = Candidate{hybrid_score(weights.current_log_weight, noise), r.current};
    floor = float_at_most_device(best.score);
  }
  if (r.no_read_weight) {
    return best;
  }

  const RowPairs pairs = row_pairs(r.row_id, r.vocab);
  const int64_t num_chunks = (pairs.count + kPairs - 1) / kPairs;
  // Chunk q's float32 log-scores (absent and unread columns at -inf, whose interval is [-inf, -inf]), its
  // Philox blocks, and each column's prefilter bound.
  struct Words {
    Chunk<scalar_t> scores;
    PhiloxBlock blocks[kPairs];
    float reach[kColumns];
  };
  // The cheap interval of each column (hi at most the prefilter's bound).
  struct Bounds {
    float lo[kColumns];
    float hi[kColumns];
  };
  const auto words = [&](int64_t q) {
    Words chunk;
    const int64_t first = kColumns * q - pairs.parity;
    chunk.scores = load_read_chunk<scalar_t, kVector>(row, stride_col, r.vocab, first, r.current, r.mask_id);
#pragma unroll
    for (int p = 0; p < kPairs; ++p) {
      chunk.blocks[p] = philox_block_for_pair(r.seed, r.step, kGumbelStream,
                                              pairs.first_pair + static_cast<uint64_t>(kPairs * q + p));
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int c = 2 * p + half;
        chunk.reach[c] = hybrid_screen_bounds<true>(chunk.scores.x[c], screen_noise_bound(chunk.blocks[p].w[2 * half]),
                                                    r.screen.shift, r.screen.log_c1, 0.0f)
                             .hi;
      }
    }
    return chunk;
  };
  const auto bounds = [&](const Words& chunk) {
    Bounds interval;
#pragma unroll
    for (int p = 0; p < kPairs; ++p) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int c = 2 * p + half;
        const float noise = screen_noise_device(chunk.blocks[p].w[2 * half], chunk.blocks[p].w[2 * half + 1]);
        const ScreenBounds cheap = hybrid_screen_bounds<kKZero>(chunk.scores.x[c], noise, r.screen.shift,
                                                                r.screen.log_c1, r.screen.log_k);
        interval.lo[c] = cheap.lo;
        interval.hi[c] = tighter_upper(cheap.hi, chunk.reach[c]);
      }
    }
    return interval;
  };

  // 1. The screen (float32 and integer work only).
  const float row_floor = screen_row_floor<kColumns>(words, bounds, num_chunks, floor, screen_shared);

  // 2. The exact score of the candidates only. An upper bound of -inf proves the score -inf (no weight):
  // such a token is not offered, as in the full race, so an iteration whose slot is -inf is skipped too
  // (it reaches L only when L is -inf; the counted kernel then counts its read columns, all candidates).
  int64_t k = 0;
  for (int64_t base = warp * kWarpSize; base < num_chunks; base += kThreadsPerRow, ++k) {
    const float top = screen_shared.slot_top[warp][k < kScreenSlots ? k : kScreenSlots - 1];
    if (top < row_floor) {
      continue;  // uniform across the warp
    }
    const int64_t q = base + lane;
    const int64_t first = kColumns * q - pairs.parity;
    const auto read = [&](int c) {
      const int64_t column = first + c;
      return column >= 0 && column < r.vocab && column != r.current && column != r.mask_id;
    };
    if (top == minus_inf) {
      if constexpr (kCount) {
#pragma unroll
        for (int c = 0; c < kColumns; ++c) {
          candidates += static_cast<int>(read(c));
        }
      }
      continue;  // uniform across the warp
    }
    const Words chunk = words(q);
    const Bounds interval = bounds(chunk);
#pragma unroll
    for (int c = 0; c < kColumns; ++c) {
      if (!screen_candidate(interval.hi[c], row_floor)) {
        continue;
      }
      if constexpr (kCount) {
        candidates += static_cast<int>(read(c));
      }
      if (interval.hi[c] != minus_inf) {
        const double log_weight = hybrid_read_log_weight(
            hybrid_ratio(static_cast<double>(chunk.scores.x[c]), weights.shift), weights);
        if (log_weight != minus_inf_double) {
          const PhiloxBlock& block = chunk.blocks[c / 2];
          const double noise =
              gumbel_noise(uniform53_from_words(block.w[2 * (c % 2)], block.w[2 * (c % 2) + 1]));
          take_if_better(best, Candidate{hybrid_score(log_weight, noise), first + c});
        }
      }
    }
  }
  return best;
}

}  // namespace hdlm
