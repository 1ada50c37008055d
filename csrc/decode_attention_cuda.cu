// CUDA decode attention (docs/attention.md): the rows computed at one sampler step (re-encoded settled
// rows plus the active window) attend the KV cache under the two-interval mask.
//
// Decode is bound by reading K and V, so both kernels here are organized around the key tiles of 32 keys:
// a block visits only the tiles of [0, max prefix_end) ∪ [min window_start, max window_end) of its rows,
// skips per row group the tiles none of its rows intersects, and lets the element mask decide the rest;
// when the blocks cannot fill the GPU the block's tile list is split over blocks (flash-decoding), each
// split writing its normalized partial rows, score max and softmax sum in float32 for a small combine
// kernel.
//
//   - float16/bfloat16 (namespace tensor_core, below): tensor cores (mma.sync m16n8k16, float32
//     accumulation; sm_80 and later), one block per (block of up to 256 rows at D = 64 / 128 at
//     D = 128, split, head, sequence), so a step's K/V tiles are read once for all its rows;
//   - float32 (decode_attention_kernel): CUDA cores, one block per 16-row group; tiles stream global ->
//     registers -> shared memory (converted to float32 there) with the next tile's loads issued early;
//     each warp owns 4 rows, lanes run over keys for the scores and over head dims for P·V.
//
// Only c10/ATen core headers here: neither <torch/extension.h> (pybind11 and the autograd API would
// dominate nvcc's compile time) nor <ATen/cuda/CUDAContext.h> (it needs the cuBLAS/cuSPARSE headers,
// absent from a bare toolkit).
#include "decode_attention.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace hdlm {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 4;
constexpr int kRowsPerGroup = kWarps * kRowsPerWarp;
// One key per lane when scoring, so a tile is exactly one warp's worth of keys.
constexpr int kTileKeys = 32;
// Split-KV heuristic (choose_num_splits): a split gets at least kMinTilesPerSplit key tiles, and there
// are at most kMaxSplits splits.
constexpr int kMinTilesPerSplit = 4;
constexpr int kMaxSplits = 64;
constexpr float kLog2e = 1.4426950408889634f;

// The float32 kernel's blocks per SM that the register allocation must allow (__launch_bounds__).
// Unbounded, nvcc takes about 166 registers at D = 128 (2 blocks of 4 warps per SM), too few loads in
// flight for a kernel bound by memory. 3 (D = 128) and 4 (D = 64) blocks cost a few dozen bytes of spills
// (L1-resident); shared memory (44 KB / 24 KB per block) allows them on sm_80+.
constexpr int min_blocks_per_sm(int head_dim) { return head_dim == 64 ? 4 : 3; }

// The key tiles a split of a block visits (both kernels): the union of the block's rows' intervals is
// covered by [0, prefix) and [window_lo, window_hi); their tiles are numbered 0 .. total - 1 ("ordinals"),
// prefix first, and split s of n takes the balanced contiguous share [begin, end) (empty when the splits
// outnumber the tiles).
struct SplitTiles {
  int prefix_tiles;
  int window_first_tile;
  int begin;
  int end;
  // The first key of the tile with this ordinal.
  __device__ __forceinline__ int key0(int ordinal) const {
    return (ordinal < prefix_tiles ? ordinal : window_first_tile + ordinal - prefix_tiles) * kTileKeys;
  }
};

__device__ __forceinline__ SplitTiles split_tiles(int prefix, int window_lo, int window_hi, int split,
                                                  int num_splits) {
  SplitTiles tiles;
  tiles.prefix_tiles = (prefix + kTileKeys - 1) / kTileKeys;
  tiles.window_first_tile = max(window_lo / kTileKeys, tiles.prefix_tiles);  // tiles below are counted already
  const int window_tiles = max(0, (window_hi + kTileKeys - 1) / kTileKeys - tiles.window_first_tile);
  const int total = tiles.prefix_tiles + window_tiles;
  tiles.begin = static_cast<int>(static_cast<int64_t>(total) * split / num_splits);
  tiles.end = static_cast<int>(static_cast<int64_t>(total) * (split + 1) / num_splits);
  return tiles;
}

__device__ __forceinline__ float to_float(float x) { return x; }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

// How a K or V tile of kTileKeys keys x D dims maps onto the block's threads: the tile is cut into
// 16-byte chunks (kVec elements), consecutive threads take consecutive chunks of a key row (coalesced),
// and each thread holds kChunksPerThread chunks in registers between the global load and the store
// to shared memory.
template <typename T, int D>
struct TileLayout {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  static constexpr int kChunksPerKey = D / kVec;
  static constexpr int kChunksPerThread = kTileKeys * kChunksPerKey / kThreads;
  static_assert(kTileKeys * kChunksPerKey % kThreads == 0, "a tile must split evenly over the threads");
  // Shared-memory row stride in floats. The padding of 4 floats puts the 8 keys that one quarter-warp
  // reads with a float4 load (lanes over keys) in 8 different 4-bank groups: no bank conflicts.
  static constexpr int kRowStride = D + 4;
};

// Global -> registers for the tile starting at key0; keys at or past `keys` read as zeros. Aligned
// views (see is_16_byte_aligned) load 16 bytes at once, others element by element.
template <typename T, int D>
__device__ __forceinline__ void load_tile(uint4 (&chunks)[TileLayout<T, D>::kChunksPerThread],
                                          const T* __restrict__ base, int64_t key_stride, int key0, int keys,
                                          bool vectorized) {
  using Layout = TileLayout<T, D>;
#pragma unroll
  for (int i = 0; i < Layout::kChunksPerThread; ++i) {
    const int chunk = threadIdx.x + i * kThreads;
    const int key = key0 + chunk / Layout::kChunksPerKey;
    const int dim = (chunk % Layout::kChunksPerKey) * Layout::kVec;
    if (key >= keys) {
      chunks[i] = make_uint4(0u, 0u, 0u, 0u);
      continue;
    }
    const T* src = base + static_cast<int64_t>(key) * key_stride + dim;
    if (vectorized) {
      chunks[i] = __ldg(reinterpret_cast<const uint4*>(src));
    } else {
      alignas(16) T elements[Layout::kVec];
#pragma unroll
      for (int e = 0; e < Layout::kVec; ++e) {
        elements[e] = src[e];
      }
      chunks[i] = *reinterpret_cast<const uint4*>(elements);
    }
  }
}

