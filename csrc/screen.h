// The screening rule of the exact samplers (docs/sampling-screen.md): a cheap float32 score of every token
// with an interval [lo, hi] that provably contains the token's exact FP64 score, so that only the tokens
// whose interval reaches the row's best lower bound need the exact score (gumbel_rule.h, log64.h).
//
// Nothing here has to be bit-identical across backends: the screen only chooses which tokens are scored
// exactly, and the proof holds for any float32 evaluation with IEEE round-to-nearest operations (with or
// without fused multiply-add, flushed or not). The exact second pass decides, with today's rule.
//
// Header-only, host and device, scalar; csrc/screen_avx2.h runs the same functions over tiles of tokens.
#pragma once

#include <cstdint>
#include <cstring>

#include "philox.h"  // HDLM_HOST_DEVICE

namespace hdlm {

namespace screen_detail {

// The bound: |cheap - exact| <= kRelative * |a| + kAbsolute, a = float32(logit) * float32(1 / T), with a
// factor of at least 2 to spare in each term (docs/sampling-screen.md, "The bound").
constexpr float kRelative = 0x1p-20f;
constexpr float kAbsolute = 0x1p-13f;
// The noise alone is within kNoiseError of the exact Gumbel noise (proved: 2^-15.4; measured: 2^-19).
constexpr float kNoiseError = 0x1p-14f;

// ln 2 = kLn2Hi + kLn2Lo: kLn2Hi has 9 significant bits, so e * kLn2Hi is exact for |e| < 2^15.
constexpr float kLn2Hi = 0x1.63p-1f;
constexpr float kLn2Lo = -0x1.bd0106p-13f;  // ln 2 - kLn2Hi, rounded
// 1 / (2k + 1), k = 0..4: log x = 2 atanh(s) = 2s (1 + z/3 + z^2/5 + ...), z = s^2.
constexpr float kA0 = 1.0f;
constexpr float kA1 = 0x1.555556p-2f;
constexpr float kA2 = 0x1.99999ap-3f;
constexpr float kA3 = 0x1.24924ap-3f;
constexpr float kA4 = 0x1.c71c72p-4f;
constexpr uint32_t kSqrt2Bits = 0x3FB504F3u;  // √2 rounded to float32; m above it is halved

HDLM_HOST_DEVICE inline uint32_t bits_of(float x) {
#ifdef __CUDA_ARCH__
  return static_cast<uint32_t>(__float_as_uint(x));
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
#endif
}

HDLM_HOST_DEVICE inline float float_of(uint32_t bits) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
#endif
}

// The series' quotient s = f / (2 + f): the IEEE division, which the proof counts as one rounding. The GPU
// kernels may pass a faster division within 2 ulp instead (screen_cuda.cuh), one more rounding that the
// bound's margin covers (docs/sampling-screen.md, "GPU kernels").
struct ExactQuotient {
  HDLM_HOST_DEVICE static float of(float f) { return f / (2.0f + f); }
};

// e * ln 2 + log(1 + f) = e * ln 2 + 2 atanh(s), s = f / (2 + f), with the series 2s (1 + z/3 + z^2/5 + ...)
// (z = s^2) cut after `kTerms` terms: 5 terms for |s| <= 1/3 (relative truncation error <= 1.8e-6), 4 for
// |s| <= 3 - 2√2 (absolute <= 2.9e-8).
template <int kTerms, class Quotient = ExactQuotient>
HDLM_HOST_DEVICE inline float log_from_parts(float f, float e) {
  static_assert(kTerms == 4 || kTerms == 5, "log_from_parts: 4 or 5 terms");
  const float s = Quotient::of(f);
  const float z = s * s;
  float p = kTerms == 5 ? kA4 : kA3;
  if (kTerms == 5) {
    p = p * z + kA3;
  }
  p = p * z + kA2;
  p = p * z + kA1;
  p = p * z + kA0;
  return e * kLn2Hi + (e * kLn2Lo + (s + s) * p);
}

// x = m * 2^e with m in (√2/2, √2]: returns f = m - 1 (exact) and e, for a positive normal float x.
HDLM_HOST_DEVICE inline void split(float x, float& f, float& e) {
  uint32_t bits = bits_of(x);
  int32_t exponent = static_cast<int32_t>(bits >> 23) - 127;
  uint32_t mantissa_bits = (bits & 0x007FFFFFu) | 0x3F800000u;
  const bool halve = mantissa_bits > kSqrt2Bits;
  mantissa_bits -= halve ? 0x00800000u : 0u;
  exponent += halve ? 1 : 0;
  f = float_of(mantissa_bits) - 1.0f;
  e = static_cast<float>(exponent);
}

}  // namespace screen_detail

