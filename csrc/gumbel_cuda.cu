// CUDA backend of FP64 Gumbel-max (docs/sampling-stream.md): one thread block per sampled row. bf16 / fp16 / fp32
// logits at most temperatures take the screened kernel (a float32 screen, then the exact score of the few
// candidates: docs/sampling-screen.md); the others the exact walk below, where each thread walks
// the row's Philox pairs with a block-sized stride (one Philox block feeds two adjacent columns), keeps
// its best (score, column), and the block reduces them with the rule of gumbel_rule.h. The arithmetic
// is the header code the CPU backend compiles too (philox.h, log64.h, gumbel_rule.h), with every float64
// operation an explicit round-to-nearest intrinsic (no FMA contraction), so the tokens and winning
// scores are bit-identical to the CPU reference.
//
// Only c10/ATen core headers here, as in uniform53_cuda.cu: neither <torch/extension.h> nor
// <ATen/cuda/CUDAContext.h>.
#include "gumbel.h"

#include "block_best.cuh"
#include "gumbel_rule.h"
#include "log64.h"
#include "philox.h"
#include "screen.h"
#include "screen_cuda.cuh"

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <type_traits>

namespace hdlm {
namespace {

using namespace block_best_detail;  // kThreadsPerRow, kWarpSize, kWarpsPerRow, kFullWarp

// Block i samples row i: logits row take[i] (or i), noise of identity row_ids[i]. Thread t owns the
// row's pairs t, t + 256, ...; pair j holds columns 2j - parity (its even element) and 2j - parity + 1.
// Adjacent threads read adjacent column pairs, so the loads coalesce.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerRow)
    gumbel_argmax_kernel(const scalar_t* __restrict__ logits, int64_t stride_row, int64_t stride_col, int64_t vocab,
                         const int64_t* __restrict__ take, const int64_t* __restrict__ row_ids,
                         const uint8_t* __restrict__ excluded, GumbelParams params, int64_t* __restrict__ tokens,
                         double* __restrict__ best_scores) {
  const int64_t i = blockIdx.x;
  const int64_t row = take != nullptr ? take[i] : i;
  const scalar_t* row_logits = logits + row * stride_row;
  const double minus_inf = no_candidate().score;

  // Columns reach a thread in increasing order, so beats() keeps its lowest of equal scores.
  Candidate best = no_candidate();
  const auto consider = [&](int64_t column, double noise) {
    double score = gumbel_score(widen_to_double(row_logits[column * stride_col]), noise, params);
    if (excluded != nullptr && excluded[column]) {
      score = minus_inf;
    }
    take_if_better(best, Candidate{score, column});
  };
  if (params.noise) {
    const RowPairs pairs = row_pairs(static_cast<uint64_t>(row_ids[i]), vocab);
    for (int64_t j = threadIdx.x; j < pairs.count; j += kThreadsPerRow) {
      const PhiloxBlock block = philox_block_for_pair(params.seed, params.step, kGumbelStream,
                                                      pairs.first_pair + static_cast<uint64_t>(j));
      const int64_t even = 2 * j - pairs.parity;
      if (even >= 0) {
        consider(even, gumbel_noise(uniform53_from_words(block.w[0], block.w[1])));
      }
      if (even + 1 < vocab) {
        consider(even + 1, gumbel_noise(uniform53_from_words(block.w[2], block.w[3])));
      }
    }
  } else {  // greedy: no Philox, no log, no division; two adjacent columns per thread as above
    for (int64_t even = 2 * static_cast<int64_t>(threadIdx.x); even < vocab; even += 2 * kThreadsPerRow) {
      consider(even, 0.0);
      if (even + 1 < vocab) {
        consider(even + 1, 0.0);
      }
    }
  }

  best = block_best(best);
  if (threadIdx.x == 0) {
    tokens[i] = best.column;  // V >= 1: every row has a column
    best_scores[i] = best.score;
  }
}

// Screen, then decide (docs/sampling-screen.md, "GPU kernels"), for bf16 / fp16 / fp32 logits at a
// temperature whose float32 1/T is normal (`scale`). Block i samples row i as gumbel_argmax_kernel does, in
// chunks of kColumns = 16 / sizeof(scalar_t) columns (whole Philox pairs: chunk q starts at column
// kColumns q - parity), chunk q = k 256 + t for thread t at iteration k, so a warp's 32 chunks are adjacent
// and a warp iterates as one (its lanes run the same iterations).
//   1. float32 and integer work only (screen_row_floor): each chunk's Philox blocks and the prefilter's upper
//      bounds from the first words; where a lane of the warp reaches the running floor, each column's cheap
//      interval (screen.h), the floor raised, and the warp's largest upper bound into its iteration's slot in
//      shared memory (iterations past kScreenSlots share the last slot, which then holds their maximum).
//   2. L = the block's floor. Each warp re-walks only the iterations whose slot reaches L (a
//      warp-uniform branch), recomputing the chunk's Philox blocks and intervals; the lanes whose columns
//      are candidates (hi >= L, or a NaN hi) compute the exact FP64 score with today's functions and
//      keep the best with beats() of gumbel_rule.h.
// kExclude: `excluded` marks excluded ids (else it is null); kVector: every row is contiguous and 16-byte
// aligned (one 16-byte load per chunk); kCount: `counts` receives the number of candidates of each row (else
// it is null and nothing is counted).
// __launch_bounds__(256, kScreenedBlocksPerSm): with the maximum threads alone, ptxas allocated the float32
// kernel with exclusion and strided loads 64 registers and spilled across the slow-path calls of log64's IEEE
// division. Asking for three blocks per SM (at most 80 registers) the float32 kernels take 75-80 and spill
// nothing; the bf16 / fp16 ones (eight columns per chunk) ask for two (at most 128: they take 104-125; asked
// for three, four of their sixteen kernels spill 8-12 bytes) (ptxas -v, sm_90).

template <typename scalar_t>
constexpr int kScreenedBlocksPerSm = std::is_same_v<scalar_t, float> ? 3 : 2;

template <typename scalar_t, bool kExclude, bool kVector, bool kCount>
__global__ void __launch_bounds__(kThreadsPerRow, kScreenedBlocksPerSm<scalar_t>)
    gumbel_argmax_screened_kernel(const scalar_t* __restrict__ logits, int64_t stride_row, int64_t stride_col,
                                  int64_t vocab, const int64_t* __restrict__ take, const int64_t* __restrict__ row_ids,
                                  const uint8_t* __restrict__ excluded, GumbelParams params, float scale,
                                  int64_t* __restrict__ tokens, double* __restrict__ best_scores,
                                  int64_t* __restrict__ counts) {
  constexpr int kColumns = Chunk<scalar_t>::kColumns;
  constexpr int kPairs = kColumns / 2;
  __shared__ ScreenShared screen_shared;
  __shared__ int row_candidates;

  const int64_t i = blockIdx.x;
  const int64_t row = take != nullptr ? take[i] : i;
  const scalar_t* row_logits = logits + row * stride_row;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const float minus_inf = __int_as_float(0xFF800000);
  const RowPairs pairs = row_pairs(static_cast<uint64_t>(row_ids[i]), vocab);
  const int64_t num_chunks = (pairs.count + kPairs - 1) / kPairs;
  if (kCount && threadIdx.x == 0) {
    row_candidates = 0;  // visible to every thread after screen_row_floor's barriers
  }

  // Chunk q's logits (absent and excluded columns at -inf: an excluded token's exact score is -inf), its
  // Philox blocks, and each column's prefilter bound: the screen's hi with the noise bound of the first word.
  struct Words {
    Chunk<scalar_t> logits;
    PhiloxBlock blocks[kPairs];
    float reach[kColumns];
  };
  // The cheap interval of each column (hi at most the prefilter's bound).
  struct Bounds {
    float lo[kColumns];
    float hi[kColumns];
  };
  const auto words = [&](int64_t q) {
    Words chunk;
    const int64_t first = kColumns * q - pairs.parity;
    chunk.logits = load_chunk<scalar_t, kVector>(row_logits, stride_col, vocab, first);
    if constexpr (kExclude) {
#pragma unroll
      for (int c = 0; c < kColumns; ++c) {
        const int64_t column = first + c;
        chunk.logits.x[c] = column >= 0 && column < vocab && excluded[column] ? minus_inf : chunk.logits.x[c];
      }
    }
#pragma unroll
    for (int p = 0; p < kPairs; ++p) {
      chunk.blocks[p] = philox_block_for_pair(params.seed, params.step, kGumbelStream,
                                              pairs.first_pair + static_cast<uint64_t>(kPairs * q + p));
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int c = 2 * p + half;
        chunk.reach[c] = screen_bounds(chunk.logits.x[c], screen_noise_bound(chunk.blocks[p].w[2 * half]), scale).hi;
      }
    }
    return chunk;
  };
  const auto bounds = [&](const Words& chunk) {
    Bounds interval;
#pragma unroll
    for (int p = 0; p < kPairs; ++p) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int c = 2 * p + half;
        const ScreenBounds cheap = screen_bounds(
            chunk.logits.x[c], screen_noise_device(chunk.blocks[p].w[2 * half], chunk.blocks[p].w[2 * half + 1]),
            scale);
        interval.lo[c] = cheap.lo;
        interval.hi[c] = tighter_upper(cheap.hi, chunk.reach[c]);
      }
    }
    return interval;
  };

  // Pass 1 (float32 and integer work only).
  const float row_floor = screen_row_floor<kColumns>(words, bounds, num_chunks, minus_inf, screen_shared);

  // Pass 2: the exact score of the candidates only.
  Candidate best = no_candidate();
  int candidates = 0;
  int64_t k = 0;
  for (int64_t base = warp * kWarpSize; base < num_chunks; base += kThreadsPerRow, ++k) {
    if (screen_shared.slot_top[warp][k < kScreenSlots ? k : kScreenSlots - 1] < row_floor) {
      continue;  // no candidate in this iteration of the warp (uniform across the warp)
    }
    const int64_t q = base + lane;
    const Words chunk = words(q);
    const Bounds interval = bounds(chunk);
    const int64_t first = kColumns * q - pairs.parity;
#pragma unroll
    for (int c = 0; c < kColumns; ++c) {
      const bool present = q < num_chunks && first + c >= 0 && first + c < vocab;
      if (present && screen_candidate(interval.hi[c], row_floor)) {
        const PhiloxBlock& block = chunk.blocks[c / 2];
        double score = gumbel_score(static_cast<double>(chunk.logits.x[c]),
                                    gumbel_noise(uniform53_from_words(block.w[2 * (c % 2)], block.w[2 * (c % 2) + 1])),
                                    params);
        // hi = -inf proves the exact score -inf (lo <= s <= hi): -inf and excluded columns, in a row whose floor
        // is -inf.
        if (interval.hi[c] == minus_inf) {
          score = no_candidate().score;
        }
        take_if_better(best, Candidate{score, first + c});
        ++candidates;
      }
    }
  }
  if constexpr (kCount) {
    const int warp_candidates = __reduce_add_sync(kFullWarp, candidates);
    if (lane == 0) {
      atomicAdd(&row_candidates, warp_candidates);
    }
  }

  best = block_best(best);  // synchronizes the block (row_candidates is complete after it)
  if (threadIdx.x == 0) {
    tokens[i] = best.column;
    best_scores[i] = best.score;
    if constexpr (kCount) {
      counts[i] = row_candidates;
    }
  }
}