// Registers -> shared memory, converted to float32 once here rather than at every use.
template <typename T, int D>
__device__ __forceinline__ void store_tile(const uint4 (&chunks)[TileLayout<T, D>::kChunksPerThread],
                                           float* __restrict__ tile) {
  using Layout = TileLayout<T, D>;
#pragma unroll
  for (int i = 0; i < Layout::kChunksPerThread; ++i) {
    const int chunk = threadIdx.x + i * kThreads;
    const int key = chunk / Layout::kChunksPerKey;
    const int dim = (chunk % Layout::kChunksPerKey) * Layout::kVec;
    alignas(16) T elements[Layout::kVec];
    *reinterpret_cast<uint4*>(elements) = chunks[i];
    float* dst = tile + key * Layout::kRowStride + dim;
#pragma unroll
    for (int e = 0; e < Layout::kVec; e += 4) {
      *reinterpret_cast<float4*>(dst + e) = make_float4(to_float(elements[e]), to_float(elements[e + 1]),
                                                        to_float(elements[e + 2]), to_float(elements[e + 3]));
    }
  }
}

__device__ __forceinline__ bool key_allowed(int key, int prefix_end, int window_start, int window_end) {
  return key < prefix_end || (window_start <= key && key < window_end);
}

// Whether any key of [key0, key0 + kTileKeys) is allowed for the row.
__device__ __forceinline__ bool tile_intersects(int key0, int prefix_end, int window_start, int window_end) {
  return key0 < prefix_end ||
         (window_start < window_end && window_start < key0 + kTileKeys && key0 < window_end);
}

template <typename T>
struct DecodeParams {
  const T* q;
  const T* k;
  const T* v;
  const int32_t* prefix_end;
  const int32_t* window_start;
  const int32_t* window_end;
  T* out;               // [B, S, H, D] contiguous; written directly when num_splits == 1
  // When num_splits > 1, per split: the normalized output [num_splits, B, S, H, D], and the max of the
  // (sign-adjusted, unscaled) scores (-inf when empty) and the softmax sum [num_splits, B, S, H]. They
  // are kept apart rather than folded into one log-sum-exp: lse = max·c + log2(sum) would round to
  // the spacing of floats near it (6e-5 at 600), a relative error of the split weights that large
  // scores would turn into a visible float32 error.
  float* partial_out;
  float* partial_max;
  float* partial_sum;
  int64_t q_stride_b, q_stride_s, q_stride_h;
  int64_t k_stride_b, k_stride_l, k_stride_h;
  int64_t v_stride_b, v_stride_l, v_stride_h;
  int64_t mask_stride_b;  // S for per-sequence masks, 0 for one mask shared by the batch
  int batch, rows, heads, keys;
  int num_splits;
  float score_sign;  // sign of scale (+1 or -1), applied to q exactly so that exp_scale >= 0
  float exp_scale;   // |scale| * log2(e): exp2f(score * exp_scale) = exp(score * |scale|)
  bool k_vectorized, v_vectorized;
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, min_blocks_per_sm(D)) decode_attention_kernel(const DecodeParams<T> p) {
  using Layout = TileLayout<T, D>;
  constexpr int kDimsPerLane = D / 32;  // P·V: lane `lane` owns dims [lane * kDimsPerLane, +kDimsPerLane)
  static_assert(kDimsPerLane == 2 || kDimsPerLane == 4, "D must be 64 or 128");

  __shared__ __align__(16) float k_tile[kTileKeys * Layout::kRowStride];
  __shared__ __align__(16) float v_tile[kTileKeys * Layout::kRowStride];
  __shared__ __align__(16) float q_rows[kRowsPerGroup * D];
  __shared__ __align__(16) float probs[kWarps][kRowsPerWarp][kTileKeys];
  __shared__ int row_prefix_end[kRowsPerGroup];
  __shared__ int row_window_start[kRowsPerGroup];
  __shared__ int row_window_end[kRowsPerGroup];

  const int split = blockIdx.x % p.num_splits;
  const int group = blockIdx.x / p.num_splits;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int first_row = group * kRowsPerGroup;

  // The group's mask rows and queries. Rows past S get empty intervals and zero queries, so they
  // take part in nothing; values are clamped to [0, L] so that a bad mask cannot read out of bounds.
  if (threadIdx.x < kRowsPerGroup) {
    const int row = first_row + threadIdx.x;
    int prefix_end = 0, window_start = 0, window_end = 0;
    if (row < p.rows) {
      const int64_t at = b * p.mask_stride_b + row;
      prefix_end = min(max(p.prefix_end[at], 0), p.keys);
      window_start = min(max(p.window_start[at], 0), p.keys);
      window_end = min(max(p.window_end[at], 0), p.keys);
    }
    row_prefix_end[threadIdx.x] = prefix_end;
    row_window_start[threadIdx.x] = window_start;
    row_window_end[threadIdx.x] = window_end;
  }
  for (int index = threadIdx.x; index < kRowsPerGroup * D; index += kThreads) {
    const int row = first_row + index / D;
    const int dim = index % D;
    q_rows[index] = row < p.rows ? p.score_sign * to_float(p.q[b * p.q_stride_b + row * p.q_stride_s +
                                                                h * p.q_stride_h + dim])
                                 : 0.0f;
  }
  __syncthreads();

  // The union of the group's intervals is covered by [0, prefix) and [window_lo, window_hi) (split_tiles).
  int prefix = 0, window_lo = p.keys, window_hi = 0;
#pragma unroll
  for (int g = 0; g < kRowsPerGroup; ++g) {
    prefix = max(prefix, row_prefix_end[g]);
    if (row_window_start[g] < row_window_end[g]) {
      window_lo = min(window_lo, row_window_start[g]);
      window_hi = max(window_hi, row_window_end[g]);
    }
  }
  const SplitTiles tiles = split_tiles(prefix, window_lo, window_hi, split, p.num_splits);
  const int ordinal_begin = tiles.begin;
  const int ordinal_end = tiles.end;

  // This warp's rows: slot r is group row r * kWarps + warp, so that small S spreads over the warps.
  // Their intervals are re-read from shared memory where needed (broadcasts) rather than held in
  // 12 registers, which the register budget of __launch_bounds__ cannot spare.
  float row_max[kRowsPerWarp];     // running max of the row's (unscaled) scores, -inf before any key
  float lane_sum[kRowsPerWarp];    // this lane's share of the softmax denominator, relative to row_max
  float acc[kRowsPerWarp][kDimsPerLane];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    row_max[r] = -INFINITY;
    lane_sum[r] = 0.0f;
#pragma unroll
    for (int e = 0; e < kDimsPerLane; ++e) {
      acc[r][e] = 0.0f;
    }
  }

  const T* k_base = p.k + b * p.k_stride_b + h * p.k_stride_h;
  const T* v_base = p.v + b * p.v_stride_b + h * p.v_stride_h;
  uint4 k_chunks[Layout::kChunksPerThread];
  uint4 v_chunks[Layout::kChunksPerThread];
  if (ordinal_begin < ordinal_end) {
    load_tile<T, D>(k_chunks, k_base, p.k_stride_l, tiles.key0(ordinal_begin), p.keys, p.k_vectorized);
    load_tile<T, D>(v_chunks, v_base, p.v_stride_l, tiles.key0(ordinal_begin), p.keys, p.v_vectorized);
  }
  for (int ordinal = ordinal_begin; ordinal < ordinal_end; ++ordinal) {
    const int key0 = tiles.key0(ordinal);
    store_tile<T, D>(k_chunks, k_tile);
    store_tile<T, D>(v_chunks, v_tile);
    __syncthreads();
    if (ordinal + 1 < ordinal_end) {
      // Issued now, consumed at the next iteration: the loads fly while this tile is computed.
      const int next_key0 = tiles.key0(ordinal + 1);
      load_tile<T, D>(k_chunks, k_base, p.k_stride_l, next_key0, p.keys, p.k_vectorized);
      load_tile<T, D>(v_chunks, v_base, p.v_stride_l, next_key0, p.keys, p.v_vectorized);
    }

    bool warp_active = false;  // warp-uniform: the rows are the warp's, not the lane's
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int g = r * kWarps + warp;
      warp_active |= tile_intersects(key0, row_prefix_end[g], row_window_start[g], row_window_end[g]);
    }
    if (warp_active) {
      // Scores: lane `lane` takes key key0 + lane; every row reuses each K element loaded.
      float score[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        score[r] = 0.0f;
      }
      const float* k_row = k_tile + lane * Layout::kRowStride;
#pragma unroll 8
      for (int d = 0; d < D; d += 4) {
        const float4 kv = *reinterpret_cast<const float4*>(k_row + d);
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          const float4 qv = *reinterpret_cast<const float4*>(q_rows + (r * kWarps + warp) * D + d);  // broadcast
          score[r] = fmaf(qv.x, kv.x, score[r]);
          score[r] = fmaf(qv.y, kv.y, score[r]);
          score[r] = fmaf(qv.z, kv.z, score[r]);
          score[r] = fmaf(qv.w, kv.w, score[r]);
        }
      }
      // Mask and online softmax. The max is taken on the unscaled scores and the scale applied to the
      // difference, exp2f((score - max) · exp_scale): scaling first would round scores of several
      // hundred to the float spacing there (3e-5 to 6e-5), an error the exponent would carry into every
      // probability; the difference is exact near the max, and the top key weighs exactly 1. Masked
      // keys and rows that have seen no key yet (row_max = -inf) get 0 explicitly: exp2f of
      // (-inf - -inf) or (-inf · 0) would be NaN.
      const int key = key0 + lane;
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int g = r * kWarps + warp;
        const bool allowed =
            key < p.keys && key_allowed(key, row_prefix_end[g], row_window_start[g], row_window_end[g]);
        const float new_max = fmaxf(row_max[r], warp_max(allowed ? score[r] : -INFINITY));
        const float prob = allowed ? exp2f((score[r] - new_max) * p.exp_scale) : 0.0f;
        const float rescale = row_max[r] == -INFINITY ? 0.0f : exp2f((row_max[r] - new_max) * p.exp_scale);
        lane_sum[r] = fmaf(lane_sum[r], rescale, prob);
