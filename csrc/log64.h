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

// exp64's constants (docs/log64.md, "exp64"; tests compare them with log64.py's through _C.exp64_constants):
// E[n] = 1 / n!, n = 2..5, the correctly rounded doubles of EXP64_COEFFICIENTS[2:6]; 64 / ln 2 and ln 2 / 64
// in two parts, exact scalings by 64 of INV_LN2, LN2_HI and LN2_LO (k * kLn2Over64Hi is exact for
// |k| < 2^32); and 2^(j / 64) = kExpTableHi[j] + kExpTableLo[j], j = 0..63.
constexpr double kE2 = 0x1.0000000000000p-1;
constexpr double kE3 = 0x1.5555555555555p-3;
constexpr double kE4 = 0x1.5555555555555p-5;
constexpr double kE5 = 0x1.1111111111111p-7;
constexpr double kInvLn2 = 0x1.71547652b82fep+0;  // 1 / ln 2, correctly rounded (INV_LN2)
constexpr double kInvLn2Times64 = kInvLn2 * 64.0;
constexpr double kLn2Over64Hi = kLn2Hi / 64.0;
constexpr double kLn2Over64Lo = kLn2Lo / 64.0;
constexpr int kExpTableBits = 6;
constexpr int64_t kExpTableMask = (int64_t{1} << kExpTableBits) - 1;
// The table's literals, spelled once for the host arrays here and the device arrays below.
#define HDLM_EXP64_TABLE_HI \
    0x1.0000000000000p+0, 0x1.02c9a3e778061p+0, 0x1.059b0d3158574p+0, \
    0x1.0874518759bc8p+0, 0x1.0b5586cf9890fp+0, 0x1.0e3ec32d3d1a2p+0, \
    0x1.11301d0125b51p+0, 0x1.1429aaea92de0p+0, 0x1.172b83c7d517bp+0, \
    0x1.1a35beb6fcb75p+0, 0x1.1d4873168b9aap+0, 0x1.2063b88628cd6p+0, \
    0x1.2387a6e756238p+0, 0x1.26b4565e27cddp+0, 0x1.29e9df51fdee1p+0, \
    0x1.2d285a6e4030bp+0, 0x1.306fe0a31b715p+0, 0x1.33c08b26416ffp+0, \
    0x1.371a7373aa9cbp+0, 0x1.3a7db34e59ff7p+0, 0x1.3dea64c123422p+0, \
    0x1.4160a21f72e2ap+0, 0x1.44e086061892dp+0, 0x1.486a2b5c13cd0p+0, \
    0x1.4bfdad5362a27p+0, 0x1.4f9b2769d2ca7p+0, 0x1.5342b569d4f82p+0, \
    0x1.56f4736b527dap+0, 0x1.5ab07dd485429p+0, 0x1.5e76f15ad2148p+0, \
    0x1.6247eb03a5585p+0, 0x1.6623882552225p+0, 0x1.6a09e667f3bcdp+0, \
    0x1.6dfb23c651a2fp+0, 0x1.71f75e8ec5f74p+0, 0x1.75feb564267c9p+0, \
    0x1.7a11473eb0187p+0, 0x1.7e2f336cf4e62p+0, 0x1.82589994cce13p+0, \
    0x1.868d99b4492edp+0, 0x1.8ace5422aa0dbp+0, 0x1.8f1ae99157736p+0, \
    0x1.93737b0cdc5e5p+0, 0x1.97d829fde4e50p+0, 0x1.9c49182a3f090p+0, \
    0x1.a0c667b5de565p+0, 0x1.a5503b23e255dp+0, 0x1.a9e6b5579fdbfp+0, \
    0x1.ae89f995ad3adp+0, 0x1.b33a2b84f15fbp+0, 0x1.b7f76f2fb5e47p+0, \
    0x1.bcc1e904bc1d2p+0, 0x1.c199bdd85529cp+0, 0x1.c67f12e57d14bp+0, \
    0x1.cb720dcef9069p+0, 0x1.d072d4a07897cp+0, 0x1.d5818dcfba487p+0, \
    0x1.da9e603db3285p+0, 0x1.dfc97337b9b5fp+0, 0x1.e502ee78b3ff6p+0, \
    0x1.ea4afa2a490dap+0, 0x1.efa1bee615a27p+0, 0x1.f50765b6e4540p+0, \
    0x1.fa7c1819e90d8p+0,
