// The exact fixed-point row sum of the γ step over float32 log-scores (hybrid_screen_avx2.h): the AVX2 build
// runs exp64 (log64.h) in 4 float64 lanes with the same IEEE operations in the same order, so each ratio, and
// hence each truncation, is bit-identical to the scalar code; only the order of the (exact, integer-valued)
// additions differs, which changes nothing.
#include "hybrid_screen_avx2.h"

#include "hybrid_rule.h"
#include "log64.h"

namespace hdlm {

void fixed_sum_scalar(const float* scores, int count, double shift, FixedSum& sum) {
  for (int i = 0; i < count; ++i) {
    fixed_add(sum, hybrid_ratio(static_cast<double>(scores[i]), shift));
  }
}

}  // namespace hdlm

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

namespace hdlm {
namespace {

// exp64 of 4 lanes, operation by operation as log64.h's exp64 (lanes below kExp64Min, or NaN, give 0). The
// table entries come from a gather; k >> 6 is taken on the int32 lanes (an arithmetic shift, the floor of
// k / 64 as in the scalar code: AVX2 has no 64-bit arithmetic shift).
__attribute__((target("avx2"), always_inline)) inline __m256d exp64_lanes(__m256d x) {
  using namespace log64_detail;
  const __m256d live = _mm256_cmp_pd(x, _mm256_set1_pd(kExp64Min), _CMP_GE_OQ);
  x = _mm256_and_pd(x, live);  // dead lanes compute exp64(0), then give 0
  const __m256d t = _mm256_mul_pd(x, _mm256_set1_pd(kInvLn2Times64));
  const __m256d half = _mm256_set1_pd(0.5);
  const __m256d nonnegative = _mm256_cmp_pd(t, _mm256_setzero_pd(), _CMP_GE_OQ);
  const __m256d rounded = _mm256_blendv_pd(_mm256_sub_pd(t, half), _mm256_add_pd(t, half), nonnegative);
  const __m256d kf = _mm256_round_pd(rounded, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);  // |k| < 2^17: exact
  const __m256d r = _mm256_sub_pd(_mm256_sub_pd(x, _mm256_mul_pd(kf, _mm256_set1_pd(kLn2Over64Hi))),
                                  _mm256_mul_pd(kf, _mm256_set1_pd(kLn2Over64Lo)));
  __m256d p = _mm256_add_pd(_mm256_mul_pd(_mm256_set1_pd(kE5), r), _mm256_set1_pd(kE4));
  p = _mm256_add_pd(_mm256_mul_pd(p, r), _mm256_set1_pd(kE3));
  p = _mm256_add_pd(_mm256_mul_pd(p, r), _mm256_set1_pd(kE2));
  const __m256d q = _mm256_add_pd(r, _mm256_mul_pd(_mm256_mul_pd(r, r), p));  // e^r - 1
  const __m128i k32 = _mm256_cvtpd_epi32(kf);  // exact: kf holds integers
  const __m128i j = _mm_and_si128(k32, _mm_set1_epi32(static_cast<int>(kExpTableMask)));
  const __m256d table_hi = _mm256_i32gather_pd(kExpTableHi, j, 8);
  const __m256d table_lo = _mm256_i32gather_pd(kExpTableLo, j, 8);
  // 2^(k >> 6) from the exponent field (k >> 6) + 1023, in [1, 2046].
  const __m256i field = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm_srai_epi32(k32, kExpTableBits)),
                                         _mm256_set1_epi64x(1023));
  const __m256d scale = _mm256_castsi256_pd(_mm256_slli_epi64(field, 52));
  const __m256d power = _mm256_add_pd(table_hi, _mm256_add_pd(table_lo, _mm256_mul_pd(table_hi, q)));
  return _mm256_and_pd(_mm256_mul_pd(power, scale), live);
}

