// CUDA backend of the fused γ-hybrid step (docs/hybrid-step.md, "The fused form"):
// one thread block per row, three passes over the row's log-scores read through their strides:
//   pass 1  the maximum of the read entries and the bad flag, reduced over the block (max is exact);
//   pass 2  the two int64 fixed-point sums of the scaled ratios, reduced over the block (integer sums are
//           exact in any order, so any reduction tree gives the reference's S_o);
//   pass 3  the race over the row's Philox pairs (one Philox block feeds two adjacent columns), each
//           thread keeping its best (score, column) and the block reducing them with beats() of
//           gumbel_rule.h, a total order, so the tree gives the reference's winner. bf16 / fp16 / fp32 rows
//           race screened (a float32 screen, then the exact score of the current cell and the few
//           candidates: docs/sampling-screen.md, "GPU kernels"); float64 rows, bad rows and rows whose
//           constants are outside the screen's range score every token.
// The per-row and per-token arithmetic is the header code the CPU backend compiles too (hybrid_rule.h,
// gumbel_rule.h, log64.h, philox.h), every float64 operation an explicit round-to-nearest intrinsic (no
// FMA contraction), so the tokens and winning scores are bit-identical to the CPU reference. The kernel
// is launched on the current stream and nothing here synchronizes with the host.
//
// Only c10/ATen core headers here, as in gumbel_cuda.cu: neither <torch/extension.h> nor
// <ATen/cuda/CUDAContext.h>.
#include "hybrid.h"

#include "block_best.cuh"
#include "gumbel_rule.h"
#include "hybrid_rule.h"
#include "hybrid_screen.h"
#include "hybrid_screen_cuda.cuh"
#include "log64.h"
#include "philox.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace hdlm {
namespace {

using namespace block_best_detail;  // kThreadsPerRow, kWarpSize, kWarpsPerRow, kFullWarp

// The block's maximum, in every thread. Butterfly shuffles leave the warp's maximum in every lane; every
// thread then folds the warps' maxima in the same order, so all of them hold the same bits. `scratch` is
// this reduction's own shared array (not reused, so no barrier is needed after reading it).
__device__ __forceinline__ double block_max(double value, double* scratch) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = hybrid_max(value, __shfl_xor_sync(kFullWarp, value, offset));
  }
  if (threadIdx.x % kWarpSize == 0) {
    scratch[threadIdx.x / kWarpSize] = value;
  }
  __syncthreads();
  value = scratch[0];
  for (int warp = 1; warp < kWarpsPerRow; ++warp) {
    value = hybrid_max(value, scratch[warp]);
  }
  return value;
}

// The block's sum of an int64, in every thread (exact: any order gives the same value).
__device__ __forceinline__ int64_t block_sum(int64_t value, long long* scratch) {
  long long sum = static_cast<long long>(value);
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    sum += __shfl_xor_sync(kFullWarp, sum, offset);
  }
  if (threadIdx.x % kWarpSize == 0) {
    scratch[threadIdx.x / kWarpSize] = sum;
  }
  __syncthreads();
  sum = 0;
  for (int warp = 0; warp < kWarpsPerRow; ++warp) {
    sum += scratch[warp];
  }
  return static_cast<int64_t>(sum);
}

