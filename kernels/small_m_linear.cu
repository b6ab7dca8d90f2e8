// Small-M fused linear: the CUDA implementation of `fp8linear::small_m_linear` (fp8linear/small_m.py).
//
// What it computes, for x [M, K] (M <= 16, K % 128 == 0), weight [N, K] fp8 e4m3 or int8 with fp32 scales
// per 128x128 block (weight_scale_inv [ceil(N/128), K/128]) and an optional bias [N]:
//
//     (q, s) = per_token_group_quant(x, 128, weight.dtype, scale_ue8m0, eps)      bit for bit, in registers
//     y[m, n] = sum_j  s[m, j] * weight_scale_inv[n / 128, j] * sum_{k in group j} q[m, k] * weight[n, k]
//               (+ bias[n]), in fp32, stored in x's dtype
//
// Why a kernel of its own: at decode sizes the GEMM only streams the weight once (a GEMV), and the
// separate quantization launch, the scale write and re-read, and the host work of two ops are a large
// share of the layer's time (docs/benchmarks.md). Here every block quantizes the few activation rows it
// needs itself, from L2, with the quant kernel's own device code (common.cuh), so q and s never touch HBM.
//
// Mapping ("swap AB"): a block owns kRT tiles of 16 weight rows (kRT = 1 in every launch: see dispatch_tiles),
// 16 = the M dimension of a tensor-core `mma.sync.m16n8k32` (e4m3 x e4m3 -> f32, or s8 x s8 -> s32), and up to
// 16 tokens as one or two n8 tiles. Its 8 warps split K: warp w takes the 128-wide groups j = w, w + 8, ... .
// Per group a warp
//   1. loads its 16 x 128 weight bytes per row tile: lane (g = lane / 4, t = lane % 4) reads 16 bytes at columns
//      16t .. 16t+15 of each 64-column span of rows g and g + 8 (a warp-wide load covers 8 rows x 64 bytes);
//   2. loads the group's 128 activations of every token (a 16-lane sub-warp per bf16 row, as the quant
//      kernel does), computes amax, scale and the fp8/int8 bytes, and parks them in its shared memory;
//   3. runs 4 mma per token tile. Which k a fragment slot holds does not matter as long as A and B agree:
//      slot 4t+i of A (row g) and of B (token g) both hold column 16t + 8h + i of span s for mma (s, h),
//      and slot 16+4t+i holds column 16t + 8h + 4 + i, so each lane's 16 loaded bytes feed two mma;
//   4. scales the group's fp32 (or exact int32) sums by s[token, j] * weight_scale_inv[n0/128, j] into
//      fp32 accumulators, as DeepGEMM promotes its tensor-core sums every 128 columns.
// The 8 warps' accumulators are summed in warp order through shared memory (deterministic), the bias is
// added in fp32, and the result is rounded once to x's dtype.
//
// Split K: a layer with at most one row block per SM (N = 1024 gives 64 blocks of 16 rows, 2112 gives 132,
// on the H100's 132 SMs) leaves each SM one block of 8 warps, too few loads in flight for a latency-bound
// stream. Such a launch splits the groups over `splits` blocks per row block (grid.y), as many as fill the
// SMs to the kernel's occupancy while every warp keeps a group; each writes its fp32 sums to a
// [splits, M, N] buffer and counts itself in a per-row-block counter; the last split to arrive adds all of
// them in split order (deterministic), adds the bias, rounds, and clears the counter. (A second kernel did
// the sum before; dropping its launch saved 1-2 us per call in do_bench, docs/benchmarks.md.)
//
// Quantized ahead (small_m_quantizes_ahead): from M = 9 tokens, and from M = 4 on weights of at least
// 2^23 elements, quantizing every token's groups again in every block cost more than the weight stream (each
// of N / 16 blocks redoes all of x: as many quantized elements as weight bytes at M = 16). The op then runs
// the quant kernel once (`row` scales, the same bits) and launches this kernel with programmatic dependent
// launch; step 2 copies the group's bytes and scales from L2 instead, after griddep_wait(), with the first
// weight loads already in flight. do_bench on the H100 (docs/benchmarks.md): 2112x7168 at M = 16 24.4 ->
// 18.8 us, 28672x4096 107.9 -> 72.1, at M = 8 7168x7168 43.5 -> 35.4. The second launch costs more than it
// saves at M = 1, and at M = 4-8 on the smallest layers (1024x4096: 10.0-10.6 us in-kernel, 11.4-11.6
// ahead; bf16 11.8-12.0). Layers with N and K both >= 7168 quantize ahead from M = 1: each block there
// streams many groups, and the quantization's dependent chain in every group cost more than the extra
// launch (M = 1: 8192x28672 122 -> 98 us, 7168x18432 84 -> 63, 8192x8192 43.6 -> 39.6, 7168x7168 36.7 ->
// 33.6; on narrower layers it lost up to 15%: 4096x4096 15.1 -> 16.8, 1536x7168 15.5 -> 17.8).

