// The float64 logarithm and exponential of hdlm_kernels/sampling/log64.py, operation by operation, and
// the Gumbel noise built on the logarithm (docs/log64.md). Header-only so that the C++ CPU path and the
// CUDA path compile the very same recipe, which the torch, NumPy and Triton twins follow too: every step is exact (bit
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

HDLM_HOST_DEVICE inline double sub_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

// int64 -> double rounded to nearest (as torch's .to(torch.float64)); exact below 2^53.
HDLM_HOST_DEVICE inline double int64_to_double_rn(int64_t v) {
#ifdef __CUDA_ARCH__
  return __ll2double_rn(static_cast<long long>(v));
#else
  return static_cast<double>(v);
#endif
}

// double -> int64 truncated toward zero (as torch's .to(torch.int64)); v must fit in int64.
HDLM_HOST_DEVICE inline int64_t double_to_int64_rz(double v) {
#ifdef __CUDA_ARCH__
  return static_cast<int64_t>(__double2ll_rz(v));
#else
  return static_cast<int64_t>(v);
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

// E[n] = 1 / n!, n = 0..13, the correctly rounded doubles of EXP64_COEFFICIENTS[:14] (tests compare them
// through _C.exp64_constants).
constexpr double kE0 = 0x1.0000000000000p+0;
constexpr double kE1 = 0x1.0000000000000p+0;
constexpr double kE2 = 0x1.0000000000000p-1;
constexpr double kE3 = 0x1.5555555555555p-3;
constexpr double kE4 = 0x1.5555555555555p-5;
constexpr double kE5 = 0x1.1111111111111p-7;
constexpr double kE6 = 0x1.6c16c16c16c17p-10;
constexpr double kE7 = 0x1.a01a01a01a01ap-13;
constexpr double kE8 = 0x1.a01a01a01a01ap-16;
constexpr double kE9 = 0x1.71de3a556c734p-19;
constexpr double kE10 = 0x1.27e4fb7789f5cp-22;
constexpr double kE11 = 0x1.ae64567f544e4p-26;
constexpr double kE12 = 0x1.1eed8eff8d898p-29;
constexpr double kE13 = 0x1.6124613a86d09p-33;
constexpr double kInvLn2 = 0x1.71547652b82fep+0;  // 1 / ln 2, correctly rounded (INV_LN2)
// exp64 is 0 below (EXP64_MIN): above it k >= -1021, so p * 2^k stays a normal double.
constexpr double kExp64Min = -708.0;

constexpr uint64_t kMantissaMask = (uint64_t{1} << 52) - 1;
constexpr uint64_t kExponentOne = uint64_t{1023} << 52;  // the bit pattern of 1.0
constexpr uint64_t kSqrt2Bits = 0x3FF6A09E667F3BCDull;    // √2 rounded down; m above it is halved

// The coefficients as the device reads them. A float64 constant that is not a short immediate (most of the
// above) costs two UMOV instructions wherever an FP64 instruction uses it, in every iteration of a loop that
// calls log64 or exp64; read from constant memory it is an operand of the FP64 instruction itself
// (c[0x3][offset]), at no instruction. The values are the constexpr scalars above, so the bits are the
// same on host and device, and every operation stays the same explicit round-to-nearest intrinsic (no
// contraction). Host code reads the scalars directly (log64_constant below).
struct Log64Constants {
  double log_c[11];  // kC0 .. kC10
  double ln2_hi, ln2_lo;
  double exp_e[14];  // kE0 .. kE13
  double inv_ln2;
};

#ifdef __CUDACC__
// One copy per translation unit (static): the extension's CUDA sources are compiled whole-program.
static __constant__ Log64Constants kDeviceConstants = {
    {kC0, kC1, kC2, kC3, kC4, kC5, kC6, kC7, kC8, kC9, kC10},
    kLn2Hi,
    kLn2Lo,
    {kE0, kE1, kE2, kE3, kE4, kE5, kE6, kE7, kE8, kE9, kE10, kE11, kE12, kE13},
    kInvLn2};
#endif

// The device reads kDeviceConstants.member, the host the constexpr scalar `host` (the same value).
#ifdef __CUDA_ARCH__
#define HDLM_LOG64_CONSTANT(member, host) (::hdlm::log64_detail::kDeviceConstants.member)
#else
#define HDLM_LOG64_CONSTANT(member, host) (::hdlm::log64_detail::host)
#endif

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
  double p = HDLM_LOG64_CONSTANT(log_c[10], kC10);
  p = add_rn(mul_rn(p, z), HDLM_LOG64_CONSTANT(log_c[9], kC9));
  p = add_rn(mul_rn(p, z), HDLM_LOG64_CONSTANT(log_c[8], kC8));
  p = add_rn(mul_rn(p, z), HDLM_LOG64_CONSTANT(log_c[7], kC7));
  p = add_rn(mul_rn(p, z), HDLM_LOG64_CONSTANT(log_c[6], kC6));
  p = add_rn(mul_rn(p, z), HDLM_LOG64_CONSTANT(log_c[5], kC5));
  p = add_rn(mul_rn(p, z), HDLM_LOG64_CONSTANT(log_c[4], kC4));
  p = add_rn(mul_rn(p, z), HDLM_LOG64_CONSTANT(log_c[3], kC3));
  p = add_rn(mul_rn(p, z), HDLM_LOG64_CONSTANT(log_c[2], kC2));
  p = add_rn(mul_rn(p, z), HDLM_LOG64_CONSTANT(log_c[1], kC1));
  p = add_rn(mul_rn(p, z), HDLM_LOG64_CONSTANT(log_c[0], kC0));
  const double e = static_cast<double>(exponent);  // |e| < 2^11: exact
  return add_rn(mul_rn(e, HDLM_LOG64_CONSTANT(ln2_hi, kLn2Hi)),
                add_rn(mul_rn(e, HDLM_LOG64_CONSTANT(ln2_lo, kLn2Lo)), mul_rn(add_rn(s, s), p)));
}