#pragma unroll
        for (int e = 0; e < kDimsPerLane; ++e) {
          acc[r][e] *= rescale;
        }
        row_max[r] = new_max;
        probs[warp][r][lane] = prob;
      }
      __syncwarp();
      // P·V: lanes over head dims; the probabilities come back from shared memory as broadcasts.
      const float* v_col = v_tile + lane * kDimsPerLane;
#pragma unroll 2
      for (int j = 0; j < kTileKeys; j += 4) {
        float4 pr[kRowsPerWarp];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
          pr[r] = *reinterpret_cast<const float4*>(&probs[warp][r][j]);
        }
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          float vv[kDimsPerLane];
          const float* v_src = v_col + (j + jj) * Layout::kRowStride;
          if constexpr (kDimsPerLane == 4) {
            const float4 x = *reinterpret_cast<const float4*>(v_src);
            vv[0] = x.x; vv[1] = x.y; vv[2] = x.z; vv[3] = x.w;
          } else {
            const float2 x = *reinterpret_cast<const float2*>(v_src);
            vv[0] = x.x; vv[1] = x.y;
          }
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
            const float pj = jj == 0 ? pr[r].x : jj == 1 ? pr[r].y : jj == 2 ? pr[r].z : pr[r].w;
#pragma unroll
            for (int e = 0; e < kDimsPerLane; ++e) {
              acc[r][e] = fmaf(pj, vv[e], acc[r][e]);
            }
          }
        }
      }
      __syncwarp();
    }
    __syncthreads();  // the tiles are overwritten at the next iteration
  }

  // Normalize and write. A row without keys has sum 0 and writes zeros (and max -inf).
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = first_row + r * kWarps + warp;
    if (row >= p.rows) {
      continue;  // warp-uniform, so the shuffles below stay full-warp
    }
    const float sum = warp_sum(lane_sum[r]);
    const float inverse = sum > 0.0f ? 1.0f / sum : 0.0f;
    const int64_t out_row = (static_cast<int64_t>(b) * p.rows + row) * p.heads + h;
    if (p.num_splits == 1) {
      T* dst = p.out + out_row * D + lane * kDimsPerLane;
#pragma unroll
      for (int e = 0; e < kDimsPerLane; ++e) {
        dst[e] = from_float<T>(acc[r][e] * inverse);
      }
    } else {
      const int64_t split_row = static_cast<int64_t>(split) * p.batch * p.rows * p.heads + out_row;
      float* dst = p.partial_out + split_row * D + lane * kDimsPerLane;
#pragma unroll
      for (int e = 0; e < kDimsPerLane; ++e) {
        dst[e] = acc[r][e] * inverse;
      }
      if (lane == 0) {
        p.partial_max[split_row] = row_max[r];
        p.partial_sum[split_row] = sum;
      }
    }
  }
}

