// The device side of "screen, then decide" (docs/sampling-screen.md, "GPU kernels") that the CUDA sampling
// kernels share: the chunks of a row, loaded with one 16-byte load where the row allows it, the float32
// reductions of the screen's bounds, and the screen pass itself (screen_row_floor), with the prefilter that
// skips the cheap noise of an iteration whose columns cannot reach the running floor. Float32 and integer
// work only: no FP64 instruction may appear in a screening loop (scripts/screen_sass_counts.py counts them in
// the sm_90 machine code).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "block_best.cuh"  // kThreadsPerRow, kWarpsPerRow
#include "gumbel_rule.h"
#include "philox.h"
#include "screen.h"

namespace hdlm {
namespace screen_cuda_detail {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xffffffffu;

// Float32 in an int order that max() respects for every non-NaN value (±0 compare as different
// ints but are equal floats; a maximum taken this way is still a float maximum).
__device__ __forceinline__ int ordered_int(float x) {
  const int bits = __float_as_int(x);
  return bits >= 0 ? bits : bits ^ 0x7FFFFFFF;
}

__device__ __forceinline__ float float_of_ordered(int ordered) {
  return __int_as_float(ordered >= 0 ? ordered : ordered ^ 0x7FFFFFFF);
}

}  // namespace screen_cuda_detail

// The largest of the warp's values (none NaN), in every lane: one REDUX on sm_80 and later.
__device__ __forceinline__ float warp_max_float(float value) {
  using namespace screen_cuda_detail;
  return float_of_ordered(__reduce_max_sync(kFullWarp, ordered_int(value)));
}

// An upper bound may be NaN (always a candidate): it counts as +inf in the maxima that decide what to skip.
__device__ __forceinline__ float nan_as_infinity(float hi) { return hi != hi ? __int_as_float(0x7F800000) : hi; }

// screen_noise of screen.h with the logarithms' division s = f / (2 + f) taken as __fdividef (within 2 ulp,
// one instruction pair instead of the IEEE division's slow-path call): one more rounding in each
// logarithm, within the margin of the bound (docs/sampling-screen.md, "GPU kernels").
struct FastQuotient {
  __device__ __forceinline__ static float of(float f) { return __fdividef(f, 2.0f + f); }
};

__device__ __forceinline__ float screen_noise_device(uint32_t word_a, uint32_t word_b) {
  return screen_noise<FastQuotient>(word_a, word_b);
}

// The columns of one chunk of a row: kColumns = 16 / sizeof(scalar_t) adjacent columns, starting at
// column `first` (first = kColumns * q - parity for chunk q, so that the chunk holds whole Philox pairs),
// widened to float32 (exact for bf16, fp16, fp32); columns outside [0, V) read -inf. With kVector (a
// contiguous, 16-byte-aligned row) a chunk inside the row is one 16-byte load (plus, when parity = 1, one
// scalar load of the chunk's first column, which the previous chunk's vector also holds); otherwise, and
// for the row's last chunk, column by column.
template <typename scalar_t>
struct Chunk {
  static constexpr int kColumns = 16 / static_cast<int>(sizeof(scalar_t));
  float x[kColumns];
};

// Column c of a 16-byte vector of logits (little-endian: the lower column in the lower half-word), widened
// exactly to float32.
template <typename scalar_t>
__device__ __forceinline__ float column_of(const uint32_t (&words)[4], int c);

template <>
__device__ __forceinline__ float column_of<float>(const uint32_t (&words)[4], int c) {
  return __uint_as_float(words[c]);
}

template <>
__device__ __forceinline__ float column_of<c10::BFloat16>(const uint32_t (&words)[4], int c) {
  const uint32_t word = words[c / 2];
  return __uint_as_float(c % 2 ? word & 0xFFFF0000u : word << 16);
}

template <>
__device__ __forceinline__ float column_of<c10::Half>(const uint32_t (&words)[4], int c) {
  const uint32_t word = words[c / 2];
  return __half2float(__ushort_as_half(static_cast<unsigned short>(c % 2 ? word >> 16 : word & 0xFFFFu)));
}

template <typename scalar_t, bool kVector>
__device__ __forceinline__ Chunk<scalar_t> load_chunk(const scalar_t* __restrict__ row, int64_t stride_col,
                                                      int64_t vocab, int64_t first) {
  constexpr int kColumns = Chunk<scalar_t>::kColumns;
  Chunk<scalar_t> chunk;
  const float minus_inf = __int_as_float(0xFF800000);
  // first = kColumns q - parity: the aligned vector is columns [kColumns q, kColumns q + kColumns).
  const int64_t aligned = first + (first & 1);
  if (kVector && aligned + kColumns <= vocab) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + aligned));
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
    if (aligned == first) {
#pragma unroll
      for (int c = 0; c < kColumns; ++c) {
        chunk.x[c] = column_of<scalar_t>(words, c);
      }
    } else {
      chunk.x[0] = first >= 0 ? static_cast<float>(row[first]) : minus_inf;
#pragma unroll
      for (int c = 1; c < kColumns; ++c) {
        chunk.x[c] = column_of<scalar_t>(words, c - 1);
      }
    }
    return chunk;
  }
#pragma unroll
  for (int c = 0; c < kColumns; ++c) {
    const int64_t column = first + c;
    chunk.x[c] = column >= 0 && column < vocab ? static_cast<float>(row[column * stride_col]) : minus_inf;
  }
  return chunk;
}

// Iterations of a warp over its row with their own slot of the largest upper bound (later iterations share
// the last slot, which then holds their maximum).
constexpr int kScreenSlots = 128;

