// The screening stage over a tile (screen_avx2.h), compiled twice: for AVX2 (target attribute, 8 float lanes)
// and portably ("scalar"). Without trapping-math in this file only: the loop holds float32 selections
// (ternaries between computed values) that GCC if-converts into vector blends only when it may assume that
// floating-point operations do not trap. That changes no value (every operation is still rounded to nearest,
// nothing is reassociated or contracted: -ffp-contract=off), and the exact FP64 arithmetic of the samplers
// is in other translation units.
#pragma GCC optimize("no-trapping-math")

#include "screen_avx2.h"

#include "screen.h"

namespace hdlm {
namespace {

constexpr int kFloorLanes = 8;

__attribute__((always_inline)) inline float screen_tile_body(const uint32_t* __restrict w0,
                                                             const uint32_t* __restrict w1,
                                                             const uint32_t* __restrict w2,
                                                             const uint32_t* __restrict w3, float scale,
                                                             ScreenTile& tile) {
  for (int p = 0; p < kTilePairs; ++p) {
    const ScreenBounds even = screen_bounds(tile.logit_even[p], screen_noise(w0[p], w1[p]), scale);
    const ScreenBounds odd = screen_bounds(tile.logit_odd[p], screen_noise(w2[p], w3[p]), scale);
    tile.lo_even[p] = even.lo;
    tile.hi_even[p] = even.hi;
    tile.lo_odd[p] = odd.lo;
    tile.hi_odd[p] = odd.hi;
  }
  // Lane-wise running maxima (an elementwise loop the vectorizer takes), then across the lanes.
  float lanes[kFloorLanes];
  for (int j = 0; j < kFloorLanes; ++j) {
    lanes[j] = screen_detail::float_of(0xFF800000u);
  }
  for (int p = 0; p < kTilePairs; p += kFloorLanes) {
    for (int j = 0; j < kFloorLanes; ++j) {
      lanes[j] = screen_floor(screen_floor(lanes[j], tile.lo_even[p + j]), tile.lo_odd[p + j]);
    }
  }
  float floor = lanes[0];
  for (int j = 1; j < kFloorLanes; ++j) {
    floor = screen_floor(floor, lanes[j]);
  }
  return floor;
}

}  // namespace

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"))) float screen_tile_avx2(const uint32_t* w0, const uint32_t* w1, const uint32_t* w2,
                                                       const uint32_t* w3, float scale, ScreenTile& tile) {
  return screen_tile_body(w0, w1, w2, w3, scale, tile);
}
#else
// No AVX2 path in this build (cpu_has_avx2() is false, so this is never selected).
float screen_tile_avx2(const uint32_t* w0, const uint32_t* w1, const uint32_t* w2, const uint32_t* w3, float scale,
                       ScreenTile& tile) {
  return screen_tile_body(w0, w1, w2, w3, scale, tile);
}
#endif

// One token at a time (no vectorization), the fallback for processors without AVX2.
__attribute__((optimize("no-tree-vectorize", "no-trapping-math"))) float screen_tile_scalar(
    const uint32_t* w0, const uint32_t* w1, const uint32_t* w2, const uint32_t* w3, float scale, ScreenTile& tile) {
  return screen_tile_body(w0, w1, w2, w3, scale, tile);
}

}  // namespace hdlm