#include <algorithm>
#include <atomic>
#include <cstdint>

#include <cuda_runtime.h>

#include "common.cuh"
#include "launch_utils.h"
#include "launchers.h"

namespace fp8linear {
namespace small_m {

// x is quantized ahead from this M (9 below 2^23 weight elements), and from M = 1 where N and K are both at
// least kPrequantWide (the file's head: the measurements).
constexpr int64_t kPrequantMinM = 4;
constexpr int64_t kPrequantWide = 7168;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kTileRows = 16;  // weight rows of one mma tile (the mma's M); a block owns kRT of them
constexpr int kGroup = 128;    // activation group = weight block width
constexpr int kRowBytes = 192;  // smem stride of one token's 128 quantized bytes: tokens g and g+1 of a
                                // 16-byte B-fragment load then fall in different banks (192 % 128 == 64)
// Groups whose weights a warp loads before using any (bytes in flight): 2. Three or four lost at nearly every
// layer measured, their registers costing blocks per SM (docs/benchmarks.md, "small_m: x quantized ahead from
// M = 1 on wide layers").
constexpr int kUnroll = 2;

struct Params {
  const void* x;         // T [M, K], row stride x_stride_row elements, 16-byte aligned rows
  int64_t x_stride_row;
  const uint8_t* w;      // fp8 / int8 [N, K] contiguous
  const float* ws;       // fp32 [ceil(N/128), G] contiguous
  const void* bias;      // [N] in bias_kind's dtype, or null
  int bias_kind;
  void* y;               // T [M, N] contiguous
  int M, N, K, G;
  float eps;
  bool ue8m0;
  int groups_per_split;  // groups of one grid.y slice: G when the launch is not split
  float* partial;        // split launches: fp32 [gridDim.y, M, N] sums before the bias; else null
  int* arrived;          // split launches: per row block, splits done so far (zero between launches)
  const uint8_t* q;      // kPrequant: x quantized by the quant kernel ahead of this one, [M, K] row-major
  const float* qs;       // kPrequant: its scales, [M, G] row-major
};

// ---- tensor-core fragments -------------------------------------------------------------------------
template <typename Out>
struct Mma;

template <>
struct Mma<OutFp8E4M3> {
  using Acc = float;
  __device__ __forceinline__ static void run(Acc (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Mma<OutInt8> {
  using Acc = int;  // exact: |sum| <= 128 * 127 * 128 per group
  __device__ __forceinline__ static void run(Acc (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }

__device__ __forceinline__ float load_bias(const void* bias, int kind, int n) {
  switch (kind) {
    case kBiasBf16: return __bfloat162float(static_cast<const __nv_bfloat16*>(bias)[n]);
    case kBiasFp16: return __half2float(static_cast<const __half*>(bias)[n]);
    case kBiasFp32: return static_cast<const float*>(bias)[n];
    default: return 0.0f;
  }
}

template <int kNT, int kRT>
struct SmemShape {
  static constexpr int kTokens = 8 * kNT;
  static constexpr int kQBytes = kTokens * kRowBytes;             // one group's quantized tokens
  static constexpr int kBufBytes = kQBytes + kTokens * 4;         // ... plus their fp32 scales
  static constexpr int kWarpBytes = kUnroll * kBufBytes;
  static constexpr int kBlockBytes = kWarps * kWarpBytes;
  static constexpr int kReduceBytes = kWarps * kRT * kNT * 4 * kWarpSize * 4;
  static_assert(kReduceBytes <= kBlockBytes, "the reduction reuses the group buffers");
};

// Group j's quantized activations of every token, from the quant kernel's q [M, K] and row-layout scales, into
// a warp's buffers in the layout the in-kernel quantization writes: each token's 128 bytes at
// tok * kRowBytes, its scale at sbuf[tok]. Tokens >= M keep the zeros the buffers were cleared to.
template <int kTokens>
__device__ __forceinline__ void copy_quantized(const Params& p, int j, int lane, uint8_t* qbuf, float* sbuf) {
  constexpr int kChunks = kTokens * kGroup / 16 / kWarpSize;  // 16-byte chunks of q per lane
  uint4 qv[kChunks];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {  // all loads first: one round trip
    const int tok = (lane + c * kWarpSize) / 8;
    qv[c] = tok < p.M ? __ldg(reinterpret_cast<const uint4*>(p.q + static_cast<int64_t>(tok) * p.K +
                                                              static_cast<int64_t>(j) * kGroup + 16 * (lane % 8)))
                      : make_uint4(0u, 0u, 0u, 0u);
  }
  const float scale = lane < p.M && lane < kTokens ? __ldg(p.qs + lane * p.G + j) : 0.0f;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int tok = (lane + c * kWarpSize) / 8;
    *reinterpret_cast<uint4*>(qbuf + tok * kRowBytes + 16 * (lane % 8)) = qv[c];
  }
  if (lane < kTokens) sbuf[lane] = scale;
}

// kNT token tiles of 8 (M <= 8 kNT). T: x's dtype (and y's). Out: the quantized type (fp8 e4m3 / int8).
template <typename T, typename Out, int kNT, int kRT, bool kPrequant>
__global__ void __launch_bounds__(kThreads) small_m_linear_kernel(const Params p) {
  using Shape = SmemShape<kNT, kRT>;
  using Traits = InputTraits<T>;
  using Acc = typename Mma<Out>::Acc;
  constexpr int kTokens = Shape::kTokens;
  constexpr int kPerChunk = Traits::kPerChunk;     // x elements per 16-byte chunk: 8 (bf16/fp16), 4 (fp32)
  constexpr int kTPG = kGroup / kPerChunk;         // lanes per token-group: 16 or 32
  constexpr int kTokPerPass = kWarpSize / kTPG;    // tokens one warp-wide load covers: 2 or 1
  constexpr int kPasses = kTokens / kTokPerPass;

  extern __shared__ __align__(16) uint8_t smem[];
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int g = lane >> 2;  // fragment row group
  const int t = lane & 3;   // thread in group
  uint8_t* const my_smem = smem + warp * Shape::kWarpBytes;

  // Row tile r covers rows n0 + 16 r .. n0 + 16 r + 15; lane (g, t) holds rows g and g + 8 of each.
  const int n0 = blockIdx.x * kTileRows * kRT;
  bool ok[kRT][2];
  const uint8_t* w_rows[kRT][2];
  const float* ws_rows[kRT];  // 16-row tiles never straddle a 128-row weight block
#pragma unroll
  for (int r = 0; r < kRT; ++r) {
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
      const int row = n0 + kTileRows * r + g + 8 * hi;
      ok[r][hi] = row < p.N;
      w_rows[r][hi] = p.w + static_cast<int64_t>(ok[r][hi] ? row : 0) * p.K + 16 * t;
    }
    ws_rows[r] = p.ws + static_cast<int64_t>(min(n0 + kTileRows * r, p.N - 1) / kGroup) * p.G;
  }
  const T* const x = static_cast<const T*>(p.x);
  const int sub = lane % kTPG;             // this lane's chunk within a token's group
  const int tok_in_pass = lane / kTPG;

  float acc[kRT][kNT][4];
#pragma unroll
  for (int r = 0; r < kRT; ++r)
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[r][nt][i] = 0.0f;
  // Tokens of passes skipped below (M not reaching them) must read as finite zeros: clear once.
  for (int off = 16 * lane; off < Shape::kWarpBytes; off += 16 * kWarpSize) {
    *reinterpret_cast<uint4*>(my_smem + off) = make_uint4(0u, 0u, 0u, 0u);
  }
  __syncwarp();

  const int g_begin = blockIdx.y * p.groups_per_split;
  const int g_end = min(p.G, g_begin + p.groups_per_split);
  for (int j0 = g_begin + warp; j0 < g_end; j0 += kWarps * kUnroll) {
    // 1. Weights and weight scales of kUnroll groups: the HBM traffic, issued first.
    uint4 wv[kUnroll][kRT][2][2];  // [group][row tile][row lo/hi][span]
    float wscale[kUnroll][kRT];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * kWarps;
      const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
      const bool in = j < g_end;
      const int64_t k = static_cast<int64_t>(j) * kGroup;
#pragma unroll
      for (int r = 0; r < kRT; ++r) {
#pragma unroll
        for (int hi = 0; hi < 2; ++hi)
#pragma unroll
          for (int s = 0; s < 2; ++s)
            wv[u][r][hi][s] = (in && ok[r][hi]) ? __ldg(reinterpret_cast<const uint4*>(w_rows[r][hi] + k + 64 * s)) : zero;
        wscale[u][r] = in ? __ldg(ws_rows[r] + j) : 0.0f;
      }
    }

    // 2. Quantize each group's activations (every token) into this warp's buffers, exactly as the
    //    quant kernel does. Tokens >= M quantize zeros and get scale 0: their columns are never stored.
    //    kPrequant: copy the quant kernel's bytes and scales instead (the same bits), after waiting for that
    //    kernel (programmatic dependent launch: this iteration's weight loads are already in flight).
    if constexpr (kPrequant) griddep_wait();
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * kWarps;
      if (j >= g_end) break;  // warp-uniform
      uint8_t* const qbuf = my_smem + u * Shape::kBufBytes;
      float* const sbuf = reinterpret_cast<float*>(qbuf + Shape::kQBytes);
      if constexpr (kPrequant) {
        copy_quantized<kTokens>(p, j, lane, qbuf, sbuf);
        continue;
      }
      uint4 xv[kPasses];
#pragma unroll
      for (int pass = 0; pass < kPasses; ++pass) {
        const int tok = pass * kTokPerPass + tok_in_pass;
        xv[pass] = make_uint4(0u, 0u, 0u, 0u);
        if (tok < p.M) {
          xv[pass] = __ldg(reinterpret_cast<const uint4*>(x + tok * p.x_stride_row + static_cast<int64_t>(j) * kGroup +
                                                          sub * kPerChunk));
        }
      }
#pragma unroll
      for (int pass = 0; pass < kPasses; ++pass) {
        const int tok = pass * kTokPerPass + tok_in_pass;
        if (pass * kTokPerPass >= p.M) break;  // warp-uniform: no token of this pass exists
        uint32_t amax_bits = Traits::abs_max_bits(xv[pass]);
#pragma unroll
        for (int offset = kTPG / 2; offset > 0; offset /= 2) {
          amax_bits = max(amax_bits, __shfl_xor_sync(0xFFFFFFFFu, amax_bits, offset));
        }
        const GroupScale gs = group_scale<T>(amax_bits, p.eps, Out::kQmax, p.ue8m0);
        float f[kPerChunk];
        Traits::to_float(xv[pass], f);
        uint32_t qw[kPerChunk / 4];
        quantize_chunk<Out, kPerChunk>(f, gs.inv, gs.nonfinite, qw);
        uint8_t* dst = qbuf + tok * kRowBytes + sub * kPerChunk;
        if constexpr (kPerChunk == 8) {
          *reinterpret_cast<uint2*>(dst) = make_uint2(qw[0], qw[1]);
        } else {
          *reinterpret_cast<uint32_t*>(dst) = qw[0];
        }
        if (sub == 0) sbuf[tok] = tok < p.M ? gs.scale : 0.0f;
      }
    }
    __syncwarp();

    // 3-4. Tensor-core sums per group, promoted into fp32 with the group's two scales.
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * kWarps;
      if (j >= g_end) break;
      const uint8_t* const qbuf = my_smem + u * Shape::kBufBytes;
      const float* const sbuf = reinterpret_cast<const float*>(qbuf + Shape::kQBytes);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        uint4 qv[2];  // B fragments of both spans, shared by the row tiles
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          qv[s] = *reinterpret_cast<const uint4*>(qbuf + (nt * 8 + g) * kRowBytes + 64 * s + 16 * t);
        }
        const float sa0 = sbuf[nt * 8 + 2 * t], sa1 = sbuf[nt * 8 + 2 * t + 1];
#pragma unroll
        for (int r = 0; r < kRT; ++r) {
          Acc c[4] = {0, 0, 0, 0};
#pragma unroll
          for (int s = 0; s < 2; ++s) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const uint32_t a[4] = {word(wv[u][r][0][s], 2 * h), word(wv[u][r][1][s], 2 * h),
                                     word(wv[u][r][0][s], 2 * h + 1), word(wv[u][r][1][s], 2 * h + 1)};
              Mma<Out>::run(c, a, word(qv[s], 2 * h), word(qv[s], 2 * h + 1));
            }
          }
          const float s0 = sa0 * wscale[u][r];
          const float s1 = sa1 * wscale[u][r];
          acc[r][nt][0] += static_cast<float>(c[0]) * s0;
          acc[r][nt][1] += static_cast<float>(c[1]) * s1;
          acc[r][nt][2] += static_cast<float>(c[2]) * s0;
          acc[r][nt][3] += static_cast<float>(c[3]) * s1;
        }
      }
    }
    __syncwarp();  // the next iteration overwrites the buffers
  }

  // Sum the warps' partial results in warp order, add the bias, store.
  __syncthreads();
  constexpr int kSlots = kRT * kNT * 4 * kWarpSize;  // one warp's accumulators: [kRT][kNT][4][32]
  float* const red = reinterpret_cast<float*>(smem);  // [kWarps][kSlots]
