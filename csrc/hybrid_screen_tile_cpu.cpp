// The γ step's screening stage over a tile (hybrid_screen_avx2.h), compiled twice: for AVX2 (target attribute,
// 8 float lanes) and portably ("scalar"). Without trapping-math in this file only, for the reason given in
// screen_tile_cpu.cpp (the float32 selections become blends); it holds no FP64 code.
#pragma GCC optimize("no-trapping-math")

#include "hybrid_screen_avx2.h"

#include "hybrid_screen.h"
#include "screen.h"

namespace hdlm {
namespace {

constexpr int kFloorLanes = 8;

__attribute__((always_inline)) inline float hybrid_screen_tile_body(const uint32_t* __restrict w0,
                                                                    const uint32_t* __restrict w1,
                                                                    const uint32_t* __restrict w2,
                                                                    const uint32_t* __restrict w3,
                                                                    const HybridScreenRow& row_in, float floor,
                                                                    ScreenTile& tile, bool& any) {
  const HybridScreenRow row = row_in;  // a local copy: no aliasing with the tile's stores
  for (int p = 0; p < kTilePairs; ++p) {
    const ScreenBounds even = hybrid_screen_bounds(tile.logit_even[p], screen_noise(w0[p], w1[p]), row);
    const ScreenBounds odd = hybrid_screen_bounds(tile.logit_odd[p], screen_noise(w2[p], w3[p]), row);
    tile.lo_even[p] = even.lo;
    tile.hi_even[p] = even.hi;
    tile.lo_odd[p] = odd.lo;
    tile.hi_odd[p] = odd.hi;
  }
  float lanes[kFloorLanes];
  for (int j = 0; j < kFloorLanes; ++j) {
    lanes[j] = screen_detail::float_of(0xFF800000u);
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

}  // namespace

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"))) float hybrid_screen_tile_avx2(const uint32_t* w0, const uint32_t* w1,
                                                              const uint32_t* w2, const uint32_t* w3,
                                                              const HybridScreenRow& row, float floor,
                                                              ScreenTile& tile, bool& any) {
  return hybrid_screen_tile_body(w0, w1, w2, w3, row, floor, tile, any);
}
#else
float hybrid_screen_tile_avx2(const uint32_t* w0, const uint32_t* w1, const uint32_t* w2, const uint32_t* w3,
                              const HybridScreenRow& row, float floor, ScreenTile& tile, bool& any) {
  return hybrid_screen_tile_body(w0, w1, w2, w3, row, floor, tile, any);
}
#endif

float hybrid_screen_tile_scalar(const uint32_t* w0, const uint32_t* w1, const uint32_t* w2, const uint32_t* w3,
                                const HybridScreenRow& row, float floor, ScreenTile& tile, bool& any) {
  return hybrid_screen_tile_body(w0, w1, w2, w3, row, floor, tile, any);
}

}  // namespace hdlm
