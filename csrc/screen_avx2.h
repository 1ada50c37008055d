// The screening stage of the CPU samplers over a tile of kTilePairs Philox pairs (docs/sampling-screen.md):
// the rule of screen.h applied to every token of the tile as plain float32 loops of fixed length, compiled
// twice, once for AVX2 (8 float lanes, target attribute) and once portably ("scalar"); cpu_isa.h picks one
// at run time. Both satisfy the same bound, so the draws are the same whichever runs.
// The definitions live in screen_tile_cpu.cpp, the one translation unit compiled without trapping-math
// (its loops are float32 selections the vectorizer must if-convert); the exact FP64 code is elsewhere.
#pragma once

#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "cpu_isa.h"
#include "noise_tile.h"  // kTilePairs
#include "philox.h"
#include "screen.h"

namespace hdlm {

// The float32 logits of a tile's tokens (even and odd element of each pair; -inf for excluded or absent
// columns) and their screening intervals.
struct alignas(64) ScreenTile {
  float logit_even[kTilePairs], logit_odd[kTilePairs];
  float lo_even[kTilePairs], hi_even[kTilePairs], lo_odd[kTilePairs], hi_odd[kTilePairs];
};

// The intervals of all kTilePairs pairs of a tile (words of absent pairs are arbitrary: their logits are
// -inf); returns the row's floor after the tile (`floor` is the floor before it), and sets `any` when a token
// of the tile reaches it. With the instruction set named (screen_tile_cpu.cpp).
float screen_tile_avx2(const uint32_t* w0, const uint32_t* w1, const uint32_t* w2, const uint32_t* w3, float scale,
                       float floor, ScreenTile& tile, bool& any);
float screen_tile_scalar(const uint32_t* w0, const uint32_t* w1, const uint32_t* w2, const uint32_t* w3, float scale,
                         float floor, ScreenTile& tile, bool& any);

// The prefilter of a tile (docs/sampling-screen.md, "The prefilter"): whether any token of the tile may
// reach `floor`, from an upper bound of each token's exact score that needs only the first Philox word
// (screen_noise_bound) and the logit: screen_bounds(logit, screen_noise_bound(word_a), scale).hi. A tile
// where none does is skipped without its cheap noise. With the instruction set named (screen_tile_cpu.cpp).
bool tile_reaches_avx2(const uint32_t* w0, const uint32_t* w2, const ScreenTile& tile, float scale, float floor);
bool tile_reaches_scalar(const uint32_t* w0, const uint32_t* w2, const ScreenTile& tile, float scale, float floor);

// The Philox blocks of all kTilePairs pairs first_pair + p of stream `stream`, word by word, 8 pairs per AVX2
// instruction (32-bit lanes; the 32 x 32 -> 64-bit products of the even and the odd lanes by vpmuludq): the
// words of philox_block_for_pair (philox.h), bit for bit. Only called where cpu_has_avx2().
void philox_tile_avx2(uint64_t seed, uint64_t step, uint32_t stream, uint64_t first_pair, uint32_t* w0, uint32_t* w1,
                      uint32_t* w2, uint32_t* w3);

// The row floor raised by a screened tile (lane-wise running maxima of the lower ends, a loop the
// vectorizer takes, then across the lanes), and whether any token of the tile reaches the new floor (most
// tiles of a row have none: no scalar walk then). Inlined into both builds of each tile stage, so it is
// compiled with their instruction sets; pure float32 selections.
constexpr int kFloorLanes = 8;

__attribute__((always_inline)) inline float raise_floor(const ScreenTile& tile, float floor, bool& any) {
  float lanes[kFloorLanes];
  for (int j = 0; j < kFloorLanes; ++j) {
    lanes[j] = -HUGE_VALF;
  }
  for (int p = 0; p < kTilePairs; p += kFloorLanes) {
    for (int j = 0; j < kFloorLanes; ++j) {
      lanes[j] = screen_floor(screen_floor(lanes[j], tile.lo_even[p + j]), tile.lo_odd[p + j]);
    }
  }
  for (int j = 0; j < kFloorLanes; ++j) {
    floor = screen_floor(floor, lanes[j]);
  }
  int reach = 0;
  for (int p = 0; p < kTilePairs; ++p) {
    reach |= static_cast<int>(screen_candidate(tile.hi_even[p], floor)) |
             static_cast<int>(screen_candidate(tile.hi_odd[p], floor));
  }
  any = reach != 0;
  return floor;
}

// Appends (column, upper bound) of the tile's tokens whose interval reaches the running floor: the first
// `count` pairs of the tile, whose even element is column base + 2p (negative for the pair before column
// 0 when the row starts at an odd element; the odd element of the last pair may lie past the vocabulary).
inline void append_candidates(const ScreenTile& tile, int count, int64_t base, int64_t vocab, float floor,
                              std::vector<std::pair<int64_t, float>>& candidates) {
  for (int p = 0; p < count; ++p) {
    const int64_t even = base + 2 * p;
    if (even >= 0 && screen_candidate(tile.hi_even[p], floor)) {
      candidates.emplace_back(even, tile.hi_even[p]);
    }
    if (even + 1 < vocab && screen_candidate(tile.hi_odd[p], floor)) {
      candidates.emplace_back(even + 1, tile.hi_odd[p]);
    }
  }
}

using ScreenTileFunction = float (*)(const uint32_t*, const uint32_t*, const uint32_t*, const uint32_t*, float,
                                     float, ScreenTile&, bool&);

// The tile stage of the instruction set active_cpu_isa() names (read once per call, not per tile).
inline ScreenTileFunction screen_tile_function() {
  return active_cpu_isa() >= CpuIsa::kAvx2 ? &screen_tile_avx2 : &screen_tile_scalar;
}

using TileReachesFunction = bool (*)(const uint32_t*, const uint32_t*, const ScreenTile&, float, float);

// The prefilter of the instruction set active_cpu_isa() names.
inline TileReachesFunction tile_reaches_function() {
  return active_cpu_isa() >= CpuIsa::kAvx2 ? &tile_reaches_avx2 : &tile_reaches_scalar;
}

}  // namespace hdlm