#define HDLM_EXP64_TABLE_LO \
    0x0.0p+0, -0x1.19083535b085dp-56, 0x1.d73e2a475b465p-55, \
    0x1.186be4bb284ffp-57, 0x1.8a62e4adc610bp-54, 0x1.03a1727c57b53p-59, \
    -0x1.6c51039449b3ap-54, -0x1.32fbf9af1369ep-54, -0x1.19041b9d78a76p-55, \
    0x1.e5b4c7b4968e4p-55, 0x1.e016e00a2643cp-54, 0x1.dc775814a8495p-55, \
    0x1.9b07eb6c70573p-54, 0x1.2bd339940e9d9p-55, 0x1.612e8afad1255p-55, \
    0x1.0024754db41d5p-54, 0x1.6f46ad23182e4p-55, 0x1.32721843659a6p-54, \
    -0x1.63aeabf42eae2p-54, -0x1.5e436d661f5e3p-56, 0x1.ada0911f09ebcp-55, \
    -0x1.ef3691c309278p-58, 0x1.89b7a04ef80d0p-59, 0x1.3c1a3b69062f0p-56, \
    0x1.d4397afec42e2p-56, -0x1.4b309d25957e3p-54, -0x1.07abe1db13cadp-55, \
    0x1.9bb2c011d93adp-54, 0x1.6324c054647adp-54, 0x1.ba6f93080e65ep-54, \
    -0x1.383c17e40b497p-54, -0x1.bb60987591c34p-54, -0x1.bdd3413b26456p-54, \
    -0x1.bbe3a683c88abp-57, -0x1.16e4786887a99p-55, -0x1.0245957316dd3p-54, \
    -0x1.41577ee04992fp-55, 0x1.05d02ba15797ep-56, -0x1.d4c1dd41532d8p-54, \
    -0x1.fc6f89bd4f6bap-54, 0x1.6e9f156864b27p-54, 0x1.5cc13a2e3976cp-55, \
    -0x1.75fc781b57ebcp-57, -0x1.d185b7c1b85d1p-54, 0x1.c7c46b071f2bep-56, \
    -0x1.359495d1cd533p-54, -0x1.d2f6edb8d41e1p-54, 0x1.0fac90ef7fd31p-54, \
    0x1.7a1cd345dcc81p-54, -0x1.2805e3084d708p-57, -0x1.5584f7e54ac3bp-56, \
    0x1.23dd07a2d9e84p-55, 0x1.11065895048ddp-55, 0x1.2884dff483cadp-54, \
    0x1.503cbd1e949dbp-56, -0x1.cbc3743797a9cp-54, 0x1.2ed02d75b3707p-55, \
    0x1.c2300696db532p-54, -0x1.1a5cd4f184b5cp-54, 0x1.39e8980a9cc8fp-55, \
    -0x1.e9c23179c2893p-54, 0x1.dc7f486a4b6b0p-54, 0x1.9d3e12dd8a18bp-54, \
    0x1.74853f3a5931ep-55,
constexpr double kExpTableHi[64] = {HDLM_EXP64_TABLE_HI};
constexpr double kExpTableLo[64] = {HDLM_EXP64_TABLE_LO};
// exp64 is 0 below (EXP64_MIN): above it k >> 6 >= -1022, so the result's power of two is a normal double.
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
  double exp_e[4];  // kE2 .. kE5
  double inv_ln2_times_64, ln2_over_64_hi, ln2_over_64_lo;
};