#pragma unroll
  for (int r = 0; r < kRT; ++r)
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) red[warp * kSlots + ((r * kNT + nt) * 4 + i) * kWarpSize + lane] = acc[r][nt][i];
  __syncthreads();
  for (int e = threadIdx.x; e < kSlots; e += kThreads) {
    const int r = e / (kNT * 4 * kWarpSize);
    const int nt = (e / (4 * kWarpSize)) % kNT;
    const int i = (e / kWarpSize) % 4;
    const int l = e % kWarpSize;
    const int n = n0 + kTileRows * r + (l >> 2) + (i >= 2 ? 8 : 0);
    const int tok = nt * 8 + 2 * (l & 3) + (i & 1);
    if (n >= p.N || tok >= p.M) continue;
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += red[w * kSlots + e];
    if (p.partial != nullptr) {  // a split launch: the row block's last split finishes, below
      p.partial[(static_cast<int64_t>(blockIdx.y) * p.M + tok) * p.N + n] = v;
      continue;
    }
    if (p.bias_kind != kNoBias) v += load_bias(p.bias, p.bias_kind, n);
    static_cast<T*>(p.y)[static_cast<int64_t>(tok) * p.N + n] = from_float<T>(v);
  }
  if (p.partial == nullptr) return;

  // The last split of this row block to arrive adds all splits' sums in split order (deterministic: the
  // same bits whichever arrives last), adds the bias and stores y; then it clears the counter for the next
  // launch. The fences order each block's partial stores before its arrival, and the arrivals before the
  // last block's loads (which bypass L1).
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(p.arrived + blockIdx.x, 1) == static_cast<int>(gridDim.y) - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int rows = min(kTileRows * kRT, p.N - n0);
  const int64_t count = static_cast<int64_t>(p.M) * p.N;
  for (int e = threadIdx.x; e < rows * p.M; e += kThreads) {
    const int tok = e / rows;
    const int n = n0 + e % rows;
    const int64_t at = static_cast<int64_t>(tok) * p.N + n;
    float v = 0.0f;
    for (int split = 0; split < static_cast<int>(gridDim.y); ++split) v += __ldcg(p.partial + split * count + at);
    if (p.bias_kind != kNoBias) v += load_bias(p.bias, p.bias_kind, n);
    static_cast<T*>(p.y)[at] = from_float<T>(v);
  }
  if (threadIdx.x == 0) p.arrived[blockIdx.x] = 0;
}

