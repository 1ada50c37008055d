// CPU backend of FP64 Gumbel-max (docs/sampling-stream.md): OpenMP over the sampled rows, each row walked once in
// column order, in tiles of Philox pairs (one Philox block feeds two columns). Bit-identical to the
// reference backend because the arithmetic is the shared header code (philox.h, log64.h,
// gumbel_rule.h), compiled without FMA contraction (-ffp-contract=off, setup.py).
#include "gumbel.h"

#include "gumbel_rule.h"
#include "log64.h"
#include "noise_tile.h"
#include "philox.h"

#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <limits>
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

template <typename scalar_t>
void sample_rows(const at::Tensor& logits, const int64_t* take, const int64_t* row_ids, int64_t num_rows,
                 const uint8_t* excluded, const GumbelParams& params, int64_t* tokens, double* best) {
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
    Tile tile;  // one per thread
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t i = 0; i < num_rows; ++i) {
      const int64_t row = take != nullptr ? take[i] : i;
      const Candidate winner = sample_row(data + row * stride_row, stride_col, vocab,
                                          static_cast<uint64_t>(row_ids[i]), excluded, params, tile);
      tokens[i] = winner.column;
      best[i] = winner.score;
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gumbel_argmax_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& take,
                                                     const at::Tensor& row_ids, uint64_t seed, int64_t step,
                                                     double temperature, const std::optional<at::Tensor>& exclude) {
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
  if (num_rows == 0) {
    return {tokens, best};
  }
  const bool noise = temperature != 0.0;
  const GumbelParams params{seed, static_cast<uint64_t>(step), temperature, noise, noise && temperature != 1.0};
  const uint8_t* excluded_data = excluded.empty() ? nullptr : excluded.data();
  int64_t* token_data = tokens.mutable_data_ptr<int64_t>();
  double* best_data = best.mutable_data_ptr<double>();
  switch (logits.scalar_type()) {
    case at::kFloat:
      sample_rows<float>(logits, take_data, row_id_data, num_rows, excluded_data, params, token_data, best_data);
      break;
    case at::kDouble:
      sample_rows<double>(logits, take_data, row_id_data, num_rows, excluded_data, params, token_data, best_data);
      break;
    case at::kHalf:
      sample_rows<c10::Half>(logits, take_data, row_id_data, num_rows, excluded_data, params, token_data, best_data);
      break;
    case at::kBFloat16:
      sample_rows<c10::BFloat16>(logits, take_data, row_id_data, num_rows, excluded_data, params, token_data,
                                 best_data);
      break;
    default:
      TORCH_CHECK(false, "gumbel_argmax: unsupported logits dtype ", logits.scalar_type());  // checked above
  }
  return {tokens, best};
}

}  // namespace hdlm