// excluded[ids[k]] = 1; ids outside [0, V) (which the Python wrapper refuses) are skipped rather than
// written out of bounds.
__global__ void mark_excluded_kernel(const int64_t* __restrict__ ids, int64_t count, int64_t vocab,
                                     uint8_t* __restrict__ excluded) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k < count && ids[k] >= 0 && ids[k] < vocab) {
    excluded[ids[k]] = 1;
  }
}

// The screened kernel of a call's flags (exclusion, 16-byte loads, counts).
template <typename scalar_t, bool kCount>
auto screened_kernel(bool exclude, bool vector) {
  return exclude ? (vector ? gumbel_argmax_screened_kernel<scalar_t, true, true, kCount>
                           : gumbel_argmax_screened_kernel<scalar_t, true, false, kCount>)
                 : (vector ? gumbel_argmax_screened_kernel<scalar_t, false, true, kCount>
                           : gumbel_argmax_screened_kernel<scalar_t, false, false, kCount>);
}

// Whether a call takes the screened kernel: bf16 / fp16 / fp32 logits at a temperature whose float32 1/T lies
// in [2^-100, 2^100] (`scale`); float64 logits, temperature 0 and the other temperatures take the exact walk
// on every token.
bool screened_draw(at::ScalarType dtype, const GumbelParams& params, float& scale) {
  scale = 1.0f;
  return dtype != at::kDouble && params.noise && screen_temperature(params.temperature, scale);
}

