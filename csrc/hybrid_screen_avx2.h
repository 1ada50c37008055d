// The CPU stages of the γ step's screen (docs/sampling-screen.md, "The γ step"), each compiled twice, for
// AVX2 (target attribute) and portably ("scalar"); cpu_isa.h picks one at run time.
//   read_maximum_*: the row's largest log-score in float32 lanes (pass 1), same translation unit;
//   hybrid_tile_reaches_*: the prefilter of a tile (an upper bound of every token's score from its first
//     Philox word), same translation unit;
//   hybrid_screen_tile_*: the intervals of hybrid_screen.h over a tile of kTilePairs Philox pairs (float32
//     lanes, no FP64 operation), in hybrid_screen_tile_cpu.cpp (compiled without trapping-math, like
//     screen_tile_cpu.cpp, so that its selections become blends);
//   fixed_sum_*: the exact fixed-point row sum of hybrid_rule.h (exp64 and the truncations) over a run of
//     float32 log-scores, in hybrid_sum_cpu.cpp: the AVX2 build evaluates exp64 in 4 float64 lanes with the
//     very IEEE operations of the scalar exp64 (no FMA), so every ratio has the same bits.
#pragma once

#include <cstdint>

#include "cpu_isa.h"
#include "hybrid_rule.h"  // FixedSum
#include "hybrid_screen.h"
#include "screen_avx2.h"  // ScreenTile, kTilePairs

namespace hdlm {

// The intervals of all kTilePairs pairs of a tile (tile.logit_* hold the float32 log-scores, -inf for the
// tokens that are not read or absent); returns the row's floor after the tile and sets `any` when a token of
// the tile reaches it, as screen_tile_avx2.
float hybrid_screen_tile_avx2(const uint32_t* w0, const uint32_t* w1, const uint32_t* w2, const uint32_t* w3,
                              const HybridScreenRow& row, float floor, ScreenTile& tile, bool& any);
float hybrid_screen_tile_scalar(const uint32_t* w0, const uint32_t* w1, const uint32_t* w2, const uint32_t* w3,
                                const HybridScreenRow& row, float floor, ScreenTile& tile, bool& any);

// The prefilter of a tile (screen_avx2.h, tile_reaches_*) with the γ step's upper bound: whether any read
// token of the tile may reach `floor`.
bool hybrid_tile_reaches_avx2(const uint32_t* w0, const uint32_t* w2, const ScreenTile& tile,
                              const HybridScreenRow& row, float floor);
bool hybrid_tile_reaches_scalar(const uint32_t* w0, const uint32_t* w2, const ScreenTile& tile,
                                const HybridScreenRow& row, float floor);

// Pass 1 of a screened row: the largest of `count` float32 log-scores (the tokens not read hold -inf), and
// `bad` when one is NaN or +inf (the row then takes the exact race, which reports it).
float read_maximum_avx2(const float* values, int64_t count, bool& bad);
float read_maximum_scalar(const float* values, int64_t count, bool& bad);

using HybridTileReachesFunction = bool (*)(const uint32_t*, const uint32_t*, const ScreenTile&,
                                           const HybridScreenRow&, float);

inline HybridTileReachesFunction hybrid_tile_reaches_function() {
  return active_cpu_isa() >= CpuIsa::kAvx2 ? &hybrid_tile_reaches_avx2 : &hybrid_tile_reaches_scalar;
}

using HybridScreenTileFunction = float (*)(const uint32_t*, const uint32_t*, const uint32_t*, const uint32_t*,
                                           const HybridScreenRow&, float, ScreenTile&, bool&);

inline HybridScreenTileFunction hybrid_screen_tile_function() {
  return active_cpu_isa() >= CpuIsa::kAvx2 ? &hybrid_screen_tile_avx2 : &hybrid_screen_tile_scalar;
}

// Partial fixed-point sums in integer-valued float64 lanes: trunc(r' 2^32) <= 2^32 and the low part < 2^31,
// so a lane's sum is exact while it holds fewer than 2^21 terms (it stays below 2^53); rows with
// V >= kFixedLanesMaxVocab take the int64 path.
constexpr int64_t kFixedLanesMaxVocab = int64_t{1} << 21;

struct FixedSumLanes {
  alignas(32) double hi[4];
  alignas(32) double lo[4];
};

inline void fixed_lanes_clear(FixedSumLanes& lanes) {
  for (int j = 0; j < 4; ++j) {
    lanes.hi[j] = 0.0;
    lanes.lo[j] = 0.0;
  }
}

// The lanes as the int64 accumulators of hybrid_rule.h (the values are integers below 2^53: exact).
inline FixedSum fixed_lanes_total(const FixedSumLanes& lanes) {
  FixedSum sum{0, 0};
  for (int j = 0; j < 4; ++j) {
    sum.hi += static_cast<int64_t>(lanes.hi[j]);
    sum.lo += static_cast<int64_t>(lanes.lo[j]);
  }
  return sum;
}

// Adds the fixed-point ratios exp64(s - shift) of `count` float32 log-scores (-inf adds 0) to `lanes`.
// AVX2 only where cpu_has_avx2().
void fixed_sum_avx2(const float* scores, int count, double shift, FixedSumLanes& lanes);
// The same in 8 float64 lanes (AVX-512F, same operations; the lanes fold into `lanes`). Only where
// cpu_has_avx512().
void fixed_sum_avx512(const float* scores, int count, double shift, FixedSumLanes& lanes);
// The same with the scalar code of hybrid_rule.h, into int64 accumulators.
void fixed_sum_scalar(const float* scores, int count, double shift, FixedSum& sum);

}  // namespace hdlm