// The shared memory of a screen pass: per warp and iteration the largest upper bound of its columns (-inf
// for an iteration the prefilter skipped), the warps' final floors, and the block's running floor as an
// ordered int (ordered_int), raised with atomicMax by a warp whose floor grows and read by every warp at
// every iteration.
struct ScreenShared {
  float slot_top[block_best_detail::kWarpsPerRow][kScreenSlots];
  float warp_floor[block_best_detail::kWarpsPerRow];
  int block_floor;
};

// The smaller of two upper bounds of the same exact score: `hi` of the cheap interval and `reach`, the
// prefilter's bound (a NaN hi, an unknown end, stays NaN and so a candidate). Both kernels take this as a
// column's upper end, so that a column the prefilter skipped (reach below a floor) could never have been a
// candidate of the unfiltered screen either (docs/sampling-screen.md, "GPU kernels").
__device__ __forceinline__ float tighter_upper(float hi, float reach) { return reach < hi ? reach : hi; }

// The screen pass of a screened row (docs/sampling-screen.md, "GPU kernels"), shared by the Gumbel-max and γ
// kernels. Warp w walks chunks w 32 + lane, + kThreadsPerRow, ...; per chunk q,
//   words(q)     loads the chunk and computes its Philox blocks and, per column c, `reach[c]`: the prefilter's
//                upper bound of the exact score from the first Philox word alone (screen_noise_bound in place
//                of the cheap noise; -inf for absent columns, NaN reaches), integer and float32 work only;
//   bounds(w)    computes from those words the cheap interval of every column: `lo[c]` and `hi[c]` (the
//                latter at most reach[c], tighter_upper).
// The cheap bounds (two float32 logarithms per column) are computed only when a lane of the warp has a column
// whose reach is not below the warp's running floor (a warp-uniform branch, __any_sync); otherwise no column
// of the iteration can win, tie or raise the floor, and its slot stays -inf. The running floor is the warp's
// (the largest lo it has seen, one REDUX per screened iteration) raised at every iteration to the block's
// shared floor, which a warp raises with atomicMax when its own grows: every value read is the lo of some
// column or the initial floor, so a stale read is only a weaker test. Returns the block's floor, the largest
// lo of the row (and `floor`, the initial floor every thread passes), which the prefilter does not change.
// Every thread of the block must call it (it synchronizes the block).
template <int kColumns, class Words, class Bounds>
__device__ __forceinline__ float screen_row_floor(const Words& words, const Bounds& bounds, int64_t num_chunks,
                                                  float floor, ScreenShared& shared) {
  using block_best_detail::kThreadsPerRow;
  using block_best_detail::kWarpSize;
  using block_best_detail::kWarpsPerRow;
  using screen_cuda_detail::float_of_ordered;
  using screen_cuda_detail::kFullWarp;
  using screen_cuda_detail::ordered_int;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const float minus_inf = __int_as_float(0xFF800000);
  constexpr int kSlotsPerThread = kWarpsPerRow * kScreenSlots / kThreadsPerRow;
  static_assert(kSlotsPerThread * kThreadsPerRow == kWarpsPerRow * kScreenSlots, "whole slots per thread");
  float* slots = &shared.slot_top[0][0];
#pragma unroll
  for (int k = 0; k < kSlotsPerThread; ++k) {
    slots[k * kThreadsPerRow + static_cast<int>(threadIdx.x)] = minus_inf;  // -inf: no column screened yet
  }
  if (threadIdx.x == 0) {
    shared.block_floor = ordered_int(floor);
  }
  __syncthreads();
  volatile int* block_floor = &shared.block_floor;
  int64_t iterations = 0;
  for (int64_t base = warp * kWarpSize; base < num_chunks; base += kThreadsPerRow, ++iterations) {
    const auto chunk_words = words(base + lane);
    // The floor known here: the warp's, raised to the block's (both the lo of some column, or the initial floor).
    floor = fmaxf(floor, float_of_ordered(*block_floor));
    int reach = 0;
#pragma unroll
    for (int c = 0; c < kColumns; ++c) {
      reach |= static_cast<int>(screen_candidate(chunk_words.reach[c], floor));
    }
    if (!__any_sync(kFullWarp, reach)) {
      continue;  // every exact score of the iteration is below the floor (uniform across the warp)
    }
    const auto chunk_bounds = bounds(chunk_words);
    float lane_floor = floor;
    float top = minus_inf;
#pragma unroll
    for (int c = 0; c < kColumns; ++c) {
      lane_floor = screen_floor(lane_floor, chunk_bounds.lo[c]);
      top = fmaxf(top, nan_as_infinity(chunk_bounds.hi[c]));
    }
    top = warp_max_float(top);
    const float raised = warp_max_float(lane_floor);
    if (lane == 0) {
      const int64_t slot = iterations < kScreenSlots ? iterations : kScreenSlots - 1;
      shared.slot_top[warp][slot] = iterations < kScreenSlots ? top : fmaxf(shared.slot_top[warp][slot], top);
      if (raised > floor) {
        atomicMax(&shared.block_floor, ordered_int(raised));
      }
    }
    floor = raised;
  }
  floor = warp_max_float(floor);
  if (lane == 0) {
    shared.warp_floor[warp] = floor;
  }
  __syncthreads();
  float row_floor = minus_inf;
#pragma unroll
  for (int w = 0; w < kWarpsPerRow; ++w) {
    row_floor = fmaxf(row_floor, shared.warp_floor[w]);
  }
  return row_floor;
}

}  // namespace hdlm
