// The per-token-group quantization kernel itself (DESIGN.md "Quantization semantics", "Scale layouts"),
// with its launch shape and its grid rule, so that the launcher (per_token_group_quant.cu, whose header
// comment documents the algorithm) and the standalone timing harness (scripts/kernel_microbench.cu) compile
// the same kernel.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common.cuh"

namespace fp8linear {

// The launch shape, each choice the fastest measured on the H100 (docs/benchmarks.md "Kernel variants",
// docs/runs/2026-11-25-kernel-microbench-{1,4,5}-h100.md): 256 threads per block (128 and 512 within noise);
// two 16-byte loads in flight per thread and no persistent cap on the grid (16384x7168 `row`: 125.0 us
// against 134.2 for a one-wave persistent grid with four loads; one load per thread lost up to 4% at
// 16384 rows, four loads up to 7% at 1024); two adjacent chunks per lane (2-4% faster than one chunk per
// lane at every shape of run 5, and no slower than two chunks interleaved across the group's lanes).
constexpr int kThreads = 256;
// 16-byte chunks of one group each lane loads: 2 (more where a group is wider than a warp's 32 chunks).
// Two halve the lanes per group, so the shuffles, the scale and the index math run once per 16 bf16
// elements instead of 8 (SGLang's kernels give each lane 16 elements too).
constexpr int kMinChunksPerLane = 2;
// 16-byte loads issued by each thread before its first reduction.
constexpr int kLoadsPerThread = 2;

struct QuantParams {
  // pointers
  const void* x;  // T, [B, M, K], element (b, m, k) at b * x_stride_batch + m * x_stride_row + k
  uint8_t* q;     // fp8 e4m3fn / int8 bytes, contiguous [B, M, K]
  void* s;        // fp32 (row, col) or int32 words (ue8m0_packed)
  // sizes
  uint32_t num_groups;  // B * M * G  (< 2^31)
  FastDivmod groups_per_row;  // G
  FastDivmod rows;            // M
  // strides, in elements of x and of s (fp32 or int32)
  int64_t x_stride_batch, x_stride_row;
  int64_t s_stride_batch, s_stride_row, s_stride_col;
  // semantics
  float eps;
  bool scale_ue8m0;
  bool q_aligned;  // q is 16-byte aligned: chunk stores may be 4 or 8 bytes wide (the scalar path)
};

template <typename T, int kGroup>
struct TileShape {
  static constexpr int kPerChunk = InputTraits<T>::kPerChunk;  // elements per 16-byte chunk
  static constexpr int kChunks = kGroup / kPerChunk;            // chunks per group: 2 .. 64
  static constexpr int kLanesWanted = kChunks / kMinChunksPerLane > 0 ? kChunks / kMinChunksPerLane : 1;
  static constexpr int kTPG = kLanesWanted < kWarpSize ? kLanesWanted : kWarpSize;  // lanes per group
  static constexpr int kChunksPerLane = kChunks / kTPG;  // kMinChunksPerLane, or 2 for g = 256 fp32
  // groups per lane per iteration (at least one: a g = 256 fp32 group is two loads per lane by itself)
  static constexpr int kUnroll = kLoadsPerThread / kChunksPerLane > 0 ? kLoadsPerThread / kChunksPerLane : 1;
  static constexpr int kGroupsPerTile = kThreads / kTPG;
  // The l-th chunk a lane owns, within its group: a lane's chunks are adjacent.
  __device__ __forceinline__ static int chunk_of(int lane, int l) { return lane * kChunksPerLane + l; }
  static_assert(kGroup % kPerChunk == 0 && kChunks % kTPG == 0, "group size must be whole chunks");
};

// Store one chunk's quantized bytes (kPerChunk = 8 or 4 bytes) at q + offset (offset % kPerChunk == 0).
template <int kWords, bool kVec>
__device__ __forceinline__ void store_chunk(uint8_t* dst, const uint32_t (&w)[kWords], bool q_aligned) {
  if (kVec || q_aligned) {
    if constexpr (kWords == 2) {
      store_bytes8(dst, w[0], w[1]);
    } else {
      store_bytes4(dst, w[0]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4 * kWords; ++i) dst[i] = static_cast<uint8_t>(w[i / 4] >> (8 * (i % 4)));
  }
}

// kVec: x's base pointer, row and batch strides and q are all 16-byte aligned (the launcher checks).
template <typename T, typename Out, int kGroup, bool kPacked, bool kVec>
__global__ void __launch_bounds__(kThreads) per_token_group_quant_kernel(const QuantParams p) {
  using Shape = TileShape<T, kGroup>;
  constexpr int kPerChunk = Shape::kPerChunk;
  constexpr int kTPG = Shape::kTPG;
  constexpr int kL = Shape::kChunksPerLane;
  constexpr int kU = Shape::kUnroll;
  constexpr int kGroupsPerTile = Shape::kGroupsPerTile;
  constexpr int kGroupsPerWarp = kWarpSize / kTPG;

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const int lane = threadIdx.x % kTPG;                 // lane within the group's sub-warp
  const uint32_t sub = threadIdx.x / kTPG;             // the sub-warp's group within the tile
  const uint32_t warp_first = (threadIdx.x / kWarpSize) * kGroupsPerWarp;
  const uint32_t tile_stride = gridDim.x * kGroupsPerTile;  // groups between a block's tiles

  griddep_wait();  // launched with programmatic dependent launch: nothing global before this
  for (uint32_t base = blockIdx.x * kGroupsPerTile; base < p.num_groups; base += kU * tile_stride) {
    uint4 v[kU][kL];
    uint32_t row[kU], col[kU];  // flattened row b*M + m, and group j within the row
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const uint32_t gi = base + u * tile_stride + sub;
      row[u] = col[u] = 0;
      if (gi < p.num_groups) {
        row[u] = p.groups_per_row.div(gi);
        col[u] = gi - row[u] * p.groups_per_row.divisor;
        const uint32_t b = p.rows.div(row[u]);
        const uint32_t m = row[u] - b * p.rows.divisor;
        const T* group = x + b * p.x_stride_batch + m * p.x_stride_row + static_cast<int64_t>(col[u]) * kGroup;
#pragma unroll
        for (int l = 0; l < kL; ++l) v[u][l] = load_chunk<T, kVec>(group + Shape::chunk_of(lane, l) * kPerChunk);
      } else {
#pragma unroll
        for (int l = 0; l < kL; ++l) v[u][l] = make_uint4(0u, 0u, 0u, 0u);
      }
    }

#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const uint32_t first = base + u * tile_stride;
      // Warp-uniform: slots past the end (small calls, the last iteration) skip the arithmetic. The
      // shuffles below then run with every lane of the warp, valid group or not.
      if (first + warp_first >= p.num_groups) continue;
      const uint32_t gi = first + sub;
      const bool valid = gi < p.num_groups;

      uint32_t amax_bits = InputTraits<T>::abs_max_bits(v[u][0]);
#pragma unroll
      for (int l = 1; l < kL; ++l) amax_bits = max(amax_bits, InputTraits<T>::abs_max_bits(v[u][l]));
#pragma unroll
      for (int offset = kTPG / 2; offset > 0; offset /= 2) {
        amax_bits = max(amax_bits, __shfl_xor_sync(0xFFFFFFFFu, amax_bits, offset));
      }
      const GroupScale g = group_scale<T>(amax_bits, p.eps, Out::kQmax, p.scale_ue8m0);
      if (!valid) continue;

      uint32_t w[kL][kPerChunk / 4];
#pragma unroll
      for (int l = 0; l < kL; ++l) {
        float f[kPerChunk];
        InputTraits<T>::to_float(v[u][l], f);
        quantize_chunk<Out, kPerChunk>(f, g.inv, g.nonfinite, w[l]);
      }
      const int64_t group_q = static_cast<int64_t>(gi) * kGroup;
      if constexpr (kL == 2 && kPerChunk == 8) {
        // Two adjacent 8-byte chunks: one 16-byte store (q and the group start are 16-byte aligned).
        store_q16(p.q + group_q + lane * 2 * kPerChunk, w[0], w[1], kVec || p.q_aligned);
      } else {
#pragma unroll
        for (int l = 0; l < kL; ++l) {
          store_chunk<kPerChunk / 4, kVec>(p.q + group_q + Shape::chunk_of(lane, l) * kPerChunk, w[l], p.q_aligned);
        }
      }

      if (lane == 0) {
        const uint32_t b = p.rows.div(row[u]);
        const uint32_t m = row[u] - b * p.rows.divisor;
        const uint32_t j = col[u];
        const int64_t row_offset = b * p.s_stride_batch + m * p.s_stride_row;
        if constexpr (kPacked) {
          // Byte j % 4 of word j / 4 (little-endian: bits 8*(j%4) ..). The last group of a row also
          // zeroes the bytes of the groups >= G that share its word (DESIGN.md "Scale layouts").
          uint8_t* word = static_cast<uint8_t*>(p.s) + 4 * (row_offset + (j / 4) * p.s_stride_col);
          word[j % 4] = static_cast<uint8_t>(g.exponent_byte);
          if (j + 1 == p.groups_per_row.divisor) {
            for (uint32_t k = j % 4 + 1; k < 4; ++k) word[k] = 0;
          }
        } else {
          static_cast<float*>(p.s)[row_offset + j * p.s_stride_col] = g.scale;
        }
      }
    }
  }
  griddep_launch_dependents();
}

// The grid of a launch (host side): tiles of kGroupsPerTile groups; `wave` = resident blocks on the device.
// Every block runs the same number of tiles, so no block runs one tile longer than the rest.
template <typename T, int kGroup>
inline uint32_t quant_grid(uint32_t num_groups, uint32_t wave) {
  using Shape = TileShape<T, kGroup>;
  const uint32_t tiles = ceil_div<uint32_t>(num_groups, Shape::kGroupsPerTile);
  const uint32_t tiles_per_block = std::min<uint32_t>(std::max<uint32_t>(ceil_div(tiles, wave), 1u), Shape::kUnroll);
  return ceil_div(tiles, tiles_per_block);
}

}  // namespace fp8linear
