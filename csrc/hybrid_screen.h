// The screening rule of the γ step's race (docs/sampling-screen.md, "The γ step"): for a read token y of a
// row whose exact row sum S (so K = c2 * S, hybrid_rule.h) is known, a float32 interval [lo, hi] that
// provably holds the exact score log64(w_y) + g_y, w_y = c1 * (r'_y - K), r'_y = exp64(s_y - m), computed
// without any FP64 operation. Only the tokens whose interval reaches the row's best lower bound are scored
// exactly (hybrid_rule.h), so the tokens are the full race's, bit for bit.
//
// The interval is built in the log domain, where nothing cancels: ln w = ln c1 + ln r' + φ(y), with
// y = ln r' - ln K and φ(y) = ln(1 - e^-y) (φ = 0 when K = 0). φ is increasing, and for y > 0
//   ln y - y/2 <= φ(y) <= min(0, ln y)        (1 - e^-y = 2 e^-y/2 sinh(y/2), sinh(t) >= t; e^y - 1 <= y e^y)
//   φ(y) >= φ(a) for y >= a                    (monotonicity: the ladder of ladder_bound below)
// A token with y <= 0 has r' <= K, so its weight is exactly <= 0 and its score exactly -inf.
//
// Like screen.h, nothing here must be bit-identical across backends: any IEEE round-to-nearest float32
// evaluation (fused or not) satisfies the bound. Header-only, host and device, scalar;
// csrc/hybrid_screen_tile_cpu.cpp runs it over tiles of tokens.
#pragma once

#include <cstdint>

#include "log64.h"
#include "philox.h"  // HDLM_HOST_DEVICE
#include "screen.h"

