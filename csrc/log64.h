// The float64 logarithm of hdlm_kernels/sampling/log64.py, operation by operation, and the Gumbel noise
// built on it (DESIGN.md §6). Header-only so that the C++ CPU path and the CUDA path compile the very
// same recipe, which the torch, NumPy and Triton twins follow too: every step is exact (bit
// extraction, Sterbenz subtraction, int -> double) or one correctly rounded IEEE operation, in one
// fixed order, so every backend returns the same bits.
//
// No fused multiply-add anywhere: a contracted p * z + c rounds once instead of twice and changes the
// last bit. On the device every operation is an explicit round-to-nearest intrinsic (__dmul_rn,
// __dadd_rn, __ddiv_rn), which nvcc never contracts whatever --fmad says; on the host the sources are
// compiled with -ffp-contract=off (setup.py) and x86-64 double arithmetic is SSE2, never x87.
#pragma once

#include <cstdint>
#include <cstring>

#include "philox.h"  // HDLM_HOST_DEVICE

namespace hdlm {

// Correctly rounded float64 operations that are never fused.
HDLM_HOST_DEVICE inline double add_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

HDLM_HOST_DEVICE inline double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

HDLM_HOST_DEVICE inline double div_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}

namespace log64_detail {

// C[k] = 1 / (2k + 1) as the correctly rounded doubles of LOG64_COEFFICIENTS (tests compare them
// through _C.log64_constants). Scalars, not an array: nvcc lets device code read constexpr scalars.
constexpr double kC0 = 0x1.0000000000000p+0;
constexpr double kC1 = 0x1.5555555555555p-2;
constexpr double kC2 = 0x1.999999999999ap-3;
constexpr double kC3 = 0x1.2492492492492p-3;
constexpr double kC4 = 0x1.c71c71c71c71cp-4;
constexpr double kC5 = 0x1.745d1745d1746p-4;
constexpr double kC6 = 0x1.3b13b13b13b14p-4;
constexpr double kC7 = 0x1.1111111111111p-4;
constexpr double kC8 = 0x1.e1e1e1e1e1e1ep-5;
constexpr double kC9 = 0x1.af286bca1af28p-5;
constexpr double kC10 = 0x1.8618618618618p-5;
// ln 2 split so that e * LN2_HI is exact for |e| < 2^11 (LN2_HI has 32 trailing zero bits).
constexpr double kLn2Hi = 0x1.62e42fee00000p-1;
constexpr double kLn2Lo = 0x1.a39ef35793c76p-33;

constexpr uint64_t kMantissaMask = (uint64_t{1} << 52) - 1;
constexpr uint64_t kExponentOne = uint64_t{1023} << 52;  // the bit pattern of 1.0
constexpr uint64_t kSqrt2Bits = 0x3FF6A09E667F3BCDull;    // √2 rounded down; m above it is halved

HDLM_HOST_DEVICE inline uint64_t bits_of(double x) {
#ifdef __CUDA_ARCH__
  return static_cast<uint64_t>(__double_as_longlong(x));
#else
  uint64_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
#endif
}

HDLM_HOST_DEVICE inline double double_of(uint64_t bits) {
#ifdef __CUDA_ARCH__
  return __longlong_as_double(static_cast<long long>(bits));
#else
  double x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
#endif
}

}  // namespace log64_detail

// Natural logarithm of a finite, normal x > 0 (the sampler's inputs: uniforms in [2^-53, 1 - 2^-53]
// and their negated logarithms in [1.1e-16, 36.8]); bit-identical to log64.py's log64.
HDLM_HOST_DEVICE inline double log64(double x) {
  using namespace log64_detail;
  const uint64_t bits = bits_of(x);
  // x = m * 2^e with m in (√2/2, √2], exactly: the exponent field, and the mantissa under the
  // exponent of 1.0, halved (exponent field minus one) above the √2 pattern.
  int32_t exponent = static_cast<int32_t>(bits >> 52) - 1023;
  uint64_t mantissa_bits = (bits & kMantissaMask) | kExponentOne;
  if (mantissa_bits > kSqrt2Bits) {
    mantissa_bits -= uint64_t{1} << 52;
    exponent += 1;
  }
  const double f = add_rn(double_of(mantissa_bits), -1.0);  // m - 1, exact (Sterbenz)
  const double s = div_rn(f, add_rn(f, 2.0));
  const double z = mul_rn(s, s);
  double p = kC10;
  p = add_rn(mul_rn(p, z), kC9);
  p = add_rn(mul_rn(p, z), kC8);
  p = add_rn(mul_rn(p, z), kC7);
  p = add_rn(mul_rn(p, z), kC6);
  p = add_rn(mul_rn(p, z), kC5);
  p = add_rn(mul_rn(p, z), kC4);
  p = add_rn(mul_rn(p, z), kC3);
  p = add_rn(mul_rn(p, z), kC2);
  p = add_rn(mul_rn(p, z), kC1);
  p = add_rn(mul_rn(p, z), kC0);
  const double e = static_cast<double>(exponent);  // |e| < 2^11: exact
  return add_rn(mul_rn(e, kLn2Hi), add_rn(mul_rn(e, kLn2Lo), mul_rn(add_rn(s, s), p)));
}

// Gumbel noise g = -log(-log u) of a uniform u in (0, 1), as log64.py's gumbel_noise (negation is
// exact).
HDLM_HOST_DEVICE inline double gumbel_noise(double u) { return -log64(-log64(u)); }

}  // namespace hdlm