// fixed_add of 4 ratios into integer-valued float64 lanes: trunc(r' 2^32) and trunc(frac(r' 2^32) 2^31),
// the truncations of hybrid_rule.h as exact roundings toward zero.
__attribute__((target("avx2"), always_inline)) inline void fixed_add_lanes(__m256d ratio, __m256d& hi,
                                                                           __m256d& lo) {
  const __m256d scaled = _mm256_mul_pd(ratio, _mm256_set1_pd(0x1p32));
  const __m256d high = _mm256_round_pd(scaled, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __m256d low = _mm256_round_pd(_mm256_mul_pd(_mm256_sub_pd(scaled, high), _mm256_set1_pd(0x1p31)),
                                      _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  hi = _mm256_add_pd(hi, high);
  lo = _mm256_add_pd(lo, low);
}

}  // namespace

__attribute__((target("avx2"))) void fixed_sum_avx2(const float* scores, int count, double shift,
                                                    FixedSumLanes& lanes) {
  __m256d hi = _mm256_load_pd(lanes.hi);
  __m256d lo = _mm256_load_pd(lanes.lo);
  const __m256d m = _mm256_set1_pd(shift);
  int i = 0;
  // Two independent groups of 4 per iteration: exp64 is a chain of some 17 dependent operations, so one
  // group leaves the floating-point units waiting on latency.
  for (; i + 8 <= count; i += 8) {
    const __m256d s0 = _mm256_cvtps_pd(_mm_loadu_ps(scores + i));
    const __m256d s1 = _mm256_cvtps_pd(_mm_loadu_ps(scores + i + 4));
    const __m256d r0 = exp64_lanes(_mm256_sub_pd(s0, m));
    const __m256d r1 = exp64_lanes(_mm256_sub_pd(s1, m));
    fixed_add_lanes(r0, hi, lo);
    fixed_add_lanes(r1, hi, lo);
  }
  for (; i + 4 <= count; i += 4) {
    const __m256d s = _mm256_cvtps_pd(_mm_loadu_ps(scores + i));  // exact widening
    fixed_add_lanes(exp64_lanes(_mm256_sub_pd(s, m)), hi, lo);
  }
  if (i < count) {  // the tail, padded with -inf (ratio 0)
    alignas(16) float tail[4];
    for (int j = 0; j < 4; ++j) {
      tail[j] = i + j < count ? scores[i + j] : -__builtin_inff();
    }
    fixed_add_lanes(exp64_lanes(_mm256_sub_pd(_mm256_cvtps_pd(_mm_load_ps(tail)), m)), hi, lo);
  }
  _mm256_store_pd(lanes.hi, hi);
  _mm256_store_pd(lanes.lo, lo);
}

namespace {

// exp64 of 8 lanes: exp64_lanes above, operation by operation, with AVX-512 masks in place of the AVX2 blends
// (a masked move to zero is the AND with the all-ones comparison result). Without FMA contraction
// (-ffp-contract=off): every product and sum is rounded on its own, as in the scalar exp64.
__attribute__((target("avx512f"), always_inline)) inline __m512d exp64_lanes8(__m512d x) {
  using namespace log64_detail;
  const __mmask8 live = _mm512_cmp_pd_mask(x, _mm512_set1_pd(kExp64Min), _CMP_GE_OQ);
  x = _mm512_maskz_mov_pd(live, x);
  const __m512d t = _mm512_mul_pd(x, _mm512_set1_pd(kInvLn2Times64));
  const __m512d half = _mm512_set1_pd(0.5);
  const __mmask8 nonnegative = _mm512_cmp_pd_mask(t, _mm512_setzero_pd(), _CMP_GE_OQ);
  const __m512d rounded = _mm512_mask_blend_pd(nonnegative, _mm512_sub_pd(t, half), _mm512_add_pd(t, half));
  const __m512d kf = _mm512_roundscale_pd(rounded, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __m512d r = _mm512_sub_pd(_mm512_sub_pd(x, _mm512_mul_pd(kf, _mm512_set1_pd(kLn2Over64Hi))),
                                  _mm512_mul_pd(kf, _mm512_set1_pd(kLn2Over64Lo)));
  __m512d p = _mm512_add_pd(_mm512_mul_pd(_mm512_set1_pd(kE5), r), _mm512_set1_pd(kE4));
  p = _mm512_add_pd(_mm512_mul_pd(p, r), _mm512_set1_pd(kE3));
  p = _mm512_add_pd(_mm512_mul_pd(p, r), _mm512_set1_pd(kE2));
  const __m512d q = _mm512_add_pd(r, _mm512_mul_pd(_mm512_mul_pd(r, r), p));  // e^r - 1
  const __m256i k32 = _mm512_cvtpd_epi32(kf);  // exact: kf holds integers
  const __m256i j = _mm256_and_si256(k32, _mm256_set1_epi32(static_cast<int>(kExpTableMask)));
  const __m512d table_hi = _mm512_i32gather_pd(j, kExpTableHi, 8);
  const __m512d table_lo = _mm512_i32gather_pd(j, kExpTableLo, 8);
  const __m512i field = _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm256_srai_epi32(k32, kExpTableBits)),
                                         _mm512_set1_epi64(1023));
  const __m512d scale = _mm512_castsi512_pd(_mm512_slli_epi64(field, 52));
  const __m512d power = _mm512_add_pd(table_hi, _mm512_add_pd(table_lo, _mm512_mul_pd(table_hi, q)));
  return _mm512_maskz_mov_pd(live, _mm512_mul_pd(power, scale));
}

__attribute__((target("avx512f"), always_inline)) inline void fixed_add_lanes8(__m512d ratio, __m512d& hi,
                                                                               __m512d& lo) {
  const __m512d scaled = _mm512_mul_pd(ratio, _mm512_set1_pd(0x1p32));
  const __m512d high = _mm512_roundscale_pd(scaled, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __m512d low = _mm512_roundscale_pd(_mm512_mul_pd(_mm512_sub_pd(scaled, high), _mm512_set1_pd(0x1p31)),
                                           _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  hi = _mm512_add_pd(hi, high);
  lo = _mm512_add_pd(lo, low);
}

}  // namespace

// Two groups of 8 per iteration (exp64's dependent chain is latency-bound). The 8 lanes fold into the 4 of
// FixedSumLanes at the end: each lane sum is an integer below V/8 * 2^32 < 2^50 (V < 2^21), so the folded
// sums stay exact.
__attribute__((target("avx512f"))) void fixed_sum_avx512(const float* scores, int count, double shift,
                                                        FixedSumLanes& lanes) {
  __m512d hi = _mm512_setzero_pd();
  __m512d lo = _mm512_setzero_pd();
  const __m512d m = _mm512_set1_pd(shift);
  int i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m512d r0 = exp64_lanes8(_mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(scores + i)), m));
    const __m512d r1 = exp64_lanes8(_mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(scores + i + 8)), m));
    fixed_add_lanes8(r0, hi, lo);
    fixed_add_lanes8(r1, hi, lo);
  }
  alignas(64) double hi_lanes[8];
  alignas(64) double lo_lanes[8];
  _mm512_store_pd(hi_lanes, hi);
  _mm512_store_pd(lo_lanes, lo);
  for (int j = 0; j < 4; ++j) {
    lanes.hi[j] += hi_lanes[j] + hi_lanes[j + 4];
    lanes.lo[j] += lo_lanes[j] + lo_lanes[j + 4];
  }
  if (i < count) {  // the last 0..15 scores, in 4-lane groups and a padded tail
    fixed_sum_avx2(scores + i, count - i, shift, lanes);
  }
}

}  // namespace hdlm
#else
namespace hdlm {
void fixed_sum_avx512(const float* scores, int count, double shift, FixedSumLanes& lanes) {
  fixed_sum_avx2(scores, count, shift, lanes);
}
// No AVX2 in this build (cpu_has_avx2() is false, so this is never called): the scalar code into the lanes.
void fixed_sum_avx2(const float* scores, int count, double shift, FixedSumLanes& lanes) {
  FixedSum sum{0, 0};
  fixed_sum_scalar(scores, count, shift, sum);
  lanes.hi[0] += static_cast<double>(sum.hi);
  lanes.lo[0] += static_cast<double>(sum.lo);
}
}  // namespace hdlm
#endif