namespace hdlm {

namespace hybrid_screen_detail {

// ln(1 - e^-a) rounded down (to float32, after subtracting 2^-40): lower bounds of φ(y) for y >= a.
HDLM_HOST_DEVICE inline float ladder_bound(float y) {
  // Written as a chain of selections (no table), so that vectorizers if-convert it.
  float phi = -0x1.d5aef0p-2f;            // a = 1
  phi = y >= 2.0f ? -0x1.29ce88p-3f : phi;   // a = 2
  phi = y >= 3.0f ? -0x1.a25bd6p-5f : phi;   // a = 3
  phi = y >= 4.0f ? -0x1.2edd96p-6f : phi;   // a = 4
  phi = y >= 6.0f ? -0x1.454c60p-9f : phi;   // a = 6
  phi = y >= 8.0f ? -0x1.5fd12cp-12f : phi;  // a = 8
  phi = y >= 11.0f ? -0x1.1835dep-16f : phi;  // a = 11
  phi = y >= 16.0f ? -0x1.e356bep-24f : phi;  // a = 16
  phi = y >= 24.0f ? -0x1.54107ap-35f : phi;  // a = 24
  return phi;
}

// |ln r' - (s - m)_float32| <= kLogRatioRelative |s - m| + kTiny (float32 and float64 roundings of s - m,
// exp64 within 1 ulp), with room to spare.
constexpr float kLogRatioRelative = 0x1p-22f;
constexpr float kTiny = 0x1p-40f;
// The error of y's computed bounds (three float32 roundings, ln K to float32): kYRelative (|ln K| + |s - m|).
constexpr float kYRelative = 0x1p-21f;
// The final margin: kMarginRelative (|ln c1| + |s - m| + |φ| + 40) + kMarginAbsolute covers the float32
// roundings of the sums, ln c1 to float32 and the cheap noise (screen.h, kNoiseError).
constexpr float kMarginRelative = 0x1p-19f;
constexpr float kMarginAbsolute = 0x1p-12f;
// ln 2 rounded up and down, and the slack of the float32 evaluations of e ln 2 - y/2 and y - 1 (|e| <= 60,
// 0 < y < 1: at most two roundings of at most 2^-24 * 42 each).
constexpr float kLn2Up = 0x1.62e430p-1f;
constexpr float kLn2Down = 0x1.62e42ep-1f;
constexpr float kPhiSlack = 0x1p-16f;
constexpr float kSmallestY = 0x1p-60f;
// Below these, r' may be 0 (exp64 flushes below -708) or the weight below 2^-1022 (ln 2^-1022 = -708.4):
// the lower end is -inf. Below kDead the ratio is exactly 0, so the score is exactly -inf.
constexpr float kLowRatio = -707.5f;
constexpr float kLowLogWeight = -707.0f;
constexpr float kDead = -709.0f;

// The exponent e of a positive normal float y in [2^e, 2^(e+1)), as a float (exact).
HDLM_HOST_DEVICE inline float exponent_of(float y) {
  return static_cast<float>(static_cast<int32_t>(screen_detail::bits_of(y) >> 23) - 127);
}

HDLM_HOST_DEVICE inline float magnitude(float x) { return screen_detail::float_of(screen_detail::bits_of(x) & 0x7FFFFFFFu); }

}  // namespace hybrid_screen_detail

// What the screen of a row needs, from m, c1 and K = c2 * S (all exact float64 values of the row).
struct HybridScreenRow {
  float shift;      // m: the maximum of float32 values, 0 or -708, so exact in float32
  float log_c1;     // float32(log64(c1))
  float log_k;      // float32(log64(K)), unused when k_zero
  bool k_zero;      // K = 0 (Euler): w = c1 * r'
};

// Whether the screen applies to a row with these exact constants, and its float32 form: c1 and K (when not 0)
// in [2^-100, 2^100] (so that their logarithms are moderate), the shift a float32 value. Other rows take the
// full exact race (a row with c1 = 0 has no read token of positive weight at all: hybrid_cpu.cpp).
HDLM_HOST_DEVICE inline bool hybrid_screen_row(double shift, double c1, double k, HybridScreenRow& row) {
  const bool c1_ok = c1 >= 0x1p-100 && c1 <= 0x1p100;
  const bool k_ok = k == 0.0 || (k >= 0x1p-100 && k <= 0x1p100);
  if (!c1_ok || !k_ok || static_cast<double>(static_cast<float>(shift)) != shift) {
    return false;
  }
  row.shift = static_cast<float>(shift);
  row.log_c1 = static_cast<float>(log64(c1));
  row.k_zero = k == 0.0;
  row.log_k = row.k_zero ? 0.0f : static_cast<float>(log64(k));
  return true;
}

// The interval of the exact score of a read token with float32 log-score `score` (the dtype widened
// exactly; -inf for tokens that are not read: their exact score is -inf) and cheap noise `noise`
// (screen_noise of its Philox words), with the row's HybridScreenRow fields. kKZero: the row's K is 0 (then φ = 0). Written as a chain of
// selections, each on one comparison, so that vectorizers if-convert it.
template <bool kKZero>
HDLM_HOST_DEVICE inline ScreenBounds hybrid_screen_bounds(float score, float noise, float shift, float log_c1,
                                                          float log_k) {
  using namespace hybrid_screen_detail;
  const float minus_inf = screen_detail::float_of(0xFF800000u);
  const float x = score - shift;  // <= 0: ln r' within kLogRatioRelative |x| + kTiny
  const float ax = magnitude(x);
  const float e1 = kLogRatioRelative * ax + kTiny;
  float phi_hi = 0.0f;
  float phi_lo = 0.0f;
  float y_hi = 1.0f;
  float y_lo = 1.0f;
  if (!kKZero) {
    const float ek = kYRelative * (magnitude(log_k) + ax) + kTiny;
    y_hi = ((x + e1) - log_k) + ek;  // y = ln r' - ln K lies in [y_lo, y_hi]
    y_lo = ((x - e1) - log_k) - ek;
    // φ(y) <= min(0, ln y) at y_hi, with ln y <= min(y - 1, (e + 1) ln 2) for y in [2^e, 2^(e+1)), e the
    // exponent field (y_hi <= 0, an exact zero weight, is handled below).
    const float e_hi = exponent_of(y_hi > kSmallestY ? y_hi : kSmallestY);
    const float log_y_hi = (e_hi + 1.0f) * kLn2Down;  // e + 1 <= 0 where it matters
    const float below_one = (y_hi - 1.0f < log_y_hi ? y_hi - 1.0f : log_y_hi) + kPhiSlack;
    phi_hi = below_one < 0.0f ? below_one : 0.0f;
    // φ(y) >= ln y - y/2 >= e ln 2 - y/2 below 1, the ladder above (y_lo < kSmallestY is handled below).
    const float e_lo = exponent_of(y_lo > kSmallestY ? y_lo : 1.0f);
    phi_lo = y_lo >= 1.0f ? ladder_bound(y_lo) : (e_lo * kLn2Up - 0.5f * y_lo) - kPhiSlack;
  }
  const float base = log_c1 + x;  // ln c1 + ln r', up to the margin
  const float size = magnitude(log_c1) + ax + 40.0f;
  const float lw_lo = base + phi_lo;
  float hi = ((base + phi_hi) + noise) + (kMarginRelative * (size + magnitude(phi_hi)) + kMarginAbsolute);
  float lo = (lw_lo + noise) - (kMarginRelative * (size + magnitude(phi_lo)) + kMarginAbsolute);
  // Lower end -inf where r' may be 0, the weight below 2^-1022, or y below kSmallestY.
  lo = x - e1 >= kLowRatio ? lo : minus_inf;
  lo = lw_lo >= kLowLogWeight ? lo : minus_inf;
  if (!kKZero) {
    lo = y_lo >= kSmallestY ? lo : minus_inf;
    hi = y_hi > 0.0f ? hi : minus_inf;  // r' <= K: the weight is exactly <= 0
  }
  // r' = 0 exactly (also -inf and absent tokens): the score is exactly -inf.
  lo = x >= kDead ? lo : minus_inf;
  hi = x >= kDead ? hi : minus_inf;
  return ScreenBounds{lo, hi};
}

}  // namespace hdlm