// Launches the draw of every row; with `counts` (else null) the screened kernel also writes the number of
// candidates of each row.
template <typename scalar_t>
void launch(const at::Tensor& logits, const int64_t* take, const int64_t* row_ids, int64_t num_rows,
            const uint8_t* excluded, const GumbelParams& params, int64_t* tokens, double* best, int64_t* counts,
            cudaStream_t stream) {
  float scale = 1.0f;
  if (screened_draw(logits.scalar_type(), params, scale)) {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      const bool vector = logits.stride(1) == 1 && reinterpret_cast<uintptr_t>(logits.const_data_ptr()) % 16 == 0 &&
                          (logits.size(0) == 1 || (logits.stride(0) * logits.element_size()) % 16 == 0);
      const bool exclude = excluded != nullptr;
      const auto kernel = counts != nullptr ? screened_kernel<scalar_t, true>(exclude, vector)
                                            : screened_kernel<scalar_t, false>(exclude, vector);
      kernel<<<static_cast<unsigned int>(num_rows), kThreadsPerRow, 0, stream>>>(
          logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(1), logits.size(1), take, row_ids,
          excluded, params, scale, tokens, best, counts);
    }
  } else {
    gumbel_argmax_kernel<scalar_t><<<static_cast<unsigned int>(num_rows), kThreadsPerRow, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(1), logits.size(1), take, row_ids,
        excluded, params, tokens, best);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> gumbel_argmax_counted_cuda(
    const at::Tensor& logits, const std::optional<at::Tensor>& take, const at::Tensor& row_ids, uint64_t seed,
    int64_t step, double temperature, const std::optional<at::Tensor>& exclude, bool count) {
  check_gumbel_args(logits, take, row_ids, step, temperature, exclude, c10::DeviceType::CUDA);
  const int64_t num_rows = row_ids.size(0);
  TORCH_CHECK(num_rows < (int64_t{1} << 31), "gumbel_argmax: at most 2^31 - 1 rows per call (one CUDA block each), ",
              "got ", num_rows);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const bool noise = temperature != 0.0;
  const GumbelParams params{seed, static_cast<uint64_t>(step), temperature, noise, noise && temperature != 1.0};
  float scale = 1.0f;
  const bool screened = screened_draw(logits.scalar_type(), params, scale);
  at::Tensor tokens = at::empty({num_rows}, logits.options().dtype(at::kLong));
  at::Tensor best = at::empty({num_rows}, logits.options().dtype(at::kDouble));
  // The exact walk scores every token exactly: V per row; the screened kernel writes its candidates.
  at::Tensor counts = !count ? at::empty({0}, logits.options().dtype(at::kLong))
                      : screened ? at::empty({num_rows}, logits.options().dtype(at::kLong))
                                 : at::full({num_rows}, logits.size(1), logits.options().dtype(at::kLong));
  if (num_rows == 0) {
    return {tokens, best, counts};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index());
  const at::Tensor row_ids_contiguous = row_ids.contiguous();
  at::Tensor take_contiguous;
  if (take.has_value()) {
    take_contiguous = take->contiguous();
  }
  // A byte per token marks the excluded ids (read through L2 by every row), built on the device so
  // that no id travels through the host.
  at::Tensor excluded;
  if (exclude.has_value() && exclude->numel() > 0) {
    const at::Tensor ids = exclude->contiguous();
    excluded = at::zeros({logits.size(1)}, logits.options().dtype(at::kByte));
    constexpr int kThreads = 256;
    const int64_t excluded_count = ids.numel();
    mark_excluded_kernel<<<static_cast<unsigned int>((excluded_count + kThreads - 1) / kThreads), kThreads, 0,
                           stream>>>(ids.const_data_ptr<int64_t>(), excluded_count, logits.size(1),
                                     excluded.mutable_data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t* take_data = take.has_value() ? take_contiguous.const_data_ptr<int64_t>() : nullptr;
  const int64_t* row_id_data = row_ids_contiguous.const_data_ptr<int64_t>();
  const uint8_t* excluded_data = excluded.defined() ? excluded.const_data_ptr<uint8_t>() : nullptr;
  int64_t* token_data = tokens.mutable_data_ptr<int64_t>();
  double* best_data = best.mutable_data_ptr<double>();
  int64_t* count_data = count && screened ? counts.mutable_data_ptr<int64_t>() : nullptr;
  switch (logits.scalar_type()) {
    case at::kFloat:
      launch<float>(logits, take_data, row_id_data, num_rows, excluded_data, params, token_data, best_data, count_data,
                    stream);
      break;
    case at::kDouble:
      launch<double>(logits, take_data, row_id_data, num_rows, excluded_data, params, token_data, best_data,
                     count_data, stream);
      break;
    case at::kHalf:
      launch<c10::Half>(logits, take_data, row_id_data, num_rows, excluded_data, params, token_data, best_data,
                        count_data, stream);
      break;
    case at::kBFloat16:
      launch<c10::BFloat16>(logits, take_data, row_id_data, num_rows, excluded_data, params, token_data, best_data,
                            count_data, stream);
      break;
    default:
      TORCH_CHECK(false, "gumbel_argmax: unsupported logits dtype ", logits.scalar_type());  // checked above
  }
  return {tokens, best, counts};
}

std::tuple<at::Tensor, at::Tensor> gumbel_argmax_cuda(const at::Tensor& logits, const std::optional<at::Tensor>& take,
                                                      const at::Tensor& row_ids, uint64_t seed, int64_t step,
                                                      double temperature, const std::optional<at::Tensor>& exclude) {
  auto [tokens, best, counts] = gumbel_argmax_counted_cuda(logits, take, row_ids, seed, step, temperature, exclude,
                                                           false);
  return {tokens, best};
}

}  // namespace hdlm