// ======================================================================================================
// The tensor-core kernel (float16 and bfloat16): one block per (block of query rows, key-range split,
// head, sequence), where a block of rows is the whole step whenever S <= rows_per_block(D) (256 rows at
// D = 64, 128 at D = 128), so each K/V tile of the split is read from global memory once for all of the
// step's rows. tests/decode_cuda_emulation.py follows this code loop for loop (same constants, same
// ordinals, same skip rule, same online softmax and merge); keep the two in step.
//
//   - 8 warps; warp w owns the 16-row groups w, w + 8, ... of the block (groups_per_warp(D) of them),
//     each group the M = 16 rows of one mma.sync.aligned.m16n8k16 (float32 accumulation);
//   - K/V tiles of 32 keys x D stay in their 16-bit type in shared memory (rows padded by 16 bytes, so
//     the fragment loads below hit 32 distinct banks), filled by cp.async 16-byte copies in a ring of
//     stages(D) buffers: the copies of the next tiles fly while the current one is multiplied;
//   - for each tile and each group: S = Q·Kᵀ (Q's A fragments held in registers for the whole block,
//     K's B fragments read as 32-bit words), the interval mask and the online softmax on the
//     accumulator fragments, then O += P·V with P's A fragments taken straight from S's accumulators
//     (rounded to the input type) and V's B fragments from ldmatrix.trans;
//   - the block's tile list and the split into contiguous ordinal ranges are the float32 kernel's,
//     computed over the block's rows; a group skips a tile none of its rows intersects.
// ======================================================================================================
namespace tensor_core {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kGroupRows = 16;                   // M of m16n8k16
constexpr int kTileKeys = hdlm::kTileKeys;       // 32: the skip rule's granularity, as in the float32 kernel
constexpr int kKeyTiles = kTileKeys / 8;         // score fragments (N = 8 keys each) per tile
constexpr int kKeySteps = kTileKeys / 16;        // P·V k-steps (K = 16 keys each) per tile
// Register budget: a group holds D/8 x 4 accumulators and D/16 x 4 words of Q; two groups per warp at
// D = 64 and one at D = 128 take 196 and 172 registers without spills (ptxas, sm_90): one block per SM.
// A block of rows is then 256 rows at D = 64 and 128 at D = 128.
constexpr int groups_per_warp(int head_dim) { return head_dim == 64 ? 2 : 1; }
constexpr int rows_per_block(int head_dim) { return kWarps * groups_per_warp(head_dim) * kGroupRows; }
// Pipeline depth. The registers allow one block (8 warps) per SM, so the block alone must keep enough
// bytes in flight to cover the memory latency: stages - 1 tiles of K and V, 5 x 9 KB at D = 64 and
// 3 x 17 KB at D = 128, in dynamic shared memory (54 KB and 68 KB, over the 48 KB static limit).
constexpr int stages(int head_dim) { return head_dim == 64 ? 6 : 4; }

template <int D>
struct TileLayout {
  static constexpr int kStride = D + 8;  // 16-bit elements per key row: 16 bytes of padding (see above)
  static constexpr int kChunksPerKey = D / 8;  // 16-byte chunks of 8 elements
  static constexpr int kChunksPerThread = kTileKeys * kChunksPerKey / kThreads;
  static constexpr int kElements = kTileKeys * kStride;
  static_assert(kTileKeys * kChunksPerKey % kThreads == 0, "a tile must split evenly over the threads");
};

// Dynamic shared memory of the kernel: the K ring, then the V ring, each stages(D) tiles.
constexpr int dynamic_smem_bytes(int head_dim) {
  return 2 * stages(head_dim) * kTileKeys * (head_dim + 8) * static_cast<int>(sizeof(uint16_t));
}

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// 16 bytes global -> shared without passing through registers; src_size 0 writes zeros (keys past L).
__device__ __forceinline__ void copy_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void copy_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Four 8x8 matrices of 16-bit elements, transposed: lanes 8i..8i+7 give the row addresses of matrix i,
// and lane l receives, from each, the elements (rows 2(l%4), 2(l%4)+1; column l/4): a B fragment.
__device__ __forceinline__ void load_matrix_x4_transposed(uint32_t (&fragment)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(fragment[0]), "=r"(fragment[1]), "=r"(fragment[2]), "=r"(fragment[3])
               : "r"(shared_address(row)));
}

// c += a·b for a 16x16 A (row-major fragment), a 16x8 B (column fragment) and float32 c.
template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats rounded to T and packed, the first in the low half (the lower column of a fragment).
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float low, float high) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
    return *reinterpret_cast<const uint32_t*>(&pair);
  } else {
    const __half2 pair = __floats2half2_rn(low, high);
    return *reinterpret_cast<const uint32_t*>(&pair);
  }
}

