// The γ step's screening stage over a tile (hybrid_screen_avx2.h), compiled twice: for AVX2 (target attribute,
// 8 float lanes) and portably ("scalar"). Without trapping-math in this file only, for the reason given in
// screen_tile_cpu.cpp (the float32 selections become blends); it holds no FP64 code.
#pragma GCC optimize("no-trapping-math")

#include "hybrid_screen_avx2.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

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

// The largest of `count` float32 values and whether one is NaN or +inf (max is exact, so the order of the
// comparisons does not matter when no value is NaN, and a NaN makes the row bad whatever the maximum).
inline float read_maximum_tail(const float* values, int64_t begin, int64_t count, float top, bool& bad) {
  constexpr float kInf = __builtin_inff();
  for (int64_t i = begin; i < count; ++i) {
    bad = bad || !(values[i] < kInf);
    top = values[i] > top ? values[i] : top;
  }
  return top;
}

}  // namespace

#if defined(__x86_64__) && defined(__GNUC__)
// 8 running maxima and NaN/+inf flags in AVX2 lanes (the vectorizer does not take the flagged maximum).
__attribute__((target("avx2"))) float read_maximum_avx2(const float* values, int64_t count, bool& bad) {
  const __m256 inf = _mm256_set1_ps(__builtin_inff());
  __m256 top = _mm256_set1_ps(-__builtin_inff());
  __m256 flags = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256 v = _mm256_loadu_ps(values + i);
    flags = _mm256_or_ps(flags, _mm256_cmp_ps(v, inf, _CMP_NLT_UQ));  // NaN or +inf
    top = _mm256_max_ps(v, top);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top);
  bad = _mm256_movemask_ps(flags) != 0;
  float best = read_maximum_tail(values, i, count, -__builtin_inff(), bad);
  return read_maximum_tail(lanes, 0, 8, best, bad);
}
#else
float read_maximum_avx2(const float* values, int64_t count, bool& bad) {
  bad = false;
  return read_maximum_tail(values, 0, count, -__builtin_inff(), bad);
}
#endif

float read_maximum_scalar(const float* values, int64_t count, bool& bad) {
  bad = false;
  return read_maximum_tail(values, 0, count, -__builtin_inff(), bad);
}

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