// e^x for x <= 708 (and 0 for x < -708, -inf and NaN); bit-identical to log64.py's exp64:
//   t = x / ln 2 (as x * INV_LN2);  k = t rounded half away from zero (truncation of t +- 0.5)
//   r = (x - k * LN2_HI) - k * LN2_LO   (|r| <= ~0.347; k * LN2_HI exact)
//   p = E[13];  p = p * r + E[n] for n = 12 .. 0   (Horner on 1/n!)
//   e^x = p * 2^k                       (2^k from its bit pattern: exact)
HDLM_HOST_DEVICE inline double exp64(double x) {
  using namespace log64_detail;
  if (!(x >= kExp64Min)) {  // written so that NaN lands here too, as the torch twin's `live` mask
    return 0.0;
  }
  const double t = mul_rn(x, HDLM_LOG64_CONSTANT(inv_ln2, kInvLn2));
  const int64_t k = double_to_int64_rz(t >= 0.0 ? add_rn(t, 0.5) : sub_rn(t, 0.5));
  const double kf = int64_to_double_rn(k);  // |k| < 2^11: exact
  const double r = sub_rn(sub_rn(x, mul_rn(kf, HDLM_LOG64_CONSTANT(ln2_hi, kLn2Hi))),
                         mul_rn(kf, HDLM_LOG64_CONSTANT(ln2_lo, kLn2Lo)));
  double p = HDLM_LOG64_CONSTANT(exp_e[13], kE13);
  p = add_rn(mul_rn(p, r), HDLM_LOG64_CONSTANT(exp_e[12], kE12));
  p = add_rn(mul_rn(p, r), HDLM_LOG64_CONSTANT(exp_e[11], kE11));
  p = add_rn(mul_rn(p, r), HDLM_LOG64_CONSTANT(exp_e[10], kE10));
  p = add_rn(mul_rn(p, r), HDLM_LOG64_CONSTANT(exp_e[9], kE9));
  p = add_rn(mul_rn(p, r), HDLM_LOG64_CONSTANT(exp_e[8], kE8));
  p = add_rn(mul_rn(p, r), HDLM_LOG64_CONSTANT(exp_e[7], kE7));
  p = add_rn(mul_rn(p, r), HDLM_LOG64_CONSTANT(exp_e[6], kE6));
  p = add_rn(mul_rn(p, r), HDLM_LOG64_CONSTANT(exp_e[5], kE5));
  p = add_rn(mul_rn(p, r), HDLM_LOG64_CONSTANT(exp_e[4], kE4));
  p = add_rn(mul_rn(p, r), HDLM_LOG64_CONSTANT(exp_e[3], kE3));
  p = add_rn(mul_rn(p, r), HDLM_LOG64_CONSTANT(exp_e[2], kE2));
  p = add_rn(mul_rn(p, r), HDLM_LOG64_CONSTANT(exp_e[1], kE1));
  p = add_rn(mul_rn(p, r), HDLM_LOG64_CONSTANT(exp_e[0], kE0));
  // The exponent field k + 1023 in unsigned arithmetic: the same 64 bits as the torch twin's int64 shift.
  const double scale = double_of(static_cast<uint64_t>(k + 1023) << 52);
  return mul_rn(p, scale);
}

// Gumbel noise g = -log(-log u) of a uniform u in (0, 1), as log64.py's gumbel_noise (negation is
// exact).
HDLM_HOST_DEVICE inline double gumbel_noise(double u) { return -log64(-log64(u)); }

}  // namespace hdlm
