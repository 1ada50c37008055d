// CPU backend of the fused γ-hybrid step (docs/hybrid-step.md, "The fused form"):
// OpenMP over the rows, each row read three times through its strides (max, fixed-point sum, race), the
// race in tiles of Philox pairs (one Philox block feeds two columns) as gumbel_cpu.cpp. Rows of float32,
// bf16 or fp16 log-scores are screened (docs/sampling-screen.md, "The γ step"): the exact row sum S in
// float64 lanes (hybrid_sum_cpu.cpp), then a float32 interval of every read token's score
// (hybrid_screen.h), then the exact score of the current cell and of the candidates only. float64 rows, bad
// rows and rows with extreme constants take the full exact race (draw_row). Bit-identical to the reference
// backend either way because the exact arithmetic is the shared header code (hybrid_rule.h, gumbel_rule.h,
// log64.h, philox.h), compiled without FMA contraction (-ffp-contract=off, setup.py).
#include "hybrid.h"

#include "gumbel_rule.h"
#include "hybrid_rule.h"
#include "hybrid_screen.h"
#include "hybrid_screen_avx2.h"
#include "log64.h"
#include "noise_tile.h"
#include "screen_avx2.h"  // philox_tile_avx2, the ISA choice
#include "philox.h"

#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace hdlm {
namespace {

// Below this many tokens in a call the thread hand-off costs more than it saves; also the least work
// of one dynamically scheduled chunk of rows.
constexpr int64_t kMinTokensToParallelize = 16384;

struct alignas(64) Tile {
  uint32_t w0[kTilePairs], w1[kTilePairs], w2[kTilePairs], w3[kTilePairs];
  // Of the even and the odd element of each pair: noise, and the log weight of the column.
  double noise_even[kTilePairs], noise_odd[kTilePairs];
  double log_weight_even[kTilePairs], log_weight_odd[kTilePairs];
};

// The winner of one row: log-scores `row` (column stride `stride_col`), current token `current`,
// identity `row_id`, constants `c`. Returns the winning (score, column), the score NaN for a bad row.
template <typename scalar_t>
Candidate draw_row(const scalar_t* row, int64_t stride_col, int64_t vocab, int64_t current, int64_t mask_id,
                   uint64_t row_id, const HybridCoefficients& c, uint64_t seed, uint64_t step, bool avx2_philox,
                   Tile& tile) {
  const double minus_inf = -std::numeric_limits<double>::infinity();
  const auto load = [&](int64_t column) { return widen_to_double(row[column * stride_col]); };

  // Pass 1: the maximum of the read entries; a NaN or +inf one makes the row bad (nothing later reads
  // the row's log-scores then: they count as -inf, as in the reference).
  bool bad = false;
  double read_max = minus_inf;
  for (int64_t column = 0; column < vocab; ++column) {
    if (column == current || column == mask_id) {
      continue;
    }
    const double s = load(column);
    if (hybrid_bad_score(s)) {
      bad = true;
      break;
    }
    read_max = hybrid_max(read_max, s);
  }
  const double shift = hybrid_shift(bad ? minus_inf : read_max, current != mask_id);

  // Pass 2: the fixed-point sum of the scaled ratios.
  FixedSum sum{0, 0};
  if (!bad) {
    for (int64_t column = 0; column < vocab; ++column) {
      if (column != current && column != mask_id) {
        fixed_add(sum, hybrid_ratio(load(column), shift));
      }
    }
  }
  const HybridRow weights = hybrid_row(shift, sum, c);

  // Pass 3: the race, tile by tile. Columns reach beats() in increasing order, so the lowest of equal
  // scores is kept. Tokens without weight score -inf whatever their noise, so they are not offered and a
  // tile without any weight draws no noise at all (a real row at γ = 0, say); hybrid_winner then reports
  // -inf at column 0 for a row without candidates, as the reference's argmax.
  Candidate best = no_candidate();
  const RowPairs pairs = row_pairs(row_id, vocab);
  for (int64_t first = 0; first < pairs.count; first += kTilePairs) {
    const int count = static_cast<int>(std::min<int64_t>(kTilePairs, pairs.count - first));
    bool any_weight = false;
    // Pair first + p holds columns even and even + 1; the first pair of a row with odd row_id * V
    // starts one column early, the last pair may end one column late.
    for (int p = 0; p < count; ++p) {
      const int64_t even = 2 * (first + p) - pairs.parity;
      const int64_t odd = even + 1;
      const double even_weight = even >= 0 ? hybrid_cell_log_weight(hybrid_cell(even, current, mask_id), weights,
                                                                     bad, [&] { return load(even); })
                                           : minus_inf;
      const double odd_weight = odd < vocab ? hybrid_cell_log_weight(hybrid_cell(odd, current, mask_id), weights,
                                                                     bad, [&] { return load(odd); })
                                            : minus_inf;
      tile.log_weight_even[p] = even_weight;
      tile.log_weight_odd[p] = odd_weight;
      any_weight = any_weight || even_weight != minus_inf || odd_weight != minus_inf;
    }
    if (!any_weight) {
      continue;
    }
    if (avx2_philox) {  // the same words, 8 pairs per instruction (screen_avx2.h)
      philox_tile_avx2(seed, step, kGumbelStream, pairs.first_pair + static_cast<uint64_t>(first), tile.w0, tile.w1,
                       tile.w2, tile.w3);
    } else {
      philox_tile(seed, step, pairs.first_pair + static_cast<uint64_t>(first), count, tile.w0, tile.w1, tile.w2,
                  tile.w3);
    }
    noise_tile(count, tile.w0, tile.w1, tile.w2, tile.w3, tile.noise_even, tile.noise_odd);
    for (int p = 0; p < count; ++p) {
      const int64_t even = 2 * (first + p) - pairs.parity;
      if (tile.log_weight_even[p] != minus_inf) {
        const Candidate challenger{hybrid_score(tile.log_weight_even[p], tile.noise_even[p]), even};
        if (beats(challenger, best)) {
          best = challenger;
        }
      }
      if (tile.log_weight_odd[p] != minus_inf) {
        const Candidate challenger{hybrid_score(tile.log_weight_odd[p], tile.noise_odd[p]), even + 1};
        if (beats(challenger, best)) {
          best = challenger;
        }
      }
    }
  }
  return hybrid_winner(best, bad);
}

// What one thread keeps across rows.
struct Scratch {
  Tile tile;
  ScreenTile screen;
  std::vector<std::pair<int64_t, float>> candidates;  // (column, upper bound)
  std::vector<float> values;                           // the row in float32
};

// The instruction set's stages, chosen once per call.
struct HybridSetup {
  bool avx2;
  bool avx512;  // the exact row sum in 8 float64 lanes
  HybridScreenTileFunction tile;
  HybridTileReachesFunction reaches;
};

// The largest float32 value <= v (v finite, |v| < 2^100): a lower bound of an exact score as a floor.
inline float float_at_most(double v) {
  float f = static_cast<float>(v);
  if (static_cast<double>(f) > v) {
    f = std::nextafter(f, -std::numeric_limits<float>::infinity());
  }
  return f;
}

// The winner of one row by screen-then-decide (docs/sampling-screen.md, "The γ step"): the same (score,
// column) as draw_row. Returns false, having decided nothing, for a row the screen does not apply to (a bad
// row, or constants outside hybrid_screen_row's range): the caller takes draw_row. `exact` receives the
// number of tokens whose exact score was computed.
template <typename scalar_t>
bool draw_row_screened(const scalar_t* row, int64_t stride_col, int64_t vocab, int64_t current, int64_t mask_id,
                       uint64_t row_id, const HybridCoefficients& c, uint64_t seed, uint64_t step,
                       const HybridSetup& setup, Scratch& scratch, Candidate& winner, int64_t& exact) {
  constexpr float kMinusInfFloat = -std::numeric_limits<float>::infinity();
  const double minus_inf = -std::numeric_limits<double>::infinity();
  // The row once as float32 (exact for float32, bf16 and fp16), the tokens that are not read as -inf (ratio
  // 0, score -inf): the three passes read this buffer, which stays in the cache.
  std::vector<float>& values = scratch.values;
  values.resize(static_cast<size_t>(vocab));
  float* buffer = values.data();
  for (int64_t column = 0; column < vocab; ++column) {
    buffer[column] = static_cast<float>(row[column * stride_col]);
  }
  buffer[current] = kMinusInfFloat;
  buffer[mask_id] = kMinusInfFloat;
  const auto read = [&](int64_t column) { return column != current && column != mask_id; };

  // Pass 1: the maximum of the read entries (float32 values: max is exact, as on their float64 widening);
  // a NaN or +inf one makes the row bad (then draw_row reports it).
  bool bad = false;
  const float read_max = setup.avx2 ? read_maximum_avx2(buffer, vocab, bad) : read_maximum_scalar(buffer, vocab, bad);
  if (bad) {
    return false;
  }
  const double shift = hybrid_shift(static_cast<double>(read_max), current != mask_id);

  // Pass 2: the exact fixed-point sum.
  FixedSum sum{0, 0};
  if (setup.avx2 && vocab < kFixedLanesMaxVocab) {
    FixedSumLanes lane_sums;
    fixed_lanes_clear(lane_sums);
    if (setup.avx512) {
      fixed_sum_avx512(buffer, static_cast<int>(vocab), shift, lane_sums);
    } else {
      fixed_sum_avx2(buffer, static_cast<int>(vocab), shift, lane_sums);
    }
    sum = fixed_lanes_total(lane_sums);
  } else {
    fixed_sum_scalar(buffer, vocab, shift, sum);
  }
  const HybridRow weights = hybrid_row(shift, sum, c);

  // The screen's constants; c1 = 0 leaves no read token any weight (0 times a finite difference).
  const bool no_read_weight = c.c1 == 0.0 && std::isfinite(weights.c2_total);
  HybridScreenRow screen_row{};
  if (!no_read_weight && !hybrid_screen_row(shift, weights.c1, weights.c2_total, screen_row)) {
    return false;
  }

  // The current cell, exactly: its score is the first floor.
  const uint64_t first_element = row_id * static_cast<uint64_t>(vocab);
  const auto exact_noise = [&](int64_t column) {
    return gumbel_noise(uniform53(seed, step, kGumbelStream, first_element + static_cast<uint64_t>(column)));
  };
  Candidate best = no_candidate();
  float floor = kMinusInfFloat;
  exact = 1;
  if (weights.current_log_weight != minus_inf) {
    best = Candidate{hybrid_score(weights.current_log_weight, exact_noise(current)), current};
    floor = float_at_most(best.score);
  }

  // Pass 3, the screen: tiles of Philox pairs, candidates against the running floor.
  auto& candidates = scratch.candidates;
  candidates.clear();
  Tile& tile = scratch.tile;
  ScreenTile& screen = scratch.screen;
  const RowPairs pairs = row_pairs(row_id, vocab);
  for (int64_t first = 0; !no_read_weight && first < pairs.count; first += kTilePairs) {
    const int count = static_cast<int>(std::min<int64_t>(kTilePairs, pairs.count - first));
    if (setup.avx2) {
      philox_tile_avx2(seed, step, kGumbelStream, pairs.first_pair + static_cast<uint64_t>(first), tile.w0, tile.w1,
                       tile.w2, tile.w3);
    } else {
      philox_tile(seed, step, pairs.first_pair + static_cast<uint64_t>(first), count, tile.w0, tile.w1, tile.w2,
                  tile.w3);
    }
    const int64_t base = 2 * first - pairs.parity;
    if (count == kTilePairs && base >= 0 && base + 2 * kTilePairs <= vocab) {
      const float* pairs_start = buffer + base;
      for (int p = 0; p < kTilePairs; ++p) {
        screen.logit_even[p] = pairs_start[2 * p];
        screen.logit_odd[p] = pairs_start[2 * p + 1];
      }
    } else {  // the row's first or last tile: absent columns and pairs score -inf
      for (int p = 0; p < kTilePairs; ++p) {
        const int64_t even = base + 2 * p;
        const bool present = p < count;
        screen.logit_even[p] = present && even >= 0 ? buffer[even] : kMinusInfFloat;
        screen.logit_odd[p] = present && even + 1 < vocab ? buffer[even + 1] : kMinusInfFloat;
      }
    }
    // Skip the tile when no exact score in it can reach the floor (docs/sampling-screen.md, "The
    // prefilter"): no cheap noise for a tile where every read token's upper bound stays below it.
    if (floor > kMinusInfFloat && !setup.reaches(tile.w0, tile.w2, screen, screen_row, floor)) {
      continue;
    }
    bool any = false;
    floor = setup.tile(tile.w0, tile.w1, tile.w2, tile.w3, screen_row, floor, screen, any);
    if (!any) {
      continue;
    }
    append_candidates(screen, count, base, vocab, floor, candidates);
  }

  // Decide: the exact score of every read token that can still win (beats() is a total order, so the order
  // of the offers does not matter); tokens without weight are not offered, as in draw_row.
  for (const auto& [column, hi] : candidates) {
    if (!screen_candidate(hi, floor) || !read(column)) {
      continue;
    }
    ++exact;
    const double log_weight = hybrid_read_log_weight(hybrid_ratio(static_cast<double>(buffer[column]), shift), weights);
    if (log_weight == minus_inf) {
      continue;
    }
    const Candidate challenger{hybrid_score(log_weight, exact_noise(column)), column};
    if (beats(challenger, best)) {
      best = challenger;
    }
  }
  winner = hybrid_winner(best, false);
  return true;
}

template <typename scalar_t>
void draw_rows(const at::Tensor& log_score, const int64_t* x, const double* coefficients, const int64_t* row_ids,
               int64_t mask_id, uint64_t seed, uint64_t step, int64_t* tokens, double* best, int64_t* exact_counts) {
  const scalar_t* data = log_score.const_data_ptr<scalar_t>();
  const int64_t num_rows = log_score.size(0);
  const int64_t vocab = log_score.size(1);
  const int64_t stride_row = log_score.stride(0);
  const int64_t stride_col = log_score.stride(1);
  const bool parallel = num_rows > 1 && num_rows * vocab >= kMinTokensToParallelize;
  const HybridSetup setup{active_cpu_isa() >= CpuIsa::kAvx2, active_cpu_isa() >= CpuIsa::kAvx512,
                          hybrid_screen_tile_function(),
                          hybrid_tile_reaches_function()};
  // float64 log-scores do not fit the float32 screen: every row takes the full exact race.
  const bool screened = !std::is_same_v<scalar_t, double>;
  // Rows differ in cost (tiles without weight skip their noise), so they are handed out dynamically, in
  // chunks of at least kMinTokensToParallelize tokens.
  const int64_t chunk = std::max<int64_t>(1, kMinTokensToParallelize / vocab);
  (void)parallel;  // unused without OpenMP
  (void)chunk;
#ifdef _OPENMP
#pragma omp parallel if (parallel)
#endif
  {
    Scratch scratch;  // one per thread
    scratch.candidates.reserve(1024);
    if (screened) {
      scratch.values.reserve(static_cast<size_t>(vocab));
    }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, chunk)
#endif
    for (int64_t i = 0; i < num_rows; ++i) {
      const scalar_t* row = data + i * stride_row;
      const HybridCoefficients c = load_coefficients(coefficients + 6 * i);
      const uint64_t row_id = static_cast<uint64_t>(row_ids[i]);
      Candidate winner{0.0, 0};
      int64_t exact = vocab;
      if (!screened || !draw_row_screened(row, stride_col, vocab, x[i], mask_id, row_id, c, seed, step, setup,
                                          scratch, winner, exact)) {
        exact = vocab;
        winner = draw_row(row, stride_col, vocab, x[i], mask_id, row_id, c, seed, step, setup.avx2, scratch.tile);
      }
      tokens[i] = winner.column;
      best[i] = winner.score;
      if (exact_counts != nullptr) {
        exact_counts[i] = exact;
      }
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> hybrid_step_counted_cpu(const at::Tensor& log_score, const at::Tensor& x,
                                                                    const at::Tensor& coefficients,
                                                                    const at::Tensor& row_ids, int64_t mask_id,
                                                                    uint64_t seed, int64_t step, bool count) {
  check_hybrid_args(log_score, x, coefficients, row_ids, mask_id, step, c10::DeviceType::CPU);
  const int64_t num_rows = log_score.size(0);
  const int64_t vocab = log_score.size(1);

  // Values are checked here, before the parallel loop (nothing may throw inside it); on the CPU this
  // costs one pass over R ids.
  const at::Tensor x_contiguous = x.contiguous();
  const at::Tensor row_ids_contiguous = row_ids.contiguous();
  const at::Tensor coefficients_contiguous = coefficients.contiguous();
  const int64_t* x_data = x_contiguous.const_data_ptr<int64_t>();
  const int64_t* row_id_data = row_ids_contiguous.const_data_ptr<int64_t>();
  const int64_t max_row_id = (std::numeric_limits<int64_t>::max() - (vocab - 1)) / vocab;
  for (int64_t i = 0; i < num_rows; ++i) {
    TORCH_CHECK(x_data[i] >= 0 && x_data[i] < vocab, "hybrid_step: x must hold token ids in [0, V) = [0, ", vocab,
                "), got ", x_data[i], " at position ", i);
    TORCH_CHECK(row_id_data[i] >= 0 && row_id_data[i] <= max_row_id, "hybrid_step: row_ids must be in [0, ",
                max_row_id, "] for V = ", vocab, " (element ids row_id * V + y stay below 2^63), got ", row_id_data[i],
                " at position ", i);
  }

  at::Tensor tokens = at::empty({num_rows}, log_score.options().dtype(at::kLong));
  at::Tensor best = at::empty({num_rows}, log_score.options().dtype(at::kDouble));
  at::Tensor exact_counts = at::empty({count ? num_rows : 0}, log_score.options().dtype(at::kLong));
  if (num_rows == 0) {
    return {tokens, best, exact_counts};
  }
  int64_t* count_data = count ? exact_counts.mutable_data_ptr<int64_t>() : nullptr;
  const double* coefficient_data = coefficients_contiguous.const_data_ptr<double>();
  const uint64_t step_bits = static_cast<uint64_t>(step);
  int64_t* token_data = tokens.mutable_data_ptr<int64_t>();
  double* best_data = best.mutable_data_ptr<double>();
  switch (log_score.scalar_type()) {
    case at::kFloat:
      draw_rows<float>(log_score, x_data, coefficient_data, row_id_data, mask_id, seed, step_bits, token_data,
                       best_data, count_data);
      break;
    case at::kDouble:
      draw_rows<double>(log_score, x_data, coefficient_data, row_id_data, mask_id, seed, step_bits, token_data,
                        best_data, count_data);
      break;
    case at::kHalf:
      draw_rows<c10::Half>(log_score, x_data, coefficient_data, row_id_data, mask_id, seed, step_bits, token_data,
                           best_data, count_data);
      break;
    case at::kBFloat16:
      draw_rows<c10::BFloat16>(log_score, x_data, coefficient_data, row_id_data, mask_id, seed, step_bits,
                               token_data, best_data, count_data);
      break;
    default:
      TORCH_CHECK(false, "hybrid_step: unsupported log_score dtype ", log_score.scalar_type());  // checked above
  }
  return {tokens, best, exact_counts};
}

std::tuple<at::Tensor, at::Tensor> hybrid_step_cpu(const at::Tensor& log_score, const at::Tensor& x,
                                                   const at::Tensor& coefficients, const at::Tensor& row_ids,
                                                   int64_t mask_id, uint64_t seed, int64_t step) {
  auto [tokens, best, counts] = hybrid_step_counted_cpu(log_score, x, coefficients, row_ids, mask_id, seed, step,
                                                        false);
  return {tokens, best};
}

}  // namespace hdlm