// Natural logarithm of a positive normal float (within 2^-17 absolute for |log x| <= 45).
template <class Quotient = screen_detail::ExactQuotient>
HDLM_HOST_DEVICE inline float screen_log(float x) {
  float f, e;
  screen_detail::split(x, f, e);
  return screen_detail::log_from_parts<4, Quotient>(f, e);
}

// The cheap Gumbel noise of the uniform u = uniform53_from_words(word_a, word_b) (philox.h), within
// kNoiseError of gumbel_noise(u). u > 1/2 exactly when word_a's top bit is set; then 1 - u is the uniform of
// the complemented words, and -log u = -log(1 - (1 - u)) is taken without forming u (which float32 would
// round to 1): t = -log_from_parts(-(1 - u), 0). Otherwise t = -log(u). The noise is -log t.
template <class Quotient = screen_detail::ExactQuotient>
HDLM_HOST_DEVICE inline float screen_noise(uint32_t word_a, uint32_t word_b) {
  const uint32_t flip = static_cast<uint32_t>(static_cast<int32_t>(word_a) >> 31);  // all ones when u > 1/2
  word_a ^= flip;
  word_b ^= flip;
  // v = min(u, 1 - u) in [2^-53, 1/2]: two exact int -> float conversions, one rounding each.
  const float v = static_cast<float>(static_cast<int32_t>(word_a >> 6)) * 0x1p-26f +
                  static_cast<float>(static_cast<int32_t>(((word_b >> 6) << 1) | 1u)) * 0x1p-53f;
  float f, e;
  screen_detail::split(v, f, e);
  // Selections between values computed unconditionally (so that compilers keep the loop branch-free).
  const bool upper = flip != 0u;
  const float minus_v = -v;
  const float t = -screen_detail::log_from_parts<5, Quotient>(upper ? minus_v : f, upper ? 0.0f : e);  // -log u, in (0, 36.8]
  return -screen_log<Quotient>(t);
}

namespace screen_detail {

// ln(1 + f) = f * P(f) on f in [√2/2 - 1, √2 - 1]: P of degree 7 fitted to ln(1 + f) / f (Chebyshev nodes,
// coefficients rounded to float32). Relative error of f * P(f): <= 2^-22.4 in exact arithmetic, <= 2^-21.8
// over every float32 f when evaluated in float32 as written (tests/test_screen_math.py checks both);
// any round-to-nearest evaluation (fused or not) adds at most 5.1 * 2^-24 (docs/sampling-screen.md).
constexpr float kP0 = 0x1.fffffep-1f;
constexpr float kP1 = -0x1.00007ap-1f;
constexpr float kP2 = 0x1.555ap-2f;
constexpr float kP3 = -0x1.ff6316p-3f;
constexpr float kP4 = 0x1.9785cap-3f;
constexpr float kP5 = -0x1.613806p-3f;
constexpr float kP6 = 0x1.4c79e8p-3f;
constexpr float kP7 = -0x1.9f174ap-4f;
// Below this v, -log(1 - v) is taken as -f P(f) at f = -v (f stays in the polynomial's range).
constexpr float kNearOne = 0x1.2p-2f;  // 0.28125 < 1 - √2/2

HDLM_HOST_DEVICE inline float log1p_poly(float f) {
  float p = kP7;
  p = p * f + kP6;
  p = p * f + kP5;
  p = p * f + kP4;
  p = p * f + kP3;
  p = p * f + kP2;
  p = p * f + kP1;
  p = p * f + kP0;
  return f * p;
}

// e * ln 2 + ln(1 + f), division-free.
HDLM_HOST_DEVICE inline float log_poly_parts(float f, float e) { return e * kLn2Hi + (e * kLn2Lo + log1p_poly(f)); }

}  // namespace screen_detail

// The division-free twins of screen_log and screen_noise (a polynomial in f instead of 2 atanh(f / (2 + f))),
// within the same bounds (docs/sampling-screen.md, "The cheap noise"); the CPU tile stages use these.
HDLM_HOST_DEVICE inline float screen_log_fast(float x) {
  float f, e;
  screen_detail::split(x, f, e);
  return screen_detail::log_poly_parts(f, e);
}