// The full race of a row (docs/hybrid-step.md), this thread's best candidate: thread t owns the row's pairs
// t, t + 256, ...; pair j holds columns 2j - parity (its even element) and 2j - parity + 1, so the columns
// reach a thread in increasing order and beats() keeps its lowest of equal scores. Tokens without weight
// score -inf whatever their noise: they are not offered, and a pair without weight evaluates no Philox
// block (hybrid_winner reports -inf at column 0 for a row without candidates, as the reference's argmax).
template <typename Load>
__device__ __forceinline__ Candidate hybrid_race_exact(int64_t vocab, int64_t current, int64_t mask_id,
                                                       uint64_t row_id, uint64_t seed, uint64_t step,
                                                       const HybridRow& weights, bool bad, const Load& load) {
  const double minus_inf = no_candidate().score;
  Candidate best = no_candidate();
  const RowPairs pairs = row_pairs(row_id, vocab);
  for (int64_t j = threadIdx.x; j < pairs.count; j += kThreadsPerRow) {
    const int64_t even = 2 * j - pairs.parity;
    const int64_t odd = even + 1;
    const double even_weight =
        even >= 0 ? hybrid_cell_log_weight(hybrid_cell(even, current, mask_id), weights, bad,
                                           [&] { return load(even); })
                  : minus_inf;
    const double odd_weight =
        odd < vocab ? hybrid_cell_log_weight(hybrid_cell(odd, current, mask_id), weights, bad,
                                             [&] { return load(odd); })
                    : minus_inf;
    if (even_weight == minus_inf && odd_weight == minus_inf) {
      continue;
    }
    const PhiloxBlock block = philox_block_for_pair(seed, step, kGumbelStream,
                                                    pairs.first_pair + static_cast<uint64_t>(j));
    if (even_weight != minus_inf) {
      const double noise = gumbel_noise(uniform53_from_words(block.w[0], block.w[1]));
      take_if_better(best, Candidate{hybrid_score(even_weight, noise), even});
    }
    if (odd_weight != minus_inf) {
      const double noise = gumbel_noise(uniform53_from_words(block.w[2], block.w[3]));
      take_if_better(best, Candidate{hybrid_score(odd_weight, noise), odd});
    }
  }
  return best;
}

// The least blocks per SM that ptxas must fit: with __launch_bounds__(256) alone it allocates the float64
// kernel 48 registers (five blocks per SM in the resource table) and spills a loop invariant across the
// slow-path calls of the IEEE division in log64, so that kernel asks for one block (64 registers, no spill);
// the screened kernels ask for two (at most 128 registers; with one they take about 156, one block per SM).
template <typename scalar_t>
constexpr int kMinBlocksPerSm = std::is_same_v<scalar_t, double> ? 1 : 2;

