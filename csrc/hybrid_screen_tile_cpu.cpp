// The γ step's screening stage over a tile (hybrid_screen_avx2.h), compiled twice: for AVX2 (target attribute,
// 8 float lanes) and portably ("scalar"). Without trapping-math in this file only, for the reason given in
// screen_tile_cpu.cpp (the float32 selections become blends); it holds no FP64 code.
#pragma GCC optimize("no-trapping-math")

#include "hybrid_screen_avx2.h"

#include "hybrid_screen.h"
#include "screen.h"

namespace hdlm {
namespace {


template <bool kKZero>
__attribute__((always_inline)) inline void hybrid_screen_pairs(const uint32_t* __restrict w0,
                                                               const uint32_t* __restrict w1,
                                                               const uint32_t* __restrict w2,
                                                               const uint32_t* __restrict w3,
                                                               const float shift, const float log_c1,
                                                               const float log_k, ScreenTile& tile) {
  for (int p = 0; p < kTilePairs; ++p) {
    const ScreenBounds even = hybrid_screen_bounds<kKZero>(tile.logit_even[p], screen_noise_fast(w0[p], w1[p]), shift,
                                                                log_c1, log_k);
    const ScreenBounds odd = hybrid_screen_bounds<kKZero>(tile.logit_odd[p], screen_noise_fast(w2[p], w3[p]), shift,
                                                               log_c1, log_k);
    tile.lo_even[p] = even.lo;
    tile.hi_even[p] = even.hi;
    tile.lo_odd[p] = odd.lo;
    tile.hi_odd[p] = odd.hi;
  }
}

__attribute__((always_inline)) inline float hybrid_screen_tile_body(const uint32_t* __restrict w0,
                                                                    const uint32_t* __restrict w1,
                                                                    const uint32_t* __restrict w2,
                                                                    const uint32_t* __restrict w3,
                                                                    const HybridScreenRow& row_in, float floor,
                                                                    ScreenTile& tile, bool& any) {
  const HybridScreenRow row = row_in;  // a local copy: no aliasing with the tile's stores
  if (row.k_zero) {
    hybrid_screen_pairs<true>(w0, w1, w2, w3, row.shift, row.log_c1, row.log_k, tile);
  } else {
    hybrid_screen_pairs<false>(w0, w1, w2, w3, row.shift, row.log_c1, row.log_k, tile);
  }
  return raise_floor(tile, floor, any);
}

// The prefilter (screen_avx2.h, tile_reaches_*) with the γ step's interval: the K = 0 form of
// hybrid_screen_bounds takes φ = 0, an upper bound of φ(y) for every K, and the noise bound of the first word
// stands in for the cheap noise (it is at least the exact noise; the margin's 40 covers its size).
__attribute__((always_inline)) inline bool hybrid_tile_reaches_body(const uint32_t* __restrict w0,
                                                                    const uint32_t* __restrict w2,
                                                                    const ScreenTile& tile,
                                                                    const HybridScreenRow& row_in, float floor) {
  const HybridScreenRow row = row_in;
  int reach = 0;
  for (int p = 0; p < kTilePairs; ++p) {
    const float even =
        hybrid_screen_bounds<true>(tile.logit_even[p], screen_noise_bound(w0[p]), row.shift, row.log_c1, 0.0f).hi;
    const float odd =
        hybrid_screen_bounds<true>(tile.logit_odd[p], screen_noise_bound(w2[p]), row.shift, row.log_c1, 0.0f).hi;
    reach |= static_cast<int>(screen_candidate(even, floor)) | static_cast<int>(screen_candidate(odd, floor));
  }
  return reach != 0;
}

}  // namespace

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"))) bool hybrid_tile_reaches_avx2(const uint32_t* w0, const uint32_t* w2,
                                                              const ScreenTile& tile, const HybridScreenRow& row,
                                                              float floor) {
  return hybrid_tile_reaches_body(w0, w2, tile, row, floor);
}
#else
bool hybrid_tile_reaches_avx2(const uint32_t* w0, const uint32_t* w2, const ScreenTile& tile,
                              const HybridScreenRow& row, float floor) {
  return hybrid_tile_reaches_body(w0, w2, tile, row, floor);
}
#endif

bool hybrid_tile_reaches_scalar(const uint32_t* w0, const uint32_t* w2, const ScreenTile& tile,
                                const HybridScreenRow& row, float floor) {
  return hybrid_tile_reaches_body(w0, w2, tile, row, floor);
}

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