// -log u: for u <= 1/2 from v = u; for u > 1/2 (v = 1 - u) as -log(1 - v), from f = -v directly while
// v <= kNearOne (so that small v keeps its relative accuracy), else from 1 - v, rounded once (v > 1/4: an
// error of at most 2^-25 on a result >= 1/2).
HDLM_HOST_DEVICE inline float screen_noise_fast(uint32_t word_a, uint32_t word_b) {
  const uint32_t flip = static_cast<uint32_t>(static_cast<int32_t>(word_a) >> 31);  // all ones when u > 1/2
  word_a ^= flip;
  word_b ^= flip;
  const float v = static_cast<float>(static_cast<int32_t>(word_a >> 6)) * 0x1p-26f +
                  static_cast<float>(static_cast<int32_t>(((word_b >> 6) << 1) | 1u)) * 0x1p-53f;
  const bool upper = flip != 0u;
  const bool near_one = upper && v <= screen_detail::kNearOne;
  float f, e;
  screen_detail::split(upper ? 1.0f - v : v, f, e);
  const float minus_v = -v;
  const float t = -screen_detail::log_poly_parts(near_one ? minus_v : f, near_one ? 0.0f : e);  // -log u
  return -screen_log_fast(t);
}

// An upper bound of the exact Gumbel noise g(u) = -ln(-ln u) of every uniform whose first word is `word_a`
// (whatever the second word), from integer and float32 operations only (docs/sampling-screen.md, "The
// prefilter"). A word without its top bit has u < 1/2, so g(u) < g(1/2) = -ln ln 2 = 0.36651...; otherwise
// v = 1 - u > A 2^-26 with A = (~word_a) >> 6, and g(u) < -ln v (since -ln(1 - v) > v) < 26 ln 2 - ln A.
// With A' = A >> 2 (exact in float32) and the bits of float32(A') read as a number, n 2^-23 - 127 is a lower
// bound of log2 A' (log2 m >= m - 1 on [1, 2]); an A' of 0 gives -127 and so a bound of 151 ln 2 > 53 ln 2,
// above every noise. The float32 roundings (at most 2^-16 in log2 A', 2^-22 relative in the products) are
// covered by the margin 2^-10.
HDLM_HOST_DEVICE inline float screen_noise_bound(uint32_t word_a) {
  const uint32_t complement = ~word_a >> 8;  // A' = A >> 2, below 2^24
  const float log2_lower = static_cast<float>(static_cast<int32_t>(screen_detail::bits_of(
                               static_cast<float>(static_cast<int32_t>(complement))))) * 0x1p-23f - 127.0f;
  const float upper_half = (24.0f - log2_lower) * 0x1.62e43p-1f + 0x1p-10f;  // (26 - 2 - log2 A') ln 2, rounded up
  return static_cast<int32_t>(word_a) < 0 ? upper_half : 0x1.7758p-2f;  // 0.366547 > -ln ln 2
}

// The interval [lo, hi] that holds the exact score of a token with float32 logit `logit` (the logits dtype
// widened exactly: fp32, bf16, fp16) and cheap noise `noise`, at scale = float32(1 / T) (1 for T = 1):
//   a = logit * scale;  c = a + noise;  B = kRelative |a| + kAbsolute;  [lo, hi] = [c - B, c + B]
// Special values: a -inf logit (or an excluded token) scores exactly -inf, so lo = hi = -inf; a NaN logit
// gives hi = NaN (always a candidate); a finite logit whose a overflows gives an interval that is unbounded
// on the overflowing side or NaN, which the candidate rule treats as a candidate.
struct ScreenBounds {
  float lo;
  float hi;
};

HDLM_HOST_DEVICE inline ScreenBounds screen_bounds(float logit, float noise, float scale) {
  const float a = logit * scale;
  const float c = a + noise;
  const float magnitude = screen_detail::float_of(screen_detail::bits_of(a) & 0x7FFFFFFFu);  // |a|
  const float bound = screen_detail::kRelative * magnitude + screen_detail::kAbsolute;
  const float minus_inf = screen_detail::float_of(0xFF800000u);
  const float lo = c - bound;
  const float hi = c + bound;
  const bool none = logit == minus_inf;
  return ScreenBounds{lo, none ? minus_inf : hi};
}

// Whether a token with upper bound `hi` can still win against a row whose best lower bound is `floor`
// (written so that a NaN upper bound is a candidate).
HDLM_HOST_DEVICE inline bool screen_candidate(float hi, float floor) { return !(hi < floor); }

// The running best lower bound (a NaN lower bound is ignored).
HDLM_HOST_DEVICE inline float screen_floor(float floor, float lo) { return lo > floor ? lo : floor; }

// Whether a temperature can be screened: 1 / T must be a float32 within [2^-100, 2^100], so that
// float32(1 / T) is normal with room for every float32 logit (temperature 0 is greedy and needs no screen).
HDLM_HOST_DEVICE inline bool screen_temperature(double temperature, float& scale) {
  if (temperature == 1.0) {
    scale = 1.0f;
    return true;
  }
  const double inverse = 1.0 / temperature;
  if (!(inverse >= 0x1p-100 && inverse <= 0x1p100)) {
    return false;
  }
  scale = static_cast<float>(inverse);
  return true;
}

}  // namespace hdlm