// Block i steps row i: log-scores log_score[i, :], current token x[i], constants coefficients[i, :],
// noise of identity row_ids[i]. float64 log-scores take passes 1 and 2 on float64 values and the full race;
// bf16 / fp16 / fp32 ones read the row in chunks of 16 bytes (screen_cuda.cuh; one 16-byte load each with
// kVector: a contiguous, 16-byte-aligned tensor), take the maximum in float32 (exact: the widening to
// float64 is monotone), and race screened (hybrid_screen_cuda.cuh) unless the row is bad or its constants
// are outside the screen's range (hybrid_screen_row), which take the full race. kCount (screened dtypes only):
// `counts` receives the number of tokens of each row scored exactly (the current cell plus the candidates, or V
// on the full race), as hybrid_step_counted_cpu; without it `counts` is null and nothing is counted.
template <typename scalar_t, bool kVector, bool kCount>
__global__ void __launch_bounds__(kThreadsPerRow, kMinBlocksPerSm<scalar_t>)
    hybrid_step_kernel(const scalar_t* __restrict__ log_score, int64_t stride_row, int64_t stride_col, int64_t vocab,
                       const int64_t* __restrict__ x, const double* __restrict__ coefficients,
                       const int64_t* __restrict__ row_ids, int64_t mask_id, uint64_t seed, uint64_t step,
                       int64_t* __restrict__ tokens, double* __restrict__ best_scores, int64_t* __restrict__ counts) {
  constexpr bool kScreened = !std::is_same_v<scalar_t, double>;
  static_assert(kScreened || !kCount, "hybrid_step_kernel: float64 rows take the full race (V exact scores)");
  __shared__ double max_scratch[kWarpsPerRow];
  __shared__ float max_scratch_float[kWarpsPerRow];
  __shared__ long long hi_scratch[kWarpsPerRow];
  __shared__ long long lo_scratch[kWarpsPerRow];
  __shared__ int row_candidates;
  const int64_t i = blockIdx.x;
  if (kCount && threadIdx.x == 0) {
    row_candidates = 0;  // visible to every thread after pass 1's barriers
  }
  const scalar_t* row = log_score + i * stride_row;
  const int64_t current = x[i];
  const uint64_t row_id = static_cast<uint64_t>(row_ids[i]);
  const double minus_inf = no_candidate().score;
  const auto load = [&](int64_t column) { return widen_to_double(row[column * stride_col]); };

  bool bad = false;
  double shift = 0.0;
  FixedSum sum{0, 0};
  if constexpr (kScreened) {
    // Pass 1: the maximum of the read entries and whether one is NaN or +inf, chunk by chunk (chunk q =
    // columns [kColumns q, kColumns q + kColumns), adjacent chunks in adjacent threads).
    constexpr int kColumns = Chunk<scalar_t>::kColumns;
    const int64_t num_chunks = (vocab + kColumns - 1) / kColumns;
    const float plus_inf = __int_as_float(0x7F800000);
    float read_max = __int_as_float(0xFF800000);
    int bad_entry = 0;
    for (int64_t q = threadIdx.x; q < num_chunks; q += kThreadsPerRow) {
      const Chunk<scalar_t> chunk =
          load_read_chunk<scalar_t, kVector>(row, stride_col, vocab, kColumns * q, current, mask_id);
#pragma unroll
      for (int c = 0; c < kColumns; ++c) {
        const float s = chunk.x[c];
        bad_entry |= static_cast<int>(!(s < plus_inf));  // NaN or +inf
        read_max = s > read_max ? s : read_max;
      }
    }
    bad = __syncthreads_or(bad_entry) != 0;
    read_max = block_max_float(read_max, max_scratch_float);
    // A bad row's read entries count as -inf, as in the reference (its values are then never used).
    shift = hybrid_shift(bad ? minus_inf : static_cast<double>(read_max), current != mask_id);
    // Pass 2: the fixed-point sum of the scaled ratios (unread and -inf entries have ratio 0 and add 0).
    if (!bad) {
      for (int64_t q = threadIdx.x; q < num_chunks; q += kThreadsPerRow) {
        const Chunk<scalar_t> chunk =
            load_read_chunk<scalar_t, kVector>(row, stride_col, vocab, kColumns * q, current, mask_id);
#pragma unroll
        for (int c = 0; c < kColumns; ++c) {
          if (chunk.x[c] != __int_as_float(0xFF800000)) {
            fixed_add(sum, hybrid_ratio(static_cast<double>(chunk.x[c]), shift));
          }
        }
      }
    }
  } else {
    // Pass 1: the maximum of the read entries and whether one is NaN or +inf. Adjacent threads read
    // adjacent columns, so the loads coalesce for a unit column stride.
    double read_max = minus_inf;
    int bad_entry = 0;
    for (int64_t column = threadIdx.x; column < vocab; column += kThreadsPerRow) {
      if (column != current && column != mask_id) {
        const double s = load(column);
        if (hybrid_bad_score(s)) {
          bad_entry = 1;
        } else {
          read_max = hybrid_max(read_max, s);
        }
      }
    }
    bad = __syncthreads_or(bad_entry) != 0;
    read_max = block_max(read_max, max_scratch);
    shift = hybrid_shift(bad ? minus_inf : read_max, current != mask_id);
    // Pass 2: the fixed-point sum of the scaled ratios.
    if (!bad) {
      for (int64_t column = threadIdx.x; column < vocab; column += kThreadsPerRow) {
        if (column != current && column != mask_id) {
          fixed_add(sum, hybrid_ratio(load(column), shift));
        }
      }
    }
  }
  sum.hi = block_sum(sum.hi, hi_scratch);
  sum.lo = block_sum(sum.lo, lo_scratch);
  const HybridCoefficients c = load_coefficients(coefficients + 6 * i);
  const HybridRow weights = hybrid_row(shift, sum, c);

  // Pass 3: the race. Every thread holds the same bad, weights and screen constants, so the branch is
  // uniform across the block (the screened race synchronizes it).
  Candidate best;
  bool screen = false;
  int candidates = 0;  // this thread's candidates (kCount)
  if constexpr (kScreened) {
    HybridScreenedRow screened{vocab, current, mask_id, row_id, seed, step, HybridScreenRow{}, false};
    // c1 = 0 leaves no read token any weight (0 times a finite difference).
    screened.no_read_weight = c.c1 == 0.0 && isfinite(weights.c2_total);
    screen = !bad && (screened.no_read_weight ||
                      hybrid_screen_row(shift, weights.c1, weights.c2_total, screened.screen));
    if (screen && !screened.no_read_weight && screened.screen.k_zero) {
      best = hybrid_race_screened<scalar_t, kVector, true, kCount>(row, stride_col, screened, weights, candidates);
    } else if (screen) {
      best = hybrid_race_screened<scalar_t, kVector, false, kCount>(row, stride_col, screened, weights, candidates);
    } else {
      best = hybrid_race_exact(vocab, current, mask_id, row_id, seed, step, weights, bad, load);
    }
  } else {
    best = hybrid_race_exact(vocab, current, mask_id, row_id, seed, step, weights, bad, load);
  }
  if constexpr (kCount) {
    const int warp_candidates = __reduce_add_sync(kFullWarp, candidates);
    if (threadIdx.x % kWarpSize == 0) {
      atomicAdd(&row_candidates, warp_candidates);
    }
  }

  best = block_best(best);  // synchronizes the block (row_candidates is complete after it)
  if (threadIdx.x == 0) {
    const Candidate winner = hybrid_winner(best, bad);
    tokens[i] = winner.column;
    best_scores[i] = winner.score;
    if constexpr (kCount) {
      // The current cell is scored exactly on every screened row (counted whether or not it has a weight).
      counts[i] = screen ? 1 + static_cast<int64_t>(row_candidates) : vocab;
    }
  }
}

