// The SiLU-and-mul + quantization kernel (fused_quant.cu's header comment documents it), its launch shape
// and its grid rule, so that the launcher (fused_quant.cu) and the standalone timing harness
// (scripts/kernel_microbench.cu) compile the same kernel.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "fused_quant.cuh"

namespace fp8linear {
namespace fused {

// The launch shape and code form, each the fastest measured at M = 4096, I = 14336 on the H100
// (scripts/kernel_microbench.sh, docs/runs/2026-11-25-kernel-microbench-{1,2,3,4}-h100.md):
// - two consecutive chunks of one row per slot and one slot per thread: 109.7 us against 121.9 for one
//   chunk per slot and two slots per thread, and 112.6 with 128 threads per block (run 4). Two chunks
//   halve the work a thread does once per slot (indices, the group's shuffles and scale: the kernel is
//   issue-bound) and store 16 quantized bytes at once; a group is then g / 16 lanes, so group sizes down
//   to 16 stay whole. 512 threads per block (130.5 us against 120.1) and six resident blocks asked of
//   ptxas (126.0) lost in run 2.
// - the grid gives every slot its own thread, so each block runs one iteration (silu_grid below).
// - gate and up loaded without L1 allocation: 119.3 us against 120.2 through the read-only path (run 3).
// - for bf16 and fp16 inputs the exp in FMA form (fused_quant.cuh exp_fp32<true>): 120.5 us against
//   133.2 (run 1), the same silu once rounded to the input dtype (fused_quant.cuh).
constexpr int kSiluThreads = 256;
constexpr bool kSiluNoL1 = true;
// exp_fp32's FMA form for 16-bit inputs (fused_quant.cuh).
template <typename T>
constexpr bool kSiluFma = sizeof(T) == 2;
constexpr int kSiluUnroll = 1;  // slots a thread loads before computing
constexpr int kSiluChunks = 2;  // chunks of gate (and of up) per slot
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

template <typename T, typename Out, bool kPacked>
__global__ void __launch_bounds__(kSiluThreads) silu_and_mul_quant_kernel(const SiluParams p) {
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
            gate[u][c] = load8<T, true, kSiluNoL1>(g + c * kChunk);
            up[u][c] = load8<T, true, kSiluNoL1>(g + c * kChunk + p.I);
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

// The grid of a launch (host side): one slot per thread, so every block runs one iteration. (Up to two
// waves, one slot per thread in more blocks beat two slots per thread in fewer: M = 128, I = 14336 took
// 9.5 us against 11.0.)
inline uint32_t silu_grid(uint32_t num_slots) { return ceil_div<uint32_t>(num_slots, kSiluThreads); }

}  // namespace fused
}  // namespace fp8linear
