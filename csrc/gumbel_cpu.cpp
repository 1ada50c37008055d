// CPU backend of FP64 Gumbel-max (docs/sampling-stream.md): OpenMP over the sampled rows. A row of
// float32, bf16 or fp16 logits is screened, then decided (docs/sampling-screen.md): one walk in tiles of
// Philox pairs (one Philox block feeds two columns) computes every token's cheap float32 score interval
// (screen_avx2.h) and keeps the tokens whose interval reaches the row's best lower bound; the exact FP64
// score (philox.h, log64.h, gumbel_rule.h) is then computed for those candidates only, in column order.
// float64 logits, and temperatures whose inverse is not a moderate float32, take the exact path on every
// token. Bit-identical to the reference backend either way: the exact arithmetic is the shared header code,
// compiled without FMA contraction (-ffp-contract=off, setup.py), and the proof of the screen guarantees
// that every token that can win is a candidate.
#include "gumbel.h"

#include "screen.h"
#include "screen_avx2.h"

#include "gumbel_rule.h"
#include "log64.h"
#include "noise_tile.h"
#include "philox.h"

#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

namespace hdlm {
namespace {

// Below this many tokens in a call the thread hand-off costs more than it saves.
constexpr int64_t kMinTokensToParallelize = 16384;

struct alignas(64) Tile {
  uint32_t w0[kTilePairs], w1[kTilePairs], w2[kTilePairs], w3[kTilePairs];
  double noise_even[kTilePairs], noise_odd[kTilePairs];  // of the even and the odd element of each pair
};

// The winner of one row: logits `row` (column stride `stride_col`), identity `row_id`. Columns reach
// beats() in increasing order, so the lowest of equal scores is kept.
template <typename scalar_t>
Candidate sample_row(const scalar_t* row, int64_t stride_col, int64_t vocab, uint64_t row_id,
                     const uint8_t* excluded, const GumbelParams& params, Tile& tile) {
  constexpr double kMinusInf = -std::numeric_limits<double>::infinity();
  Candidate best = no_candidate();
  const auto consider = [&](int64_t column, double score) {
    if (excluded != nullptr && excluded[column]) {
      score = kMinusInf;
    }
    const Candidate challenger{score, column};
    if (beats(challenger, best)) {
      best = challenger;
    }
  };
  if (!params.noise) {  // greedy: no Philox, no log, no division
    for (int64_t column = 0; column < vocab; ++column) {
      consider(column, widen_to_double(row[column * stride_col]));
    }
    return best;
  }
  const RowPairs pairs = row_pairs(row_id, vocab);
  for (int64_t first = 0; first < pairs.count; first += kTilePairs) {
    const int count = static_cast<int>(std::min<int64_t>(kTilePairs, pairs.count - first));
    philox_tile(params.seed, params.step, pairs.first_pair + static_cast<uint64_t>(first), count, tile.w0, tile.w1,
                tile.w2, tile.w3);
    noise_tile(count, tile.w0, tile.w1, tile.w2, tile.w3, tile.noise_even, tile.noise_odd);
    // Pair first + p holds columns even and even + 1; the first pair of a row with odd row_id * V
    // starts one column early, the last pair may end one column late.
    for (int p = 0; p < count; ++p) {
      const int64_t even = 2 * (first + p) - pairs.parity;
      if (even >= 0) {
        consider(even, gumbel_score(widen_to_double(row[even * stride_col]), tile.noise_even[p], params));
      }
      if (even + 1 < vocab) {
        consider(even + 1, gumbel_score(widen_to_double(row[(even + 1) * stride_col]), tile.noise_odd[p], params));
      }
    }
  }
  return best;
}

// What one thread keeps across rows: the tiles and the candidate list (column, upper bound).
struct Scratch {
  Tile tile;
  ScreenTile screen;
  std::vector<std::pair<int64_t, float>> candidates;
};

// Everything a screened call needs besides the row.
struct ScreenSetup {
  bool enabled;
  float scale;  // float32(1 / T), 1 for T = 1
  ScreenTileFunction tile;
  TileReachesFunction reaches;
  bool avx2_philox;  // the Philox stage in AVX2 lanes (philox_tile_avx2), else the portable tile
};

// The winner of one row by screen-then-decide, the same (score, column) as sample_row. `exact` receives the
// number of tokens whose exact score was computed.
template <typename scalar_t>
Candidate sample_row_screened(const scalar_t* row, int64_t stride_col, int64_t vocab, uint64_t row_id,
                              const uint8_t* excluded, const GumbelParams& params, const ScreenSetup& setup,
                              Scratch& scratch, int64_t& exact) {
  constexpr float kMinusInfFloat = -std::numeric_limits<float>::infinity();
  constexpr double kMinusInf = -std::numeric_limits<double>::infinity();
  Tile& tile = scratch.tile;
  ScreenTile& screen = scratch.screen;
  auto& candidates = scratch.candidates;
  candidates.clear();
  const auto load = [&](int64_t column) -> float {
    if (excluded != nullptr && excluded[column]) {
      return kMinusInfFloat;
    }
    return static_cast<float>(row[column * stride_col]);  // exact for float, bf16, fp16
  };
  float floor = kMinusInfFloat;  // the best lower bound so far: only grows
  const RowPairs pairs = row_pairs(row_id, vocab);
  for (int64_t first = 0; first < pairs.count; first += kTilePairs) {
    const int count = static_cast<int>(std::min<int64_t>(kTilePairs, pairs.count - first));
    if (setup.avx2_philox) {
      philox_tile_avx2(params.seed, params.step, kGumbelStream, pairs.first_pair + static_cast<uint64_t>(first),
                       tile.w0, tile.w1, tile.w2, tile.w3);
    } else {
      philox_tile(params.seed, params.step, pairs.first_pair + static_cast<uint64_t>(first), count, tile.w0, tile.w1,
                  tile.w2, tile.w3);
    }
    const int64_t base = 2 * first - pairs.parity;  // column of the even element of the tile's first pair
    if (count == kTilePairs && base >= 0 && base + 2 * kTilePairs <= vocab) {
      if (excluded == nullptr && stride_col == 1) {  // the common case, a plain loop the vectorizer takes
        const scalar_t* pairs_start = row + base;
        for (int p = 0; p < kTilePairs; ++p) {
          screen.logit_even[p] = static_cast<float>(pairs_start[2 * p]);
          screen.logit_odd[p] = static_cast<float>(pairs_start[2 * p + 1]);
        }
      } else {
        for (int p = 0; p < kTilePairs; ++p) {
          screen.logit_even[p] = load(base + 2 * p);
          screen.logit_odd[p] = load(base + 2 * p + 1);
        }
      }
    } else {  // the row's first or last tile: absent columns and pairs score -inf
      for (int p = 0; p < kTilePairs; ++p) {
        const int64_t even = base + 2 * p;
        const bool present = p < count;
        screen.logit_even[p] = present && even >= 0 ? load(even) : kMinusInfFloat;
        screen.logit_odd[p] = present && even + 1 < vocab ? load(even + 1) : kMinusInfFloat;
      }
    }
    // Skip the tile when no exact score in it can reach the floor (docs/sampling-screen.md, "The
    // prefilter"): each token's score is at most its logit's part plus a bound of its noise from its
    // first Philox word alone, so the cheap noise is computed only in tiles where some token passes.
    if (floor > kMinusInfFloat && !setup.reaches(tile.w0, tile.w2, screen, setup.scale, floor)) {
      continue;
    }
    bool any = false;
    floor = setup.tile(tile.w0, tile.w1, tile.w2, tile.w3, setup.scale, floor, screen, any);
    if (!any) {
      continue;
    }
    append_candidates(screen, count, base, vocab, floor, candidates);
  }
  // Decide: the exact score of every token that can still win, in increasing column order (the list is),
  // so that beats() keeps the lowest of equal scores as the full walk does.
  Candidate best = no_candidate();
  exact = 0;
  const uint64_t first_element = row_id * static_cast<uint64_t>(vocab);
  for (const auto& [column, hi] : candidates) {
    if (!screen_candidate(hi, floor)) {
      continue;
    }
    ++exact;
    double score = kMinusInf;  // an excluded or -inf logit scores -inf whatever its noise
    const double logit = (excluded != nullptr && excluded[column]) ? kMinusInf
                                                                    : widen_to_double(row[column * stride_col]);
    if (logit != kMinusInf) {
      const double noise = gumbel_noise(
          uniform53(params.seed, params.step, kGumbelStream, first_element + static_cast<uint64_t>(column)));
      score = gumbel_score(logit, noise, params);
    }
    const Candidate challenger{score, column};
    if (beats(challenger, best)) {
      best = challenger;
    }
  }
  return best;
}

template <typename scalar_t>
void sample_rows(const at::Tensor& logits, const int64_t* take, const int64_t* row_ids, int64_t num_rows,
                 const uint8_t* excluded, const GumbelParams& params, const ScreenSetup& setup, int64_t* tokens,
                 double* best, int64_t* exact_counts) {
  const scalar_t* data = logits.const_data_ptr<scalar_t>();
  const int64_t stride_row = logits.stride(0);
  const int64_t stride_col = logits.stride(1);
  const int64_t vocab = logits.size(1);
  const bool parallel = num_rows > 1 && num_rows * vocab >= kMinTokensToParallelize;
  (void)parallel;  // unused without OpenMP
#ifdef _OPENMP
#pragma omp parallel if (parallel)
#endif
  {
    Scratch scratch;  // one per thread
    scratch.candidates.reserve(1024);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t i = 0; i < num_rows; ++i) {
      const int64_t row = take != nullptr ? take[i] : i;
      int64_t exact = vocab;
      const Candidate winner =
          setup.enabled ? sample_row_screened(data + row * stride_row, stride_col, vocab,
                                              static_cast<uint64_t>(row_ids[i]), excluded, params, setup, scratch,
                                              exact)
                        : sample_row(data + row * stride_row, stride_col, vocab, static_cast<uint64_t>(row_ids[i]),
                                     excluded, params, scratch.tile);
      tokens[i] = winner.column;
      best[i] = winner.score;
      if (exact_counts != nullptr) {
        exact_counts[i] = exact;
      }
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> gumbel_argmax_counted_cpu(
    const at::Tensor& logits, const std::optional<at::Tensor>& take, const at::Tensor& row_ids, uint64_t seed,
    int64_t step, double temperature, const std::optional<at::Tensor>& exclude, bool count) {
  check_gumbel_args(logits, take, row_ids, step, temperature, exclude, c10::DeviceType::CPU);
  const int64_t num_logits_rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  const int64_t num_rows = row_ids.size(0);

  // Values are checked here, before the parallel loop (nothing may throw inside it); on the CPU this
  // costs one pass over n ids.
  const at::Tensor row_ids_contiguous = row_ids.contiguous();
  const int64_t* row_id_data = row_ids_contiguous.const_data_ptr<int64_t>();
  const int64_t max_row_id = (std::numeric_limits<int64_t>::max() - (vocab - 1)) / vocab;
  for (int64_t i = 0; i < num_rows; ++i) {
    TORCH_CHECK(row_id_data[i] >= 0 && row_id_data[i] <= max_row_id, "gumbel_argmax: row_ids must be in [0, ",
                max_row_id, "] for V = ", vocab, " (element ids row_id * V + v stay below 2^63), got ", row_id_data[i],
                " at position ", i);
  }
  at::Tensor take_contiguous;
  const int64_t* take_data = nullptr;
  if (take.has_value()) {
    take_contiguous = take->contiguous();
    take_data = take_contiguous.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < num_rows; ++i) {
      TORCH_CHECK(take_data[i] >= 0 && take_data[i] < num_logits_rows, "gumbel_argmax: take must hold logits rows in ",
                  "[0, K) = [0, ", num_logits_rows, "), got ", take_data[i], " at position ", i);
    }
  }
  std::vector<uint8_t> excluded;
  if (exclude.has_value() && exclude->numel() > 0) {
    excluded.assign(static_cast<size_t>(vocab), 0);
    const at::Tensor exclude_contiguous = exclude->contiguous();
    const int64_t* ids = exclude_contiguous.const_data_ptr<int64_t>();
    for (int64_t k = 0; k < exclude_contiguous.numel(); ++k) {
      TORCH_CHECK(ids[k] >= 0 && ids[k] < vocab, "gumbel_argmax: exclude must hold token ids in [0, V) = [0, ", vocab,
                  "), got ", ids[k]);
      excluded[static_cast<size_t>(ids[k])] = 1;
    }
  }

  at::Tensor tokens = at::empty({num_rows}, logits.options().dtype(at::kLong));
  at::Tensor best = at::empty({num_rows}, logits.options().dtype(at::kDouble));
  at::Tensor exact_counts = at::empty({count ? num_rows : 0}, logits.options().dtype(at::kLong));
  if (num_rows == 0) {
    return {tokens, best, exact_counts};
  }
  const bool noise = temperature != 0.0;
  const GumbelParams params{seed, static_cast<uint64_t>(step), temperature, noise, noise && temperature != 1.0};
  ScreenSetup setup{false, 1.0f, screen_tile_function(), tile_reaches_function(),
                    active_cpu_isa() >= CpuIsa::kAvx2};
  if (noise && logits.scalar_type() != at::kDouble) {
    setup.enabled = screen_temperature(temperature, setup.scale);
  }
  int64_t* count_data = count ? exact_counts.mutable_data_ptr<int64_t>() : nullptr;
  const uint8_t* excluded_data = excluded.empty() ? nullptr : excluded.data();
  int64_t* token_data = tokens.mutable_data_ptr<int64_t>();
  double* best_data = best.mutable_data_ptr<double>();
  switch (logits.scalar_type()) {
    case at::kFloat:
      sample_rows<float>(logits, take_data, row_id_data, num_rows, excluded_data, params, setup, token_data,
                            best_data, count_data);
      break;
    case at::kDouble:
      sample_rows<double>(logits, take_data, row_id_data, num_rows, excluded_data, params, setup, token_data,
                            best_data, count_data);
      break;
    case at::kHalf:
      sample_rows<c10::Half>(logits, take_data, row_id_data, num_rows, excluded_data, params, setup, token_data,
                            best_data, count_data);
      break;
    case at::kBFloat16:
      sample_rows<c10::BFloat16>(logits, take_data, row_id_data, num_rows, excluded_data, params, setup, token_data,
                                 best_data, count_data);
      break;
    default:
      TORCH_CHECK(false, "gumbel_argmax: unsupported logits dtype ", logits.scalar_type());  // checked above
  }
  return {tokens, best, exact_counts};
}

std::tuple<at::Tensor, at::Tensor> gumbel_argmax_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& take,
                                                     const at::Tensor& row_ids, uint64_t seed, int64_t step,
                                                     double temperature, const std::optional<at::Tensor>& exclude) {
  auto [tokens, best, counts] = gumbel_argmax_counted_cpu(logits, take, row_ids, seed, step, temperature, exclude,
                                                          false);
  return {tokens, best};
}

}  // namespace hdlm