// Keys [key0, key0 + 32) of one head's K or V into a shared tile: cp.async when every key row is 16-byte
// aligned (is_16_byte_aligned), element by element otherwise (then the ring's wait is a no-op for it and
// the __syncthreads before the tile's use publishes it). Keys at or past `keys` are zeros, so that a
// masked key's value is 0, never a stale NaN multiplied by a zero probability.
template <typename T, int D>
__device__ __forceinline__ void load_tile(uint16_t* __restrict__ tile, const T* __restrict__ base,
                                          int64_t key_stride, int key0, int keys, bool vectorized) {
  using Layout = TileLayout<D>;
#pragma unroll
  for (int i = 0; i < Layout::kChunksPerThread; ++i) {
    const int chunk = threadIdx.x + i * kThreads;
    const int key = chunk / Layout::kChunksPerKey;
    const int dim = (chunk % Layout::kChunksPerKey) * 8;
    const bool valid = key0 + key < keys;
    const uint16_t* src =
        reinterpret_cast<const uint16_t*>(base) + (valid ? static_cast<int64_t>(key0 + key) * key_stride + dim : 0);
    uint16_t* dst = tile + key * Layout::kStride + dim;
    if (vectorized) {
      copy_async_16(dst, src, valid);
    } else {
      alignas(16) uint16_t elements[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        elements[e] = valid ? src[e] : uint16_t{0};
      }
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(elements);
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_attention_kernel(const DecodeParams<T> p) {
  static_assert(sizeof(T) == 2, "the tensor-core kernel takes 16-bit inputs");
  using Layout = TileLayout<D>;
  constexpr int kGroups = groups_per_warp(D);
  constexpr int kBlockRows = rows_per_block(D);
  constexpr int kStages = stages(D);
  constexpr int kDimTiles = D / 8;   // output fragments (N = 8 dims each)
  constexpr int kDimSteps = D / 16;  // Q·Kᵀ k-steps (K = 16 dims each)

  extern __shared__ __align__(16) uint16_t kv_rings[];  // dynamic_smem_bytes(D)
  uint16_t* k_ring = kv_rings;
  uint16_t* v_ring = kv_rings + kStages * Layout::kElements;
  __shared__ int row_prefix_end[kBlockRows];
  __shared__ int row_window_start[kBlockRows];
  __shared__ int row_window_end[kBlockRows];
  __shared__ int block_prefix, block_window_lo, block_window_hi;

  const int split = blockIdx.x % p.num_splits;
  const int row_block = blockIdx.x / p.num_splits;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int quad_row = lane / 4;   // "groupID" of the fragment layouts: rows quad_row and quad_row + 8
  const int quad_lane = lane % 4;  // columns 2·quad_lane, 2·quad_lane + 1 (+ 8)
  const int first_row = row_block * kBlockRows;

  // The block's mask rows (clamped to [0, L]; rows past S empty) and the union of their intervals.
  if (threadIdx.x == 0) {
    block_prefix = 0;
    block_window_lo = p.keys;
    block_window_hi = 0;
  }
  __syncthreads();
  for (int r = threadIdx.x; r < kBlockRows; r += kThreads) {
    const int row = first_row + r;
    int prefix_end = 0, window_start = 0, window_end = 0;
    if (row < p.rows) {
      const int64_t at = b * p.mask_stride_b + row;
      prefix_end = min(max(p.prefix_end[at], 0), p.keys);
      window_start = min(max(p.window_start[at], 0), p.keys);
      window_end = min(max(p.window_end[at], 0), p.keys);
    }
    row_prefix_end[r] = prefix_end;
    row_window_start[r] = window_start;
    row_window_end[r] = window_end;
    if (prefix_end > 0) {
      atomicMax(&block_prefix, prefix_end);
    }
    if (window_start < window_end) {
      atomicMin(&block_window_lo, window_start);
      atomicMax(&block_window_hi, window_end);
    }
  }
  __syncthreads();

  // Tile ordinals exactly as in the float32 kernel: [0, prefix) then [window_lo, window_hi) in tiles.
  const SplitTiles tiles = split_tiles(block_prefix, block_window_lo, block_window_hi, split, p.num_splits);
  const int ordinal_begin = tiles.begin;
  const int ordinal_end = tiles.end;

  // Per group: whether it has rows (warp-uniform), its Q as A fragments (sign of scale applied: negating
  // a 16-bit float flips its sign bit, exactly), this thread's two rows' intervals, and the online
  // softmax state of those rows ([0]: row quad_row, [1]: row quad_row + 8).
  bool group_live[kGroups];
  uint32_t q_fragments[kGroups][kDimSteps][4];
  int prefix_end[kGroups][2], window_start[kGroups][2], window_end[kGroups][2];
  float row_max[kGroups][2], lane_sum[kGroups][2];
  float acc[kGroups][kDimTiles][4];
  const uint32_t sign_bits = p.score_sign < 0.0f ? 0x80008000u : 0u;
#pragma unroll
  for (int gi = 0; gi < kGroups; ++gi) {
    const int group_row0 = (gi * kWarps + warp) * kGroupRows;  // within the block
    group_live[gi] = first_row + group_row0 < p.rows;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = group_row0 + quad_row + 8 * half;
      prefix_end[gi][half] = row_prefix_end[r];
      window_start[gi][half] = row_window_start[r];
      window_end[gi][half] = row_window_end[r];
      row_max[gi][half] = -INFINITY;
      lane_sum[gi][half] = 0.0f;
    }
#pragma unroll
    for (int nt = 0; nt < kDimTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        acc[gi][nt][e] = 0.0f;
      }
    }
#pragma unroll
    for (int ks = 0; ks < kDimSteps; ++ks) {
#pragma unroll
      for (int part = 0; part < 4; ++part) {
        // a0: (row, dims 2q, 2q+1), a1: (row + 8, same), a2: (row, dims 2q+8, 2q+9), a3: (row + 8, same).
        const int row = first_row + group_row0 + quad_row + 8 * (part % 2);
        const int dim = ks * 16 + 8 * (part / 2) + 2 * quad_lane;
        uint32_t word = 0;
        if (row < p.rows) {
          const uint16_t* src = reinterpret_cast<const uint16_t*>(p.q + b * p.q_stride_b + row * p.q_stride_s +
                                                                  h * p.q_stride_h) + dim;
          word = (static_cast<uint32_t>(src[0]) | (static_cast<uint32_t>(src[1]) << 16)) ^ sign_bits;
        }
        q_fragments[gi][ks][part] = word;
      }
    }
  }

  const T* k_base = p.k + b * p.k_stride_b + h * p.k_stride_h;
  const T* v_base = p.v + b * p.v_stride_b + h * p.v_stride_h;
  const int count = ordinal_end - ordinal_begin;
  // Tile i of this block's range goes to ring slot i % kStages; one commit group per tile (empty past
  // the range) keeps the wait's count uniform.
  auto issue = [&](int i) {
    if (i < count) {
      const int key0 = tiles.key0(ordinal_begin + i);
      load_tile<T, D>(k_ring + (i % kStages) * Layout::kElements, k_base, p.k_stride_l, key0, p.keys,
                      p.k_vectorized);
      load_tile<T, D>(v_ring + (i % kStages) * Layout::kElements, v_base, p.v_stride_l, key0, p.keys,
                      p.v_vectorized);
    }
    copy_async_commit();
  };
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    issue(i);
  }
  for (int i = 0; i < count; ++i) {
    // Refill the slot read at iteration i - 1 (released by that iteration's closing barrier), then wait
    // for tile i: of the i + kStages groups committed, all but the newest kStages - 1 are complete.
    issue(i + kStages - 1);
    copy_async_wait<kStages - 1>();
    __syncthreads();
    const int key0 = tiles.key0(ordinal_begin + i);
    const uint16_t* k_tile = k_ring + (i % kStages) * Layout::kElements;
    const uint16_t* v_tile = v_ring + (i % kStages) * Layout::kElements;
#pragma unroll
    for (int gi = 0; gi < kGroups; ++gi) {
      bool mine = false;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        mine |= tile_intersects(key0, prefix_end[gi][half], window_start[gi][half], window_end[gi][half]);
      }
      // Warp-uniform: the group is the warp's; its 16 rows are spread over the lanes' quads.
      if (!group_live[gi] || !__any_sync(0xffffffffu, mine)) {
        continue;
      }
      // S = Q·Kᵀ: fragment kt covers keys key0 + 8kt .. + 7; its B fragment is K[key 8kt + quad_row]
      // at dims (2q, 2q+1) and (2q+8, 2q+9) of each 16-dim step: two 32-bit words of one padded row.
      float scores[kKeyTiles][4];
#pragma unroll
      for (int kt = 0; kt < kKeyTiles; ++kt) {
        scores[kt][0] = scores[kt][1] = scores[kt][2] = scores[kt][3] = 0.0f;
        const uint16_t* k_row = k_tile + (kt * 8 + quad_row) * Layout::kStride + 2 * quad_lane;
#pragma unroll
        for (int ks = 0; ks < kDimSteps; ++ks) {
          const uint32_t b0 = *reinterpret_cast<const uint32_t*>(k_row + ks * 16);
          const uint32_t b1 = *reinterpret_cast<const uint32_t*>(k_row + ks * 16 + 8);
          mma_16x8x16<T>(scores[kt], q_fragments[gi][ks], b0, b1);
        }
      }
      // Mask and online softmax per row (see the float32 kernel for why the max is taken on the
      // unscaled scores and masked keys get an explicit 0). Accumulator element (kt, 2·half + e) is
      // row quad_row + 8·half, key key0 + 8kt + 2·quad_lane + e; a row's 32 keys live on one quad of
      // lanes, so its max and sum reduce over lanes xor 1 and xor 2.
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        bool allowed[kKeyTiles][2];
        float tile_max = -INFINITY;
#pragma unroll
        for (int kt = 0; kt < kKeyTiles; ++kt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int key = key0 + kt * 8 + 2 * quad_lane + e;
            allowed[kt][e] = key < p.keys && key_allowed(key, prefix_end[gi][half], window_start[gi][half],
                                                         window_end[gi][half]);
            tile_max = allowed[kt][e] ? fmaxf(tile_max, scores[kt][2 * half + e]) : tile_max;
          }
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        const float new_max = fmaxf(row_max[gi][half], tile_max);
        const float rescale =
            row_max[gi][half] == -INFINITY ? 0.0f : exp2f((row_max[gi][half] - new_max) * p.exp_scale);
        float tile_sum = 0.0f;
#pragma unroll
        for (int kt = 0; kt < kKeyTiles; ++kt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float& x = scores[kt][2 * half + e];
            x = allowed[kt][e] ? exp2f((x - new_max) * p.exp_scale) : 0.0f;
            tile_sum += x;
          }
        }
        lane_sum[gi][half] = fmaf(lane_sum[gi][half], rescale, tile_sum);
        row_max[gi][half] = new_max;
#pragma unroll
        for (int nt = 0; nt < kDimTiles; ++nt) {
          acc[gi][nt][2 * half] *= rescale;
          acc[gi][nt][2 * half + 1] *= rescale;
        }
      }
      // O += P·V. P's A fragment for keys 16kk .. 16kk+15 is the accumulators of score fragments 2kk
      // (keys +0..7: a0 row, a1 row + 8) and 2kk + 1 (keys +8..15: a2, a3). V's B fragments for dims
      // 16np .. 16np+15: one ldmatrix.x4.trans, lanes 0-7 / 8-15 / 16-23 / 24-31 addressing key rows
      // 0-7 / 8-15 / 0-7 / 8-15 at dims +0 / +0 / +8 / +8.