template <typename T, typename Out, int kNT, int kRT, bool kPrequant>
void launch_variant(Params p, int device, cudaStream_t stream, Workspace& workspace) {
  constexpr int kSmem = SmemShape<kNT, kRT>::kBlockBytes;
  auto kernel = small_m_linear_kernel<T, Out, kNT, kRT, kPrequant>;
  if constexpr (kSmem > 48 * 1024) {  // once per instantiation and device: allow > 48 KB of dynamic smem
    static std::atomic<uint64_t> configured{0};
    const uint64_t bit = uint64_t{1} << (device % 64);
    if ((configured.load(std::memory_order_relaxed) & bit) == 0) {
      check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem),
                 "cudaFuncSetAttribute");
      configured.fetch_or(bit, std::memory_order_relaxed);
    }
  }
  const int blocks = (p.N + kTileRows * kRT - 1) / (kTileRows * kRT);
  // At most one block per SM: split K until the SMs are full to this kernel's occupancy, keeping at least
  // one group per warp in every split. (With two or more blocks per SM the SMs are full without it.)
  static std::atomic<int> occupancy[64];  // blocks of this instantiation an SM holds, per device (0: not asked)
  int per_sm = device < 64 ? occupancy[device].load(std::memory_order_relaxed) : 0;
  if (per_sm == 0) {
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, kSmem),
               "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    per_sm = std::max(per_sm, 1);
    if (device < 64) occupancy[device].store(per_sm, std::memory_order_relaxed);
  }
  int splits = 1;
  const int resident = per_sm * device_sm_count(device);
  if (blocks <= device_sm_count(device)) {
    splits = std::min((resident + blocks - 1) / blocks, std::max(p.G / kWarps, 1));
  }
  p.groups_per_split = (p.G + splits - 1) / splits;
  splits = (p.G + p.groups_per_split - 1) / p.groups_per_split;  // no empty split
  if (splits > 1) {
    p.partial = static_cast<float*>(workspace.empty(sizeof(float) * static_cast<size_t>(splits) * p.M * p.N));
    p.arrived = workspace.arrival_counters(blocks);
  }
  // kPrequant: launched with programmatic dependent launch (when enabled), so the weight loads of its first
  // iteration overlap the quant kernel's tail; it waits for that kernel before reading q.
  launch_kernel_smem(kernel, dim3(blocks, splits), dim3(kThreads), kSmem, stream, kPrequant && pdl_enabled(device),
                     p);
}

