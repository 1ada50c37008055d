// What the CPU and CUDA backends of gumbel_argmax share, header-only so that both compile the same
// code (docs/sampling-stream.md): the score of one token and the rule that picks a row's winner, both as in the
// reference backend (hdlm_kernels/sampling/gumbel.py, _gumbel_argmax_reference).
#pragma once

#include <cstdint>

#include "log64.h"
#include "philox.h"

namespace hdlm {

constexpr uint32_t kGumbelStream = 0;  // docs/sampling-stream.md: stream 0 = Gumbel noise, element row_id * V + v

// Exact for every logits / log-score dtype: bf16 and fp16 widen exactly to float, float to double.
template <typename scalar_t>
HDLM_HOST_DEVICE inline double widen_to_double(scalar_t x) {
  return static_cast<double>(static_cast<float>(x));
}

template <>
HDLM_HOST_DEVICE inline double widen_to_double<double>(double x) {
  return x;
}

// How a score is formed, fixed per call: temperature 0 draws no noise (greedy), temperature 1 skips
// the division (x / 1 == x exactly, as the reference skips it).
struct GumbelParams {
  uint64_t seed;
  uint64_t step;
  double temperature;
  bool noise;   // temperature != 0
  bool divide;  // noise && temperature != 1
};

// score = double(logit) / temperature + noise, each step one correctly rounded operation, where noise
// = gumbel_noise(u) of the token's uniform (not read when params.noise is false).
HDLM_HOST_DEVICE inline double gumbel_score(double logit, double noise, const GumbelParams& params) {
  double score = logit;
  if (params.divide) {
    score = div_rn(score, params.temperature);
  }
  if (params.noise) {
    score = add_rn(score, noise);
  }
  return score;
}

// A row's best token so far; column < 0 means none yet.
struct Candidate {
  double score;
  int64_t column;
};

HDLM_HOST_DEVICE inline Candidate no_candidate() {
  return Candidate{log64_detail::double_of(0xFFF0000000000000ull), -1};  // -inf
}

// Whether `challenger` beats `holder`. The order is total (so any reduction tree gives the same
// winner) and reproduces torch.max over the row on the CPU: a NaN beats every number and the lowest
// NaN column wins; otherwise the larger score, ties (-inf included) to the lower column. So a row
// whose scores are all -inf reports -inf at column 0, as the reference does.
HDLM_HOST_DEVICE inline bool beats(const Candidate& challenger, const Candidate& holder) {
  if (challenger.column < 0) {
    return false;
  }
  if (holder.column < 0) {
    return true;
  }
  const bool challenger_nan = challenger.score != challenger.score;
  const bool holder_nan = holder.score != holder.score;
  if (challenger_nan || holder_nan) {
    return challenger_nan && (!holder_nan || challenger.column < holder.column);
  }
  if (challenger.score != holder.score) {
    return challenger.score > holder.score;
  }
  return challenger.column < holder.column;
}

// The Philox pairs of one row: element e = row_id * V + v lives in block n = e >> 1 (even e: words
// w0, w1; odd e: w2, w3), so pair j of the row, block (row_id * V >> 1) + j, holds column 2j - parity
// (its even element, absent for j = 0 when parity = 1) and the next column. One Philox evaluation
// then feeds two columns. Needs row_id * V + V - 1 < 2^63 (checked by the callers).
struct RowPairs {
  uint64_t first_pair;  // (row_id * V) >> 1
  int64_t parity;       // (row_id * V) & 1
  int64_t count;        // pairs that hold a column of the row: (V + parity + 1) / 2
};

HDLM_HOST_DEVICE inline RowPairs row_pairs(uint64_t row_id, int64_t vocab) {
  const uint64_t first_element = row_id * static_cast<uint64_t>(vocab);
  const int64_t parity = static_cast<int64_t>(first_element & 1u);
  return RowPairs{first_element >> 1, parity, (vocab + parity + 1) / 2};
}

}  // namespace hdlm
