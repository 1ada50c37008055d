// The tile stages the CPU sampling backends share (gumbel_cpu.cpp, hybrid_cpu.cpp): a row's race runs in
// tiles of kTilePairs Philox pairs (one Philox block feeds two columns), and the Philox and noise stages
// are plain loops over arrays so that the compiler vectorizes them (4 lanes with AVX2) instead of running
// one long dependency chain per token. 128 pairs keep a tile's buffers in L1.
//
// Only for the CPU sources: the functions have internal linkage (an unnamed namespace), so each
// translation unit gets its own AVX2 / default clones and ifunc resolver.
#pragma once

#include <cstdint>

#include "gumbel_rule.h"  // kGumbelStream
#include "log64.h"
#include "philox.h"

namespace hdlm {

constexpr int kTilePairs = 128;

// x86-64 builds get an AVX2 clone of the vectorized stages, picked at load time (GNU ifunc); AVX2 has
// no FMA and the sources are compiled with -ffp-contract=off, so both clones round every operation
// the same way and return the same bits.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define HDLM_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef HDLM_VECTOR_CLONES
#define HDLM_VECTOR_CLONES
#endif

namespace {

// The Philox blocks of `count` consecutive pairs of stream 0, word by word.
HDLM_VECTOR_CLONES void philox_tile(uint64_t seed, uint64_t step, uint64_t first_pair, int count,
                                    uint32_t* __restrict w0, uint32_t* __restrict w1, uint32_t* __restrict w2,
                                    uint32_t* __restrict w3) {
  for (int p = 0; p < count; ++p) {
    const PhiloxBlock block = philox_block_for_pair(seed, step, kGumbelStream, first_pair + static_cast<uint64_t>(p));
    w0[p] = block.w[0];
    w1[p] = block.w[1];
    w2[p] = block.w[2];
    w3[p] = block.w[3];
  }
}

// uniform53_from_words (philox.h) in a form the vectorizer takes (there is no vector uint64 -> double
// conversion before AVX-512): with k = a * 2^26 + b, u = (2k + 1) * 2^-53 = a * 2^-26 + (2b + 1) * 2^-53,
// where a < 2^26 and 2b + 1 < 2^27 convert from int32 exactly, the products are exact (powers of two)
// and so is their sum (it is u, a double). Same bits, no rounding anywhere.
inline double uniform53_from_words_split(uint32_t word_a, uint32_t word_b) {
  const double high = static_cast<double>(static_cast<int32_t>(word_a >> 6)) * 0x1p-26;
  const double low = static_cast<double>(static_cast<int32_t>(((word_b >> 6) << 1) | 1u)) * 0x1p-53;
  return high + low;
}

// Gumbel noise of the even (w0, w1) and the odd (w2, w3) element of `count` pairs. Separate arrays:
// interleaved stores (noise[2p], noise[2p + 1]) defeat the vectorizer under -fwrapv (torch's flags),
// which cannot then prove 2p consecutive.
HDLM_VECTOR_CLONES void noise_tile(int count, const uint32_t* __restrict w0, const uint32_t* __restrict w1,
                                   const uint32_t* __restrict w2, const uint32_t* __restrict w3,
                                   double* __restrict noise_even, double* __restrict noise_odd) {
  for (int p = 0; p < count; ++p) {
    noise_even[p] = gumbel_noise(uniform53_from_words_split(w0[p], w1[p]));
    noise_odd[p] = gumbel_noise(uniform53_from_words_split(w2[p], w3[p]));
  }
}

}  // namespace

}  // namespace hdlm
