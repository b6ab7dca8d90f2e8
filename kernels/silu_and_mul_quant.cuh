// The SiLU-and-mul + quantization kernel (fused_quant.cu's header comment documents it), its tuning knobs
// and its grid rule: no torch types here, so that the torch launcher (fused_quant.cu) and the standalone
// timing harness (scripts/kernel_microbench.cu) compile the same kernel.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "fused_quant.cuh"

namespace fp8linear {
namespace fused {

// Tuning knobs of silu_and_mul (override with FP8LINEAR_NVCC_EXTRA="-DFP8L_SILU_..." to re-tune only).
// THREADS: per block. MIN_BLOCKS: > 0 asks ptxas for that many resident blocks per SM (fewer registers).
#ifndef FP8L_SILU_THREADS
#define FP8L_SILU_THREADS 256
#endif
#ifndef FP8L_SILU_MIN_BLOCKS
#define FP8L_SILU_MIN_BLOCKS 0
#endif
// LOAD_HINT: the cache policy of the gate/up loads (common.cuh load_stream16); 2, no L1 allocation, timed
// 1% faster than the read-only path at M = 4096, I = 14336 (docs/runs/2026-11-25-kernel-microbench-2-h100.md).
#ifndef FP8L_SILU_LOAD_HINT
#define FP8L_SILU_LOAD_HINT 2
#endif
constexpr int kSiluLoadHint = FP8L_SILU_LOAD_HINT;
constexpr int kSiluThreads = FP8L_SILU_THREADS;
// exp_fp32's FMA form for 16-bit inputs (fused_quant.cuh, FP8L_SILU_FMA).
template <typename T>
constexpr bool kSiluFma = FP8L_SILU_FMA != 0 && sizeof(T) == 2;
// UNROLL: slots (chunk pairs of gate and up, 2 x 16 bytes for bf16) a thread loads before computing.
// MAX_WAVES: 0 sizes the grid so that each block runs one iteration: of one slot per thread while the
// tensor fits two resident waves, of UNROLL slots beyond (silu_grid below); > 0 caps the grid at that many
// waves and blocks loop over the rest (the earlier, persistent grid was 1).
#ifndef FP8L_SILU_UNROLL
#define FP8L_SILU_UNROLL 2
#endif
#ifndef FP8L_SILU_MAX_WAVES
#define FP8L_SILU_MAX_WAVES 0
#endif
constexpr int kSiluUnroll = FP8L_SILU_UNROLL;
constexpr int kSiluMaxWaves = FP8L_SILU_MAX_WAVES;
static_assert(kSiluUnroll >= 1 && kSiluUnroll <= 8, "FP8L_SILU_UNROLL must be in 1..8");

struct SiluParams {
  // pointers
  const void* x;  // T [M, 2I], element (m, k) at m * x_stride_row + k
  uint8_t* q;     // fp8 / int8 bytes, contiguous [M, I]
  ScaleOut s;
  // sizes
  uint32_t num_chunks;        // M * I / 8 (< 2^31)
  FastDivmod chunks_per_row;  // I / 8
  uint32_t I;
  int tpg;       // lanes per group, g / 8
  int tpg_log2;  // log2(tpg)
  // strides (elements of x)
  int64_t x_stride_row;
  // semantics
  float eps;
  bool scale_ue8m0;
  bool vec;        // x, its row stride and I * sizeof(T) allow 16-byte loads
  bool q_aligned;  // q is 8-byte aligned
};

#if FP8L_SILU_MIN_BLOCKS > 0
#define FP8L_SILU_BOUNDS __launch_bounds__(kSiluThreads, FP8L_SILU_MIN_BLOCKS)
#else
#define FP8L_SILU_BOUNDS __launch_bounds__(kSiluThreads)
#endif

template <typename T, typename Out, bool kPacked>
__global__ void FP8L_SILU_BOUNDS silu_and_mul_quant_kernel(const SiluParams p) {
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const uint32_t stride = gridDim.x * kSiluThreads;
  const uint32_t lane_in_group = threadIdx.x & (p.tpg - 1);
  const uint32_t warp_offset = threadIdx.x & ~(kWarpSize - 1);

  // 64-bit chunk indices: with an uncapped grid, base + kSiluUnroll * stride may pass 2^32 after the last
  // iteration (num_chunks < 2^31, stride up to num_chunks).
  for (uint64_t base = static_cast<uint64_t>(blockIdx.x) * kSiluThreads; base < p.num_chunks;
       base += static_cast<uint64_t>(kSiluUnroll) * stride) {
    Vec8<T> gate[kSiluUnroll], up[kSiluUnroll];
    uint32_t row[kSiluUnroll], col[kSiluUnroll];  // row m and chunk index within the row
#pragma unroll
    for (int u = 0; u < kSiluUnroll; ++u) {
      const uint64_t c64 = base + static_cast<uint64_t>(u) * stride + threadIdx.x;
      row[u] = col[u] = 0;
      gate[u] = up[u] = zero8<T>();
      if (c64 < p.num_chunks) {
        const uint32_t c = static_cast<uint32_t>(c64);
        row[u] = p.chunks_per_row.div(c);
        col[u] = c - row[u] * p.chunks_per_row.divisor;
        const T* g = x + row[u] * p.x_stride_row + static_cast<int64_t>(col[u]) * kChunk;
        if (p.vec) {
          gate[u] = load8<T, true, kSiluLoadHint>(g);
          up[u] = load8<T, true, kSiluLoadHint>(g + p.I);
        } else {
          gate[u] = load8<T, false>(g);
          up[u] = load8<T, false>(g + p.I);
        }
      }
    }

#pragma unroll
    for (int u = 0; u < kSiluUnroll; ++u) {
      const uint64_t first = base + static_cast<uint64_t>(u) * stride;
      // Warp-uniform: a warp wholly past the end skips; otherwise every lane reaches the shuffles
      // (num_chunks is a multiple of tpg, so a group is wholly valid or wholly not).
      if (first + warp_offset >= p.num_chunks) continue;
      const uint64_t c = first + threadIdx.x;

      float gf[kChunk], uf[kChunk], a[kChunk];
      to_float8(gate[u], gf);
      to_float8(up[u], uf);
#pragma unroll
      for (int k = 0; k < kChunk; ++k) a[k] = silu_fp32<kSiluFma<T>>(gf[k]);
      to_float8(Round8<T>::apply(a), a);  // silu(g) in the input dtype, as torch's F.silu returns it
#pragma unroll
      for (int k = 0; k < kChunk; ++k) a[k] = __fmul_rn(a[k], uf[k]);
      const Vec8<T> act = Round8<T>::apply(a);  // silu(g) * u in the input dtype

      const uint32_t amax_bits = group_max(abs_max_bits8(act), p.tpg);
      const GroupScale gs = group_scale<T>(amax_bits, p.eps, Out::kQmax, p.scale_ue8m0);
      if (c >= p.num_chunks) continue;

      float af[kChunk];
      to_float8(act, af);
      uint32_t w[2];
      quantize_chunk<Out, kChunk>(af, gs.inv, gs.nonfinite, w);
      store_q8(p.q + static_cast<int64_t>(c) * kChunk, w, p.q_aligned);  // q [M, I] contiguous
      if (lane_in_group == 0) store_scale<kPacked>(p.s, row[u], col[u] >> p.tpg_log2, gs);
    }
  }
}

// The grid of a launch (host side): one 8-element chunk per thread and slot; `wave` = resident blocks.
// Every block runs the same number of slots, so none runs an iteration longer than the rest.
inline uint32_t silu_grid(uint32_t num_chunks, uint32_t wave) {
  const uint32_t blocks_needed = ceil_div<uint32_t>(num_chunks, kSiluThreads);  // one slot per thread
  uint32_t slots_per_block;
  if constexpr (kSiluMaxWaves > 0) {
    slots_per_block = ceil_div<uint32_t>(blocks_needed, wave * kSiluMaxWaves);
  } else {
    // Up to two waves, one slot per thread and more blocks beat kSiluUnroll slots in fewer blocks (M = 128,
    // I = 14336: 9.5 us against 11.0 with two slots); beyond, kSiluUnroll slots per thread.
    const uint32_t waves = ceil_div<uint32_t>(blocks_needed, wave);
    slots_per_block = waves <= 2 ? 1u : std::min<uint32_t>(waves, kSiluUnroll);
  }
  return ceil_div<uint32_t>(blocks_needed, slots_per_block);
}

}  // namespace fused
}  // namespace fp8linear