#ifdef __CUDACC__
// One copy per translation unit (static): the extension's CUDA sources are compiled whole-program.
static __constant__ Log64Constants kDeviceConstants = {
    {kC0, kC1, kC2, kC3, kC4, kC5, kC6, kC7, kC8, kC9, kC10},
    kLn2Hi,
    kLn2Lo,
    {kE2, kE3, kE4, kE5},
    kInvLn2Times64,
    kLn2Over64Hi,
    kLn2Over64Lo};
// exp64's table in global memory, not constant memory: the lanes of a warp read different entries, which
// constant memory would serialize; these 1 KB stay in L1.
static __device__ const double kDeviceExpTableHi[64] = {HDLM_EXP64_TABLE_HI};
static __device__ const double kDeviceExpTableLo[64] = {HDLM_EXP64_TABLE_LO};
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
//   t = x * 64 / ln 2;  k = t rounded half away from zero (truncation of t +- 0.5)
//   r = (x - k * LN2_HI / 64) - k * LN2_LO / 64          (|r| <= ~ln 2 / 128; k * LN2_HI / 64 exact)
//   p = (E[5] r + E[4]) r + E[3];  p = p r + E[2];  q = r + (r r) p      (e^r - 1)
//   j = k & 63;  e^x = (T_hi[j] + (T_lo[j] + T_hi[j] q)) * 2^(k >> 6)    (2^(k >> 6) from its bits: exact)
HDLM_HOST_DEVICE inline double exp64(double x) {
  using namespace log64_detail;
  if (!(x >= kExp64Min)) {  // written so that NaN lands here too, as the torch twin's `live` mask
    return 0.0;
  }
  const double t = mul_rn(x, HDLM_LOG64_CONSTANT(inv_ln2_times_64, kInvLn2Times64));
  const int64_t k = double_to_int64_rz(t >= 0.0 ? add_rn(t, 0.5) : sub_rn(t, 0.5));
  const double kf = int64_to_double_rn(k);  // |k| < 2^17: exact
  const double r = sub_rn(sub_rn(x, mul_rn(kf, HDLM_LOG64_CONSTANT(ln2_over_64_hi, kLn2Over64Hi))),
                         mul_rn(kf, HDLM_LOG64_CONSTANT(ln2_over_64_lo, kLn2Over64Lo)));
  double p = add_rn(mul_rn(HDLM_LOG64_CONSTANT(exp_e[3], kE5), r), HDLM_LOG64_CONSTANT(exp_e[2], kE4));
  p = add_rn(mul_rn(p, r), HDLM_LOG64_CONSTANT(exp_e[1], kE3));
  p = add_rn(mul_rn(p, r), HDLM_LOG64_CONSTANT(exp_e[0], kE2));
  const double q = add_rn(r, mul_rn(mul_rn(r, r), p));  // e^r - 1
  const int64_t j = k & kExpTableMask;
#ifdef __CUDA_ARCH__
  const double table_hi = __ldg(&kDeviceExpTableHi[j]);
  const double table_lo = __ldg(&kDeviceExpTableLo[j]);
#else
  const double table_hi = kExpTableHi[j];
  const double table_lo = kExpTableLo[j];
#endif
  // The exponent field (k >> 6) + 1023 in unsigned arithmetic: the same 64 bits as the torch twin's shift
  // (k >> 6 is the floor of k / 64, an arithmetic shift, as torch's and Triton's on int64).
  const double scale = double_of(static_cast<uint64_t>((k >> kExpTableBits) + 1023) << 52);
  return mul_rn(add_rn(table_hi, add_rn(table_lo, mul_rn(table_hi, q))), scale);
}

// Gumbel noise g = -log(-log u) of a uniform u in (0, 1), as log64.py's gumbel_noise (negation is
// exact).
HDLM_HOST_DEVICE inline double gumbel_noise(double u) { return -log64(-log64(u)); }

}  // namespace hdlm
