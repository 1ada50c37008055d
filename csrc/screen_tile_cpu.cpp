// The screening stage over a tile (screen_avx2.h), compiled twice: for AVX2 (target attribute, 8 float lanes)
// and portably ("scalar"). Without trapping-math in this file only: the loop holds float32 selections
// (ternaries between computed values) that GCC if-converts into vector blends only when it may assume that
// floating-point operations do not trap. That changes no value (every operation is still rounded to nearest,
// nothing is reassociated or contracted: -ffp-contract=off), and the exact FP64 arithmetic of the samplers
// is in other translation units.
#pragma GCC optimize("no-trapping-math")

#include "screen_avx2.h"

#include "philox.h"
#include "screen.h"

namespace hdlm {
namespace {


__attribute__((always_inline)) inline float screen_tile_body(const uint32_t* __restrict w0,
                                                             const uint32_t* __restrict w1,
                                                             const uint32_t* __restrict w2,
                                                             const uint32_t* __restrict w3, float scale,
                                                             float floor, ScreenTile& tile, bool& any) {
  for (int p = 0; p < kTilePairs; ++p) {
    const ScreenBounds even = screen_bounds(tile.logit_even[p], screen_noise_fast(w0[p], w1[p]), scale);
    const ScreenBounds odd = screen_bounds(tile.logit_odd[p], screen_noise_fast(w2[p], w3[p]), scale);
    tile.lo_even[p] = even.lo;
    tile.hi_even[p] = even.hi;
    tile.lo_odd[p] = odd.lo;
    tile.hi_odd[p] = odd.hi;
  }
  return raise_floor(tile, floor, any);
}

__attribute__((always_inline)) inline bool tile_reaches_body(const uint32_t* __restrict w0,
                                                             const uint32_t* __restrict w2, const ScreenTile& tile,
                                                             float scale, float floor) {
  int reach = 0;
  for (int p = 0; p < kTilePairs; ++p) {
    const float even = screen_bounds(tile.logit_even[p], screen_noise_bound(w0[p]), scale).hi;
    const float odd = screen_bounds(tile.logit_odd[p], screen_noise_bound(w2[p]), scale).hi;
    reach |= static_cast<int>(screen_candidate(even, floor)) | static_cast<int>(screen_candidate(odd, floor));
  }
  return reach != 0;
}

}  // namespace

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"))) bool tile_reaches_avx2(const uint32_t* w0, const uint32_t* w2, const ScreenTile& tile,
                                                       float scale, float floor) {
  return tile_reaches_body(w0, w2, tile, scale, floor);
}
#else
bool tile_reaches_avx2(const uint32_t* w0, const uint32_t* w2, const ScreenTile& tile, float scale, float floor) {
  return tile_reaches_body(w0, w2, tile, scale, floor);
}
#endif

bool tile_reaches_scalar(const uint32_t* w0, const uint32_t* w2, const ScreenTile& tile, float scale, float floor) {
  return tile_reaches_body(w0, w2, tile, scale, floor);
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"))) float screen_tile_avx2(const uint32_t* w0, const uint32_t* w1, const uint32_t* w2,
                                                       const uint32_t* w3, float scale, float floor, ScreenTile& tile, bool& any) {
  return screen_tile_body(w0, w1, w2, w3, scale, floor, tile, any);
}
#else
// No AVX2 path in this build (cpu_has_avx2() is false, so this is never selected).
float screen_tile_avx2(const uint32_t* w0, const uint32_t* w1, const uint32_t* w2, const uint32_t* w3, float scale,
                       float floor, ScreenTile& tile, bool& any) {
  return screen_tile_body(w0, w1, w2, w3, scale, floor, tile, any);
}
#endif

// The portable build, for processors without AVX2 (the compiler may still vectorize it for the baseline
// instruction set: SSE2 on x86-64, NEON on aarch64).
float screen_tile_scalar(const uint32_t* w0, const uint32_t* w1, const uint32_t* w2, const uint32_t* w3, float scale,
                         float floor, ScreenTile& tile, bool& any) {
  return screen_tile_body(w0, w1, w2, w3, scale, floor, tile, any);
}

}  // namespace hdlm

// ---------------------------------------------------------------- Philox in AVX2 lanes

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

namespace hdlm {
namespace {

// hi:lo = m * c for 8 lanes of 32-bit words: vpmuludq multiplies the even lanes, and the odd lanes shifted down.
__attribute__((target("avx2"), always_inline)) inline void mulhilo_lanes(__m256i m, __m256i c, __m256i& hi,
                                                                         __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(c, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

}  // namespace

__attribute__((target("avx2"))) void philox_tile_avx2(uint64_t seed, uint64_t step, uint32_t stream,
                                                      uint64_t first_pair, uint32_t* w0, uint32_t* w1, uint32_t* w2,
                                                      uint32_t* w3) {
  using namespace philox_detail;
  const __m256i mul0 = _mm256_set1_epi32(static_cast<int>(kMul0));
  const __m256i mul1 = _mm256_set1_epi32(static_cast<int>(kMul1));
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const uint32_t first_lo = static_cast<uint32_t>(first_pair);
  const __m256i first_lo_signed = _mm256_xor_si256(_mm256_set1_epi32(static_cast<int>(first_lo)), sign);
  for (int p = 0; p < kTilePairs; p += 8) {
    // Counter (n lo, n hi, stream, step lo) of pairs n = first_pair + p + lane; n lo wraps into n hi.
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first_lo + static_cast<uint32_t>(p))), lanes);
    const __m256i carry = _mm256_cmpgt_epi32(first_lo_signed, _mm256_xor_si256(c0, sign));  // c0 < first lo
    __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(first_pair >> 32)), carry);
    __m256i c2 = _mm256_set1_epi32(static_cast<int>(stream));
    __m256i c3 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(step)));
    uint32_t k0 = static_cast<uint32_t>(seed);
    uint32_t k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < kRounds; ++round) {
      if (round > 0) {
        k0 += kKeyBump0;
        k1 += kKeyBump1;
      }
      __m256i hi0, lo0, hi1, lo1;
      mulhilo_lanes(mul0, c0, hi0, lo0);
      mulhilo_lanes(mul1, c2, hi1, lo1);
      const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c0 = n0;
      c1 = lo1;
      c2 = n2;
      c3 = lo0;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w0 + p), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w1 + p), c1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w2 + p), c2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w3 + p), c3);
  }
}

}  // namespace hdlm
#else
namespace hdlm {
void philox_tile_avx2(uint64_t seed, uint64_t step, uint32_t stream, uint64_t first_pair, uint32_t* w0, uint32_t* w1,
                      uint32_t* w2, uint32_t* w3) {
  for (int p = 0; p < kTilePairs; ++p) {
    const PhiloxBlock block = philox_block_for_pair(seed, step, stream, first_pair + static_cast<uint64_t>(p));
    w0[p] = block.w[0];
    w1[p] = block.w[1];
    w2[p] = block.w[2];
    w3[p] = block.w[3];
  }
}
}  // namespace hdlm
#endif
