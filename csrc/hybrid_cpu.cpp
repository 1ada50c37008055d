// CPU backend of the fused γ-hybrid step (docs/hybrid-step.md, "The fused form"):
// OpenMP over the rows, each row read three times through its strides (max, fixed-point sum, race), the
// race in tiles of Philox pairs (one Philox block feeds two columns) as gumbel_cpu.cpp. Bit-identical to
// the reference backend because the arithmetic is the shared header code (hybrid_rule.h, gumbel_rule.h,
// log64.h, philox.h), compiled without FMA contraction (-ffp-contract=off, setup.py).
#include "hybrid.h"

#include "gumbel_rule.h"
#include "hybrid_rule.h"
#include "log64.h"
#include "noise_tile.h"
#include "screen_avx2.h"  // philox_tile_avx2, the ISA choice
#include "philox.h"

#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <limits>

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

template <typename scalar_t>
void draw_rows(const at::Tensor& log_score, const int64_t* x, const double* coefficients, const int64_t* row_ids,
               int64_t mask_id, uint64_t seed, uint64_t step, int64_t* tokens, double* best) {
  const scalar_t* data = log_score.const_data_ptr<scalar_t>();
  const int64_t num_rows = log_score.size(0);
  const int64_t vocab = log_score.size(1);
  const int64_t stride_row = log_score.stride(0);
  const int64_t stride_col = log_score.stride(1);
  const bool parallel = num_rows > 1 && num_rows * vocab >= kMinTokensToParallelize;
  const bool avx2_philox = active_cpu_isa() == CpuIsa::kAvx2;
  // Rows differ in cost (tiles without weight skip their noise), so they are handed out dynamically, in
  // chunks of at least kMinTokensToParallelize tokens.
  const int64_t chunk = std::max<int64_t>(1, kMinTokensToParallelize / vocab);
  (void)parallel;  // unused without OpenMP
  (void)chunk;
#ifdef _OPENMP
#pragma omp parallel if (parallel)
#endif
  {
    Tile tile;  // one per thread
#ifdef _OPENMP
#pragma omp for schedule(dynamic, chunk)
#endif
    for (int64_t i = 0; i < num_rows; ++i) {
      const Candidate winner =
          draw_row(data + i * stride_row, stride_col, vocab, x[i], mask_id, static_cast<uint64_t>(row_ids[i]),
                   load_coefficients(coefficients + 6 * i), seed, step, avx2_philox, tile);
      tokens[i] = winner.column;
      best[i] = winner.score;
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> hybrid_step_cpu(const at::Tensor& log_score, const at::Tensor& x,
                                                   const at::Tensor& coefficients, const at::Tensor& row_ids,
                                                   int64_t mask_id, uint64_t seed, int64_t step) {
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
  if (num_rows == 0) {
    return {tokens, best};
  }
  const double* coefficient_data = coefficients_contiguous.const_data_ptr<double>();
  const uint64_t step_bits = static_cast<uint64_t>(step);
  int64_t* token_data = tokens.mutable_data_ptr<int64_t>();
  double* best_data = best.mutable_data_ptr<double>();
  switch (log_score.scalar_type()) {
    case at::kFloat:
      draw_rows<float>(log_score, x_data, coefficient_data, row_id_data, mask_id, seed, step_bits, token_data,
                       best_data);
      break;
    case at::kDouble:
      draw_rows<double>(log_score, x_data, coefficient_data, row_id_data, mask_id, seed, step_bits, token_data,
                        best_data);
      break;
    case at::kHalf:
      draw_rows<c10::Half>(log_score, x_data, coefficient_data, row_id_data, mask_id, seed, step_bits, token_data,
                           best_data);
      break;
    case at::kBFloat16:
      draw_rows<c10::BFloat16>(log_score, x_data, coefficient_data, row_id_data, mask_id, seed, step_bits,
                               token_data, best_data);
      break;
    default:
      TORCH_CHECK(false, "hybrid_step: unsupported log_score dtype ", log_score.scalar_type());  // checked above
  }
  return {tokens, best};
}

}  // namespace hdlm
