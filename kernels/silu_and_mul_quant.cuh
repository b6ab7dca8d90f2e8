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
// UNROLL: slots (FP8L_SILU_CHUNKS chunks each of gate and up) a thread loads before computing.
// MAX_WAVES: 0 sizes the grid so that each block runs one iteration: of one slot per thread while the
// tensor fits two resident waves, of UNROLL slots beyond (silu_grid below); > 0 caps the grid at that many
// waves and blocks loop over the rest (the earlier, persistent grid was 1).
// Default: two chunks per slot, one slot per thread (64 bytes of gate and up in flight for bf16):
// 109.7 us at M = 4096, I = 14336 against 121.9 for one chunk and two slots (94% against 85% of a copy
// of the same bytes; scripts/kernel_microbench.sh, H100, docs/runs/2026-11-25-kernel-microbench-4-h100.md).
#ifndef FP8L_SILU_UNROLL
#define FP8L_SILU_UNROLL 1
#endif
#ifndef FP8L_SILU_MAX_WAVES
#define FP8L_SILU_MAX_WAVES 0
#endif
// CHUNKS: consecutive chunks of one row per slot (1 or 2). Two halve the work a thread does once per
// slot (indices, loop, the group's shuffles and scale: the kernel is issue-bound, not memory-bound) and
// store 16 quantized bytes at once; a group is then g / 16 lanes, so group sizes down to 16 stay whole.
#ifndef FP8L_SILU_CHUNKS
#define FP8L_SILU_CHUNKS 2
#endif
constexpr int kSiluUnroll = FP8L_SILU_UNROLL;
constexpr int kSiluMaxWaves = FP8L_SILU_MAX_WAVES;
constexpr int kSiluChunks = FP8L_SILU_CHUNKS;
static_assert(kSiluUnroll >= 1 && kSiluUnroll <= 8, "FP8L_SILU_UNROLL must be in 1..8");
static_assert(kSiluChunks == 1 || kSiluChunks == 2, "FP8L_SILU_CHUNKS must be 1 or 2");
constexpr int kSiluSlotElems = kSiluChunks * kChunk;  // elements of q per slot

struct SiluParams {
  // pointers
  const void* x;  // T [M, 2I], element (m, k) at m * x_stride_row + k
  uint8_t* q;     // fp8 / int8 bytes, contiguous [M, I]
  ScaleOut s;
  // sizes (silu_set_sizes below)
  uint32_t num_slots;        // M * I / kSiluSlotElems (< 2^31)
  FastDivmod slots_per_row;  // I / kSiluSlotElems
  uint32_t I;
  int tpg;       // lanes (slots) per group, g / kSiluSlotElems
  int tpg_log2;  // log2(tpg)
  // strides (elements of x)
  int64_t x_stride_row;
  // semantics
  float eps;
  bool scale_ue8m0;
  bool vec;        // x, its row stride and I * sizeof(T) allow 16-byte loads
  bool q_aligned;  // q is kSiluSlotElems-byte aligned
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