#pragma unroll
      for (int kk = 0; kk < kKeySteps; ++kk) {
        const uint32_t a[4] = {pack_pair<T>(scores[2 * kk][0], scores[2 * kk][1]),
                               pack_pair<T>(scores[2 * kk][2], scores[2 * kk][3]),
                               pack_pair<T>(scores[2 * kk + 1][0], scores[2 * kk + 1][1]),
                               pack_pair<T>(scores[2 * kk + 1][2], scores[2 * kk + 1][3])};
        const uint16_t* v_rows = v_tile + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * Layout::kStride +
                                 (lane >> 4) * 8;
#pragma unroll
        for (int np = 0; np < kDimTiles / 2; ++np) {
          uint32_t b[4];
          load_matrix_x4_transposed(b, v_rows + np * 16);
          mma_16x8x16<T>(acc[gi][2 * np], a, b[0], b[1]);
          mma_16x8x16<T>(acc[gi][2 * np + 1], a, b[2], b[3]);
        }
      }
    }
    __syncthreads();  // slot i % kStages is refilled at iteration i + 1
  }
  copy_async_wait<0>();

  // Normalize and write, as the float32 kernel: a row without keys has sum 0 and writes zeros (max -inf).
#pragma unroll
  for (int gi = 0; gi < kGroups; ++gi) {
    if (!group_live[gi]) {
      continue;  // warp-uniform
    }
    const int group_row0 = (gi * kWarps + warp) * kGroupRows;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float sum = lane_sum[gi][half];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const int row = first_row + group_row0 + quad_row + 8 * half;
      if (row >= p.rows) {
        continue;
      }
      const float inverse = sum > 0.0f ? 1.0f / sum : 0.0f;
      const int64_t out_row = (static_cast<int64_t>(b) * p.rows + row) * p.heads + h;
      if (p.num_splits == 1) {
        T* dst = p.out + out_row * D + 2 * quad_lane;
#pragma unroll
        for (int nt = 0; nt < kDimTiles; ++nt) {
          *reinterpret_cast<uint32_t*>(dst + nt * 8) =
              pack_pair<T>(acc[gi][nt][2 * half] * inverse, acc[gi][nt][2 * half + 1] * inverse);
        }
      } else {
        const int64_t split_row = static_cast<int64_t>(split) * p.batch * p.rows * p.heads + out_row;
        float* dst = p.partial_out + split_row * D + 2 * quad_lane;
#pragma unroll
        for (int nt = 0; nt < kDimTiles; ++nt) {
          *reinterpret_cast<float2*>(dst + nt * 8) =
              make_float2(acc[gi][nt][2 * half] * inverse, acc[gi][nt][2 * half + 1] * inverse);
        }
        if (quad_lane == 0) {
          p.partial_max[split_row] = row_max[gi][half];
          p.partial_sum[split_row] = sum;
        }
      }
    }
  }
}

}  // namespace tensor_core

// out[row] = Σ_s w_s · partial_s[row] / Σ_s w_s with w_s = sum_s · 2^((max_s - M) · exp_scale) and
// M = max over s of max_s: the softmax over all the keys from the per-split ones. One warp per output
// row (b, i, h), lanes over head dims. Splits without keys (max -inf, sum 0) weigh 0; a row whose
// splits are all empty writes zeros.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) combine_splits_kernel(const float* __restrict__ partial_out,
                                                                  const float* __restrict__ partial_max,
                                                                  const float* __restrict__ partial_sum,
                                                                  T* __restrict__ out, int64_t num_rows,
                                                                  int num_splits, float exp_scale) {
  constexpr int kDimsPerLane = D / 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= num_rows) {
    return;
  }
  float global_max = -INFINITY;
  for (int s = lane; s < num_splits; s += 32) {
    global_max = fmaxf(global_max, partial_max[s * num_rows + row]);
  }
  global_max = warp_max(global_max);
  float acc[kDimsPerLane] = {};
  float weight_sum = 0.0f;
  if (global_max != -INFINITY) {
    for (int s = 0; s < num_splits; ++s) {
      const int64_t split_row = s * num_rows + row;
      const float split_max = partial_max[split_row];
      const float weight =
          split_max == -INFINITY ? 0.0f : partial_sum[split_row] * exp2f((split_max - global_max) * exp_scale);
      weight_sum += weight;
      const float* src = partial_out + split_row * D + lane * kDimsPerLane;
#pragma unroll
      for (int e = 0; e < kDimsPerLane; ++e) {
        acc[e] = fmaf(weight, src[e], acc[e]);
      }
    }
  }
  const float inverse = weight_sum > 0.0f ? 1.0f / weight_sum : 0.0f;
  T* dst = out + row * D + lane * kDimsPerLane;