// Launches the step of every row; with `counts` (else null) the kernel also writes the exact scores of each
// row (float64 rows: the caller fills V, their full race).
template <typename scalar_t>
void launch(const at::Tensor& log_score, const int64_t* x, const double* coefficients, const int64_t* row_ids,
            int64_t mask_id, uint64_t seed, uint64_t step, int64_t* tokens, double* best, int64_t* counts,
            cudaStream_t stream) {
  // One 16-byte load per chunk needs a unit column stride and 16-byte-aligned rows.
  const bool vector = !std::is_same_v<scalar_t, double> && log_score.stride(1) == 1 &&
                      reinterpret_cast<uintptr_t>(log_score.const_data_ptr()) % 16 == 0 &&
                      (log_score.size(0) == 1 || (log_score.stride(0) * log_score.element_size()) % 16 == 0);
  constexpr bool kScreened = !std::is_same_v<scalar_t, double>;
  // float64 rows are never read by 16-byte chunks nor counted: one instantiation.
  const auto kernel = counts != nullptr && kScreened
                          ? (vector ? hybrid_step_kernel<scalar_t, kScreened, kScreened>
                                    : hybrid_step_kernel<scalar_t, false, kScreened>)
                          : (vector ? hybrid_step_kernel<scalar_t, kScreened, false>
                                    : hybrid_step_kernel<scalar_t, false, false>);
  kernel<<<static_cast<unsigned int>(log_score.size(0)), kThreadsPerRow, 0, stream>>>(
      log_score.const_data_ptr<scalar_t>(), log_score.stride(0), log_score.stride(1), log_score.size(1), x,
      coefficients, row_ids, mask_id, seed, step, tokens, best, kScreened ? counts : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> hybrid_step_counted_cuda(const at::Tensor& log_score,
                                                                     const at::Tensor& x,
                                                                     const at::Tensor& coefficients,
                                                                     const at::Tensor& row_ids, int64_t mask_id,
                                                                     uint64_t seed, int64_t step, bool count) {
  check_hybrid_args(log_score, x, coefficients, row_ids, mask_id, step, c10::DeviceType::CUDA);
  const int64_t num_rows = log_score.size(0);
  TORCH_CHECK(num_rows < (int64_t{1} << 31), "hybrid_step: at most 2^31 - 1 rows per call (one CUDA block each), ",
              "got ", num_rows);
  const c10::cuda::CUDAGuard device_guard(log_score.device());
  at::Tensor tokens = at::empty({num_rows}, log_score.options().dtype(at::kLong));
  at::Tensor best = at::empty({num_rows}, log_score.options().dtype(at::kDouble));
  // float64 rows take the full race (V exact scores each); the other kernels write their rows' counts.
  const bool full_race = log_score.scalar_type() == at::kDouble;
  at::Tensor counts = !count ? at::empty({0}, log_score.options().dtype(at::kLong))
                      : full_race ? at::full({num_rows}, log_score.size(1), log_score.options().dtype(at::kLong))
                                  : at::empty({num_rows}, log_score.options().dtype(at::kLong));
  if (num_rows == 0) {
    return {tokens, best, counts};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(log_score.device().index());
  // Small per-row inputs made contiguous (copies on the current stream when they are not); the
  // log-scores are read through their strides.
  const at::Tensor x_contiguous = x.contiguous();
  const at::Tensor coefficients_contiguous = coefficients.contiguous();
  const at::Tensor row_ids_contiguous = row_ids.contiguous();
  const int64_t* x_data = x_contiguous.const_data_ptr<int64_t>();
  const double* coefficient_data = coefficients_contiguous.const_data_ptr<double>();
  const int64_t* row_id_data = row_ids_contiguous.const_data_ptr<int64_t>();
  const uint64_t step_bits = static_cast<uint64_t>(step);
  int64_t* token_data = tokens.mutable_data_ptr<int64_t>();
  double* best_data = best.mutable_data_ptr<double>();
  int64_t* count_data = count && !full_race ? counts.mutable_data_ptr<int64_t>() : nullptr;
  switch (log_score.scalar_type()) {
    case at::kFloat:
      launch<float>(log_score, x_data, coefficient_data, row_id_data, mask_id, seed, step_bits, token_data, best_data,
                    count_data, stream);
      break;
    case at::kDouble:
      launch<double>(log_score, x_data, coefficient_data, row_id_data, mask_id, seed, step_bits, token_data, best_data,
                     nullptr, stream);
      break;
    case at::kHalf:
      launch<c10::Half>(log_score, x_data, coefficient_data, row_id_data, mask_id, seed, step_bits, token_data,
                        best_data, count_data, stream);
      break;
    case at::kBFloat16:
      launch<c10::BFloat16>(log_score, x_data, coefficient_data, row_id_data, mask_id, seed, step_bits, token_data,
                            best_data, count_data, stream);
      break;
    default:
      TORCH_CHECK(false, "hybrid_step: unsupported log_score dtype ", log_score.scalar_type());  // checked above
  }
  return {tokens, best, counts};
}

std::tuple<at::Tensor, at::Tensor> hybrid_step_cuda(const at::Tensor& log_score, const at::Tensor& x,
                                                    const at::Tensor& coefficients, const at::Tensor& row_ids,
                                                    int64_t mask_id, uint64_t seed, int64_t step) {
  auto [tokens, best, counts] = hybrid_step_counted_cuda(log_score, x, coefficients, row_ids, mask_id, seed, step,
                                                         false);
  return {tokens, best};
}

}  // namespace hdlm