  // 64-bit slot indices: with an uncapped grid, base + kSiluUnroll * stride may pass 2^32 after the last
  // iteration (num_slots < 2^31, stride up to num_slots).
  for (uint64_t base = static_cast<uint64_t>(blockIdx.x) * kSiluThreads; base < p.num_slots;
       base += static_cast<uint64_t>(kSiluUnroll) * stride) {
    Vec8<T> gate[kSiluUnroll][kSiluChunks], up[kSiluUnroll][kSiluChunks];
    uint32_t row[kSiluUnroll], col[kSiluUnroll];  // row m and slot index within the row
#pragma unroll
    for (int u = 0; u < kSiluUnroll; ++u) {
      const uint64_t s64 = base + static_cast<uint64_t>(u) * stride + threadIdx.x;
      row[u] = col[u] = 0;
#pragma unroll
      for (int c = 0; c < kSiluChunks; ++c) gate[u][c] = up[u][c] = zero8<T>();
      if (s64 < p.num_slots) {
        const uint32_t slot = static_cast<uint32_t>(s64);
        row[u] = p.slots_per_row.div(slot);
        col[u] = slot - row[u] * p.slots_per_row.divisor;
        const T* g = x + row[u] * p.x_stride_row + static_cast<int64_t>(col[u]) * kSiluSlotElems;
#pragma unroll
        for (int c = 0; c < kSiluChunks; ++c) {
          if (p.vec) {
            gate[u][c] = load8<T, true, kSiluLoadHint>(g + c * kChunk);
            up[u][c] = load8<T, true, kSiluLoadHint>(g + c * kChunk + p.I);
          } else {
            gate[u][c] = load8<T, false>(g + c * kChunk);
            up[u][c] = load8<T, false>(g + c * kChunk + p.I);
          }
        }
      }
    }

#pragma unroll
    for (int u = 0; u < kSiluUnroll; ++u) {
      const uint64_t first = base + static_cast<uint64_t>(u) * stride;
      // Warp-uniform: a warp wholly past the end skips; otherwise every lane reaches the shuffles
      // (num_slots is a multiple of tpg, so a group is wholly valid or wholly not).
      if (first + warp_offset >= p.num_slots) continue;
      const uint64_t slot = first + threadIdx.x;

      Vec8<T> act[kSiluChunks];
      uint32_t amax_bits = 0;
#pragma unroll
      for (int c = 0; c < kSiluChunks; ++c) {
        float gf[kChunk], uf[kChunk], a[kChunk];
        to_float8(gate[u][c], gf);
        to_float8(up[u][c], uf);
#pragma unroll
        for (int k = 0; k < kChunk; ++k) a[k] = silu_fp32<kSiluFma<T>>(gf[k]);
        to_float8(Round8<T>::apply(a), a);  // silu(g) in the input dtype, as torch's F.silu returns it
#pragma unroll
        for (int k = 0; k < kChunk; ++k) a[k] = __fmul_rn(a[k], uf[k]);
        act[c] = Round8<T>::apply(a);  // silu(g) * u in the input dtype
        amax_bits = max(amax_bits, abs_max_bits8(act[c]));
      }

      amax_bits = group_max(amax_bits, p.tpg);
      const GroupScale gs = group_scale<T>(amax_bits, p.eps, Out::kQmax, p.scale_ue8m0);
      if (slot >= p.num_slots) continue;

      uint32_t w[kSiluChunks][2];
#pragma unroll
      for (int c = 0; c < kSiluChunks; ++c) {
        float af[kChunk];
        to_float8(act[c], af);
        quantize_chunk<Out, kChunk>(af, gs.inv, gs.nonfinite, w[c]);
      }
      uint8_t* dst = p.q + static_cast<int64_t>(slot) * kSiluSlotElems;  // q [M, I] contiguous
      if constexpr (kSiluChunks == 2) {
        store_q16(dst, w[0], w[1], p.q_aligned);
      } else {
        store_q8(dst, w[0], p.q_aligned);
      }
      if (lane_in_group == 0) store_scale<kPacked>(p.s, row[u], col[u] >> p.tpg_log2, gs);
    }
  }
}

// The sizes of a launch (host side): M rows of I outputs in groups of group_size (a multiple of
// kSiluSlotElems, I a multiple of group_size, M * I < 2^31: the launcher's checks).
inline void silu_set_sizes(SiluParams& p, int64_t M, int64_t I, int64_t group_size) {
  p.num_slots = static_cast<uint32_t>(M * I / kSiluSlotElems);
  p.slots_per_row = FastDivmod(static_cast<uint32_t>(I / kSiluSlotElems));
  p.I = static_cast<uint32_t>(I);
  p.tpg = static_cast<int>(group_size / kSiluSlotElems);
  p.tpg_log2 = ceil_log2(static_cast<uint64_t>(p.tpg));
}

// The grid of a launch (host side): one slot per thread and iteration; `wave` = resident blocks.
// Every block runs the same number of slots, so none runs an iteration longer than the rest.
inline uint32_t silu_grid(uint32_t num_slots, uint32_t wave) {
  const uint32_t blocks_needed = ceil_div<uint32_t>(num_slots, kSiluThreads);  // one slot per thread
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