template <typename T, typename Out>
void dispatch_tiles(const Params& p, int device, cudaStream_t stream, Workspace& workspace) {
  // M <= 8: one token tile, 16 rows per block (the most blocks for the weight stream), x quantized in the
  // blocks or ahead. M > 8 (x always quantized ahead: small_m_quantizes_ahead): two token tiles, still 16
  // rows (a 32-row instantiation held 166-206 registers: one block per SM; 16-row blocks took 28672x4096
  // at M = 16 from 71.9 to 65.6 us, 24576x7168 from 96.6 to 85.4, H100 2026-11-26).
  if (p.M <= 8) {
    if (p.q != nullptr) return launch_variant<T, Out, 1, 1, true>(p, device, stream, workspace);
    return launch_variant<T, Out, 1, 1, false>(p, device, stream, workspace);
  }
  require(p.q != nullptr, "small_m_linear: M=", p.M, " > 8 needs x quantized ahead (small_m_quantizes_ahead)");
  return launch_variant<T, Out, 2, 1, true>(p, device, stream, workspace);
}

template <typename T>
void dispatch_out(bool int8, const Params& p, int device, cudaStream_t stream, Workspace& workspace) {
  if (int8) return dispatch_tiles<T, OutInt8>(p, device, stream, workspace);
  return dispatch_tiles<T, OutFp8E4M3>(p, device, stream, workspace);
}

}  // namespace small_m

