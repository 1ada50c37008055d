// CUDA decode attention (docs/attention.md): the rows computed at one sampler step (re-encoded settled
// rows plus the active window) attend the KV cache under the two-interval mask.
//
// Decode is bound by reading K and V once, so the kernel is organized around the key tiles:
//   - one block per (query-row group, key-range split, head, sequence); a group is 16 consecutive
//     rows, which have nearly the same intervals, so they share every K/V tile a block loads;
//   - K/V tiles of 32 keys stream global -> registers -> shared memory (converted to float32 there),
//     with the next tile's global loads issued before the current tile is used (register
//     prefetch: plain CUDA C++, so it also runs on sm_80, no cp.async/TMA/wgmma);
//   - each warp owns 4 rows of the group; for a row, lanes run over the tile's keys for the
//     scores (q·k), then over head dims for P·V, with an online softmax in float32: exp2f of
//     (score - running max) · |scale|·log2(e), the max taken on the unscaled scores (see there why);
//   - a block visits only the key tiles of [0, max prefix_end) ∪ [min window_start, max window_end)
//     of its group (computed first), a warp skips the tiles its rows do not intersect, and the element
//     mask decides the rest;
//   - when B·H·groups blocks cannot fill the GPU, the tile range is split across blocks
//     (flash-decoding): each split writes its normalized partial output, score max and softmax sum in
//     float32, and a small kernel combines them.
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

// Blocks per SM the register allocation must allow (__launch_bounds__). Unbounded, nvcc takes about
// 166 registers at D = 128 (2 blocks of 4 warps per SM), too few loads in flight for a kernel bound by
// memory. 3 (D = 128) and 4 (D = 64) blocks cost no spills for 16-bit types (sm_80 and sm_90) and a few
// dozen bytes (L1-resident) for float32; shared memory (44 KB / 24 KB per block) allows them on sm_80+.
constexpr int min_blocks_per_sm(int head_dim) { return head_dim == 64 ? 4 : 3; }

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

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

  // The union of the group's intervals is covered by [0, prefix) and [window_lo, window_hi); the
  // block visits the tiles of these two ranges in order, numbered 0 .. total_tiles - 1 ("ordinals").
  int prefix = 0, window_lo = p.keys, window_hi = 0;
#pragma unroll
  for (int g = 0; g < kRowsPerGroup; ++g) {
    prefix = max(prefix, row_prefix_end[g]);
    if (row_window_start[g] < row_window_end[g]) {
      window_lo = min(window_lo, row_window_start[g]);
      window_hi = max(window_hi, row_window_end[g]);
    }
  }
  const int prefix_tiles = (prefix + kTileKeys - 1) / kTileKeys;
  const int window_first_tile = max(window_lo / kTileKeys, prefix_tiles);  // tiles below are counted already
  const int window_tiles = max(0, (window_hi + kTileKeys - 1) / kTileKeys - window_first_tile);
  const int total_tiles = prefix_tiles + window_tiles;
  // Balanced contiguous share of this split (empty when the splits outnumber the tiles).
  const int ordinal_begin = static_cast<int>(static_cast<int64_t>(total_tiles) * split / p.num_splits);
  const int ordinal_end = static_cast<int>(static_cast<int64_t>(total_tiles) * (split + 1) / p.num_splits);
  auto tile_key0 = [&](int ordinal) {
    return (ordinal < prefix_tiles ? ordinal : window_first_tile + ordinal - prefix_tiles) * kTileKeys;
  };

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
    load_tile<T, D>(k_chunks, k_base, p.k_stride_l, tile_key0(ordinal_begin), p.keys, p.k_vectorized);
    load_tile<T, D>(v_chunks, v_base, p.v_stride_l, tile_key0(ordinal_begin), p.keys, p.v_vectorized);
  }
  for (int ordinal = ordinal_begin; ordinal < ordinal_end; ++ordinal) {
    const int key0 = tile_key0(ordinal);
    store_tile<T, D>(k_chunks, k_tile);
    store_tile<T, D>(v_chunks, v_tile);
    __syncthreads();
    if (ordinal + 1 < ordinal_end) {
      // Issued now, consumed at the next iteration: the loads fly while this tile is computed.
      const int next_key0 = tile_key0(ordinal + 1);
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

template <typename T, int D>
void launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_end,
            const at::Tensor& window_start, const at::Tensor& window_end, double scale, int64_t num_splits,
            at::Tensor& out) {
  const int64_t batch = q.size(0), rows = q.size(1), heads = q.size(2), keys = k.size(1);
  const int64_t groups = (rows + kRowsPerGroup - 1) / kRowsPerGroup;
  if (num_splits == 0) {
    int multiprocessors = 0, blocks_per_sm = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, q.device().index()));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, decode_attention_kernel<T, D>,
                                                                 kThreads, 0));
    const int64_t resident_blocks = static_cast<int64_t>(multiprocessors) * blocks_per_sm;
    num_splits = choose_num_splits(batch * heads * groups, keys, resident_blocks);
  }
  TORCH_CHECK(groups * num_splits <= std::numeric_limits<int32_t>::max(),
              "decode_attention_cuda: too many blocks: ", groups, " row groups of ", kRowsPerGroup,
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
  const dim3 grid(static_cast<unsigned int>(groups * num_splits), static_cast<unsigned int>(heads),
                  static_cast<unsigned int>(batch));
  decode_attention_kernel<T, D><<<grid, kThreads, 0, stream>>>(p);
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
