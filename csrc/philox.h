// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) and the
// float64 uniform stream of docs/sampling-stream.md. Header-only so that the C++ CPU path and the CUDA path
// compile the very same code and therefore produce bit-identical draws.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define HDLM_HOST_DEVICE __host__ __device__
#else
#define HDLM_HOST_DEVICE
#endif

namespace hdlm {

struct PhiloxBlock {
  uint32_t w[4];
};

namespace philox_detail {

constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
// Weyl increments (golden ratio and sqrt(3) - 1) that make every round use a distinct key.
constexpr uint32_t kKeyBump0 = 0x9E3779B9u;
constexpr uint32_t kKeyBump1 = 0xBB67AE85u;
constexpr int kRounds = 10;

// The high and low words of a 32 x 32-bit product (integer arithmetic: every form gives the same bits). On
// the device __umulhi and the low product: from the 64-bit product, ptxas (CUDA 13, sm_90) adds a zero
// register to every high word, 66 instructions per Philox block in a loop against 47 this way (static count).
HDLM_HOST_DEVICE inline void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#ifdef __CUDA_ARCH__
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
#endif
}

}  // namespace philox_detail

// Philox4x32-10 of `counter` (4 words) under `key` (2 words), as Random123's philox4x32_R(10, ...).
HDLM_HOST_DEVICE inline PhiloxBlock philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                  uint32_t k0, uint32_t k1) {
  using namespace philox_detail;
  for (int round = 0; round < kRounds; ++round) {
    if (round > 0) {
      k0 += kKeyBump0;
      k1 += kKeyBump1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kMul0, c0, hi0, lo0);
    mulhilo32(kMul1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return PhiloxBlock{{c0, c1, c2, c3}};
}

// The Philox block that holds elements 2n and 2n + 1 of stream `stream` at sampler step `step`.
// Only the low 32 bits of `step` enter the counter (docs/sampling-stream.md): a run never takes 2^32 steps.
HDLM_HOST_DEVICE inline PhiloxBlock philox_block_for_pair(uint64_t seed, uint64_t step, uint32_t stream,
                                                          uint64_t n) {
  return philox4x32_10(static_cast<uint32_t>(n), static_cast<uint32_t>(n >> 32), stream,
                       static_cast<uint32_t>(step), static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

// Uniform in (0, 1) built from two 32-bit words: 26 high bits of each give a 52-bit integer k, and
// u = (k + 0.5) * 2^-52 = (2k + 1) * 2^-53. Why 52 bits and not 53: the half-step offset needs one
// more bit, and 2k + 1 < 2^53 keeps u exactly representable, so every backend (and NumPy) gets the
// same double with no rounding at all. The offset centres the grid: u lies in [2^-53, 1 - 2^-53],
// never 0 or 1, so -log(-log u) is finite and reaches ~36.7 in the Gumbel tail.
HDLM_HOST_DEVICE inline double uniform53_from_words(uint32_t word_a, uint32_t word_b) {
  const uint64_t k = (static_cast<uint64_t>(word_a >> 6) << 26) | static_cast<uint64_t>(word_b >> 6);
  // The integer-to-double conversion is exact (< 2^53) and the scaling is by a power of two, so no
  // rounding mode, FMA contraction or fast-math flag can change the result.
  return static_cast<double>((k << 1) | 1u) * 0x1p-53;
}

// Uniform for element `element` of stream `stream`: elements 2n and 2n + 1 share the Philox block of
// counter n, the even one taking words (w0, w1), the odd one (w2, w3).
HDLM_HOST_DEVICE inline double uniform53(uint64_t seed, uint64_t step, uint32_t stream, uint64_t element) {
  const PhiloxBlock block = philox_block_for_pair(seed, step, stream, element >> 1);
  return (element & 1u) ? uniform53_from_words(block.w[2], block.w[3])
                        : uniform53_from_words(block.w[0], block.w[1]);
}

}  // namespace hdlm