bool small_m_quantizes_ahead(int64_t M, int64_t N, int64_t K) {
  using namespace small_m;
  const bool wide = std::min(N, K) >= kPrequantWide;
  const int64_t min_m = wide ? 1 : N * K >= (int64_t{1} << 23) ? kPrequantMinM : std::max<int64_t>(kPrequantMinM, 9);
  return M >= min_m;
}

void launch_small_m_linear(const SmallMLinearArgs& a, int device, cudaStream_t stream, Workspace& workspace) {
  using namespace small_m;
  Params p;
  p.x = a.x;
  p.x_stride_row = a.x_stride_row;
  p.w = static_cast<const uint8_t*>(a.weight);
  p.ws = a.weight_scale_inv;
  p.bias = a.bias;
  p.bias_kind = bias_kind(a.bias, a.bias_dtype);
  p.y = a.y;
  p.M = static_cast<int>(a.M);
  p.N = static_cast<int>(a.N);
  p.K = static_cast<int>(a.K);
  p.G = static_cast<int>(a.K / kGroup);
  p.eps = a.eps;
  p.ue8m0 = a.scale_ue8m0;
  p.groups_per_split = p.G;
  p.partial = nullptr;
  p.arrived = nullptr;
  p.q = static_cast<const uint8_t*>(a.q);
  p.qs = a.qs;
  const bool int8 = a.weight_dtype == DType::kInt8;
  switch (a.x_dtype) {
    case DType::kBFloat16: return dispatch_out<__nv_bfloat16>(int8, p, device, stream, workspace);
    case DType::kFloat16: return dispatch_out<__half>(int8, p, device, stream, workspace);
    default: return dispatch_out<float>(int8, p, device, stream, workspace);
  }
}

}  // namespace fp8linear