#pragma unroll
  for (int e = 0; e < kDimsPerLane; ++e) {
    dst[e] = from_float<T>(acc[e] * inverse);
  }
}

// Whether every key row of the [B, L, H, D] view starts on a 16-byte boundary, so that load_tile may
// read 16 bytes at once (D * element size is a multiple of 16 for every supported D and dtype).
bool is_16_byte_aligned(const at::Tensor& t) {
  const int64_t element_size = static_cast<int64_t>(t.element_size());
  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 != 0) {
    return false;
  }
  for (int dim = 0; dim < 3; ++dim) {
    if (t.size(dim) > 1 && (t.stride(dim) * element_size) % 16 != 0) {
      return false;
    }
  }
  return true;
}

// Split-KV count when the caller leaves it to us (num_splits = 0). `blocks_per_split` blocks rarely fill
// the `resident_blocks` slots of the GPU (SMs x blocks per SM) in decoding, and a kernel bound by memory
// needs every slot streaming. n splits give n times the blocks; the fraction of the slots of the waves
// that do work is blocks·n / (ceil(blocks·n / slots) · slots). Take the smallest n within 85% of the
// best fraction: more splits cost partial writes and a longer combine for no fuller waves. A split
// keeps at least kMinTilesPerSplit tiles of the L keys, and there are at most kMaxSplits.
int64_t choose_num_splits(int64_t blocks_per_split, int64_t keys, int64_t resident_blocks) {
  resident_blocks = std::max<int64_t>(resident_blocks, 1);
  if (blocks_per_split * 5 >= resident_blocks * 4) {
    return 1;  // already at least 80% of one full wave
  }
  const int64_t tiles = (keys + kTileKeys - 1) / kTileKeys;
  const int64_t max_splits = std::min<int64_t>(kMaxSplits, std::max<int64_t>(1, tiles / kMinTilesPerSplit));
  auto wave_efficiency = [&](int64_t splits) {
    const int64_t blocks = blocks_per_split * splits;
    const int64_t waves = (blocks + resident_blocks - 1) / resident_blocks;
    return static_cast<double>(blocks) / static_cast<double>(waves * resident_blocks);
  };
  double best = 0.0;
  for (int64_t splits = 1; splits <= max_splits; ++splits) {
    best = std::max(best, wave_efficiency(splits));
  }
  for (int64_t splits = 1; splits <= max_splits; ++splits) {
    if (wave_efficiency(splits) >= 0.85 * best) {
      return splits;
    }
  }
  return 1;
}

// The kernel of an input type: the tensor-core one for 16-bit types, the CUDA-core one for float32
// (mma.sync has no float32 A/B operands; tf32 would round the inputs to 10 mantissa bits, outside the
// float32 tolerance of the tests).
template <typename T, int D>
struct KernelFor {
  static constexpr bool kTensorCores = !std::is_same<T, float>::value;
  static constexpr int kBlockRows = kTensorCores ? tensor_core::rows_per_block(D) : kRowsPerGroup;
  static constexpr int kBlockThreads = kTensorCores ? tensor_core::kThreads : kThreads;
  static constexpr int kDynamicSmem = kTensorCores ? tensor_core::dynamic_smem_bytes(D) : 0;
  // The kernel, allowed its dynamic shared memory past 48 KB. The attribute belongs to the current
  // device's context, so it is set at every call (a host-side attribute write, no synchronization).
  static auto kernel() {
    if constexpr (kTensorCores) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(&tensor_core::decode_attention_kernel<T, D>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, kDynamicSmem));
      return &tensor_core::decode_attention_kernel<T, D>;
    } else {
      return &decode_attention_kernel<T, D>;
    }
  }
};

template <typename T, int D>
void launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_end,
            const at::Tensor& window_start, const at::Tensor& window_end, double scale, int64_t num_splits,
            at::Tensor& out) {
  using Kernel = KernelFor<T, D>;
  const int64_t batch = q.size(0), rows = q.size(1), heads = q.size(2), keys = k.size(1);
  const int64_t row_blocks = (rows + Kernel::kBlockRows - 1) / Kernel::kBlockRows;
  if (num_splits == 0) {
    int multiprocessors = 0, blocks_per_sm = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, q.device().index()));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, Kernel::kernel(),
                                                                 Kernel::kBlockThreads, Kernel::kDynamicSmem));
    const int64_t resident_blocks = static_cast<int64_t>(multiprocessors) * blocks_per_sm;
    num_splits = choose_num_splits(batch * heads * row_blocks, keys, resident_blocks);
  }
  TORCH_CHECK(row_blocks * num_splits <= std::numeric_limits<int32_t>::max(),
              "decode_attention_cuda: too many blocks: ", row_blocks, " row blocks of ", Kernel::kBlockRows,
              " x num_splits = ", num_splits);

  DecodeParams<T> p{};
  p.q = reinterpret_cast<const T*>(q.const_data_ptr());
  p.k = reinterpret_cast<const T*>(k.const_data_ptr());
  p.v = reinterpret_cast<const T*>(v.const_data_ptr());
  p.prefix_end = prefix_end.const_data_ptr<int32_t>();
  p.window_start = window_start.const_data_ptr<int32_t>();
  p.window_end = window_end.const_data_ptr<int32_t>();
  p.out = reinterpret_cast<T*>(out.mutable_data_ptr());
  p.q_stride_b = q.stride(0);
  p.q_stride_s = q.stride(1);
  p.q_stride_h = q.stride(2);
  p.k_stride_b = k.stride(0);
  p.k_stride_l = k.stride(1);
  p.k_stride_h = k.stride(2);
  p.v_stride_b = v.stride(0);
  p.v_stride_l = v.stride(1);
  p.v_stride_h = v.stride(2);
  p.mask_stride_b = prefix_end.size(0) == 1 ? 0 : rows;
  p.batch = static_cast<int>(batch);
  p.rows = static_cast<int>(rows);
  p.heads = static_cast<int>(heads);
  p.keys = static_cast<int>(keys);
  p.num_splits = static_cast<int>(num_splits);
  p.score_sign = scale < 0 ? -1.0f : 1.0f;
  p.exp_scale = static_cast<float>(std::abs(scale) * static_cast<double>(kLog2e));
  p.k_vectorized = is_16_byte_aligned(k);
  p.v_vectorized = is_16_byte_aligned(v);

  at::Tensor partial_out, partial_stats;
  if (num_splits > 1) {
    const auto options = q.options().dtype(at::kFloat);
    partial_out = at::empty({num_splits, batch, rows, heads, D}, options);
    partial_stats = at::empty({2, num_splits, batch, rows, heads}, options);  // max, then sum
    p.partial_out = partial_out.mutable_data_ptr<float>();
    p.partial_max = partial_stats.mutable_data_ptr<float>();
    p.partial_sum = p.partial_max + num_splits * batch * rows * heads;
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index());
  const dim3 grid(static_cast<unsigned int>(row_blocks * num_splits), static_cast<unsigned int>(heads),
                  static_cast<unsigned int>(batch));
  Kernel::kernel()<<<grid, Kernel::kBlockThreads, Kernel::kDynamicSmem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (num_splits > 1) {
    const int64_t num_rows = batch * rows * heads;
    const int64_t blocks = (num_rows + kWarps - 1) / kWarps;
    combine_splits_kernel<T, D><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
        p.partial_out, p.partial_max, p.partial_sum, p.out, num_rows, static_cast<int>(num_splits), p.exp_scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void launch_for_head_dim(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& prefix_end, const at::Tensor& window_start,
                         const at::Tensor& window_end, double scale, int64_t num_splits, at::Tensor& out) {
  if (q.size(3) == 64) {
    launch<T, 64>(q, k, v, prefix_end, window_start, window_end, scale, num_splits, out);
  } else {
    launch<T, 128>(q, k, v, prefix_end, window_start, window_end, scale, num_splits, out);
  }
}

void check_attention_tensor(const char* name, const char* layout, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.defined(), "decode_attention_cuda: ", name, " must be a tensor, got None");
  TORCH_CHECK(t.is_cuda(), "decode_attention_cuda: ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == q.device(), "decode_attention_cuda: ", name, " must be on q's device ", q.device(),
              ", got ", t.device());
  TORCH_CHECK(t.dim() == 4, "decode_attention_cuda: ", name, " must have 4 dims ", layout, ", got ", t.dim(),
              " dims with shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "decode_attention_cuda: ", name, " must have q's dtype ",
              q.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.stride(-1) == 1, "decode_attention_cuda: ", name,
              " must have stride(-1) == 1 (contiguous head dim), got strides ", t.strides());
}

void check_mask_tensor(const char* name, const at::Tensor& t, const at::Tensor& q) {
  const int64_t batch = q.size(0), rows = q.size(1);
  TORCH_CHECK(t.defined(), "decode_attention_cuda: ", name, " must be a tensor, got None");
  TORCH_CHECK(t.scalar_type() == at::kInt, "decode_attention_cuda: ", name, " must be an int32 tensor, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), "decode_attention_cuda: ", name, " must be on q's device ", q.device(),
              ", got ", t.device());
  TORCH_CHECK(t.dim() == 2, "decode_attention_cuda: ", name, " must have 2 dims [Bm, S], got ", t.dim(),
              " dims with shape ", t.sizes());
  TORCH_CHECK(t.size(1) == rows, "decode_attention_cuda: ", name, " must have S = ", rows,
              " columns (q.size(1)), got shape ", t.sizes());
  TORCH_CHECK(t.size(0) == 1 || t.size(0) == batch, "decode_attention_cuda: ", name,
              " must have Bm = 1 (shared by the batch) or Bm = B = ", batch, " rows, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "decode_attention_cuda: ", name, " must be contiguous, got strides ",
              t.strides());
}

}  // namespace

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& prefix_end, const at::Tensor& window_start,
                                 const at::Tensor& window_end, double scale, int64_t num_splits) {
  TORCH_CHECK(q.defined(), "decode_attention_cuda: q must be a tensor, got None");
  TORCH_CHECK(q.is_cuda(), "decode_attention_cuda: q must be a CUDA tensor, got one on ", q.device());
  check_attention_tensor("q", "[B, S, H, D]", q, q);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "decode_attention_cuda: q must be float32, float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.size(3) == 64 || q.size(3) == 128, "decode_attention_cuda: head dim D must be 64 or 128, got ",
              q.size(3), " (q shape ", q.sizes(), ")");
  check_attention_tensor("k", "[B, L, H, D]", k, q);
  check_attention_tensor("v", "[B, L, H, D]", v, q);
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3),
              "decode_attention_cuda: k must have shape [B, L, H, D] = [", q.size(0), ", L, ", q.size(2), ", ",
              q.size(3), "] to match q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "decode_attention_cuda: v must have k's shape ", k.sizes(), ", got ",
              v.sizes());
  check_mask_tensor("prefix_end", prefix_end, q);
  check_mask_tensor("window_start", window_start, q);
  check_mask_tensor("window_end", window_end, q);
  TORCH_CHECK(window_start.size(0) == prefix_end.size(0) && window_end.size(0) == prefix_end.size(0),
              "decode_attention_cuda: prefix_end, window_start and window_end must have the same Bm, got ",
              prefix_end.size(0), ", ", window_start.size(0), " and ", window_end.size(0));
  TORCH_CHECK(std::isfinite(scale), "decode_attention_cuda: scale must be finite, got ", scale);
  TORCH_CHECK(num_splits >= 0, "decode_attention_cuda: num_splits must be >= 0 (0 = automatic), got ",
              num_splits);
  const int64_t batch = q.size(0), rows = q.size(1), heads = q.size(2), keys = k.size(1);
  // The grid is (row groups x splits, H, B); CUDA caps its y and z extents at 65535.
  TORCH_CHECK(batch <= 65535 && heads <= 65535, "decode_attention_cuda: B and H must be <= 65535, got B = ",
              batch, ", H = ", heads);
  TORCH_CHECK(keys <= std::numeric_limits<int32_t>::max() - kTileKeys && rows <= std::numeric_limits<int32_t>::max(),
              "decode_attention_cuda: L and S must fit in int32, got L = ", keys, ", S = ", rows);

  const c10::cuda::CUDAGuard device_guard(q.device());
  at::Tensor out = at::empty({batch, rows, heads, q.size(3)}, q.options());
  if (out.numel() == 0) {
    return out;
  }
  switch (q.scalar_type()) {
    case at::kFloat:
      launch_for_head_dim<float>(q, k, v, prefix_end, window_start, window_end, scale, num_splits, out);
      break;
    case at::kHalf:
      launch_for_head_dim<__half>(q, k, v, prefix_end, window_start, window_end, scale, num_splits, out);
      break;
    default:
      launch_for_head_dim<__nv_bfloat16>(q, k, v, prefix_end, window_start, window_end, scale, num_splits, out);
      break;
  }
  return out;
}

}  // namespace hdlm
