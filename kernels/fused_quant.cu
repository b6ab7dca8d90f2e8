// Fused prologues of the quantization: the CUDA implementations of `fp8linear::silu_and_mul_quant_` and
// `fp8linear::rmsnorm_quant_` (schemas in fp8linear/fused.py).
//
// What they compute, bit for bit as fp8linear/fused.py's references (its docstring is the spec):
//   silu_and_mul: x [M, 2I] = [gate | up] -> a = round_T(round_T(g / (1 + exp_fp32(-g))) * u) (torch's
//     F.silu(g) * u in T, two roundings), then a is quantized per group of g elements exactly as
//     DESIGN.md "Quantization semantics" (common.cuh).
//   rmsnorm: x [M, H], weight [H] -> y = round_T(w * round_T(x * r)), r = 1 / sqrt(ss / H + rms_eps)
//     with ss the sum of squares in a fixed order (below), then y quantized per group; y itself is
//     written too when asked (the residual path).
// Scales go to `row`, `col` or `ue8m0_packed` (DESIGN.md "Scale layouts"), as per_token_group_quant.cu.
//
// Thread-to-data mapping. A chunk is 8 consecutive elements of T (16 bytes of bf16/fp16, 32 of fp32).
// rmsnorm: each chunk is owned by one lane; a group of g elements is TPG = g / 8 adjacent lanes (2 .. 32)
// of one warp, whose amax is a max over abs-bit patterns reduced by log2(TPG) xor-shuffles (exact, as in
// the main kernel). silu_and_mul: a lane owns a slot of 2 consecutive chunks, so a group is g / 16 lanes
// (1 .. 16), reduced the same way.
//
// silu_and_mul: the slots of q (M * I / 16 of them, in memory order) are spread over 256-thread blocks; each
// thread loads the gate and up chunks of one slot (64 bytes in flight per thread for bf16) before computing.
// The grid is not capped at a resident wave: every block runs one iteration. The kernel is issue-bound: two
// chunks per slot (once per slot: indices, the group's shuffles and its scale; one 16-byte store) took 109.7
// us at M = 4096, I = 14336 against 121.9 for one chunk per slot and two slots per thread. Bytes per output
// element: 2 sizeof(T) read + 1 written + 4/g of scale: 5.03 for bf16 at g = 128. Floor at 3.0 TB/s: M =
// 4096, I = 14336 moves 296 MB, about 99 us.
// Arithmetic: the exp (fused_quant.cuh) rounds to an integer with a shifter add and scales by an
// integer add to the exponent field, not FRND + F2I and two multiplies: the same bits (pinned by
// tests/test_fused_cpu.py test_kernel_fast_exp_is_exp_fp32), four fewer instructions per element, two
// of them on the conversion pipe (16 per clock per SM on sm_90, an eighth of the FP32 rate). The IEEE
// division stays: a reciprocal then a multiply (g * rcp(1 + e)) moves the fp16 silu of a common gate
// (-2.7246) off torch's CPU silu, and bit-exactness with the unfused Hugging Face activation needs it.
// For bf16/fp16 inputs the exp's reduction and polynomial run as FMAs (kSiluFma): other fp32 bits
// at a few hundred of the 65536 inputs, the same silu once rounded to the input dtype at all of them
// (test_kernel_fma_exp_gives_the_reference_silu_for_every_16_bit_input), nine fewer instructions per
// element; scripts/kernel_microbench.sh timed 120.5 against 133.2 us at M = 4096, I = 14336 (H100).
//
// rmsnorm: one 256-thread block per row; lane j holds chunks j, j + 256, ... (at most 8: H <= 16384) in
// registers with the weight's. Pass 1: each lane adds its squares in order (fp32), a butterfly of
// xor-shuffles (16, 8, 4, 2, 1) sums each warp, and every thread adds the 8 warp sums as a tree
// (w + w+4, + w+2, + w+1) from shared memory: the order fused.sum_of_squares_fixed_order reproduces.
// Pass 2 normalizes, rounds, quantizes and stores from the registers. Bytes per element: sizeof(T) read
// + 1 written (+ sizeof(T) for y) + the weight (from L2).
//
// Build: with the other kernels/*.cu into one library (fp8linear/_build.py), no fast math. Torch-free: the
// launchers at the bottom take pointers, sizes and strides (launchers.h); the ops' torch glue (argument
// checks, the stream) is in bindings.cpp.

#include <algorithm>
#include <cstdint>

#include <cuda_runtime.h>

#include "common.cuh"
#include "fused_quant.cuh"
#include "launch_utils.h"
#include "launchers.h"
#include "silu_and_mul_quant.cuh"

namespace fp8linear {
namespace fused {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;

struct RmsParams {
  // pointers
  const void* x;       // T [M, H], element (m, k) at m * x_stride_row + k
  const void* weight;  // T [H], contiguous
  uint8_t* q;          // fp8 / int8 bytes, contiguous [M, H]
  void* normed;        // T [M, H] contiguous, or nullptr
  ScaleOut s;
  // sizes
  uint32_t H;
  uint32_t chunks;  // H / 8
  int tpg, tpg_log2;
  // strides (elements of x)
  int64_t x_stride_row;
  // semantics
  float rms_eps;
  float eps;
  bool scale_ue8m0;
  bool vec;              // x, its row stride and weight allow 16-byte loads
  bool q_aligned;        // q 8-byte aligned
  bool normed_aligned;   // normed 16-byte aligned
};

template <typename T, typename Out, int kIters, bool kPacked>
__global__ void __launch_bounds__(kThreads) rmsnorm_quant_kernel(const RmsParams p) {
  __shared__ float warp_sums[kWarps];
  const uint32_t m = blockIdx.x;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const T* __restrict__ xr = static_cast<const T*>(p.x) + static_cast<int64_t>(m) * p.x_stride_row;
  const T* __restrict__ w = static_cast<const T*>(p.weight);

  Vec8<T> xv[kIters], wv[kIters];
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const uint32_t c = it * kThreads + threadIdx.x;
    xv[it] = wv[it] = zero8<T>();
    if (c < p.chunks) {
      if (p.vec) {
        xv[it] = load8<T, true>(xr + c * kChunk);
        wv[it] = load8<T, true>(w + c * kChunk);
      } else {
        xv[it] = load8<T, false>(xr + c * kChunk);
        wv[it] = load8<T, false>(w + c * kChunk);
      }
    }
  }

  // Pass 1: the sum of squares in the order of fused.sum_of_squares_fixed_order. Absent chunks are
  // zeros, and acc + 0 * 0 == acc exactly, so they change nothing (the reference pads the same way).
  float acc = 0.0f;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    float f[kChunk];
    to_float8(xv[it], f);
#pragma unroll
    for (int k = 0; k < kChunk; ++k) acc = __fadd_rn(acc, __fmul_rn(f[k], f[k]));
  }
  // Butterfly: lane j adds lane j ^ offset; a + b == b + a, so both lanes of a pair hold the same sum
  // and lane j < offset holds the reference's acc[j] + acc[j + offset].
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    acc = __fadd_rn(acc, __shfl_xor_sync(0xFFFFFFFFu, acc, offset));
  }
  if (lane == 0) warp_sums[warp] = acc;
  __syncthreads();
  static_assert(kWarps == 8, "the fixed summation order has 8 warp sums");
  float s4[4], s2[2];
#pragma unroll
  for (int j = 0; j < 4; ++j) s4[j] = __fadd_rn(warp_sums[j], warp_sums[j + 4]);
#pragma unroll
  for (int j = 0; j < 2; ++j) s2[j] = __fadd_rn(s4[j], s4[j + 2]);
  const float ss = __fadd_rn(s2[0], s2[1]);
  const float var = __fdiv_rn(ss, static_cast<float>(p.H));
  const float r = __frcp_rn(__fsqrt_rn(__fadd_rn(var, p.rms_eps)));  // IEEE 1 / sqrt, not rsqrtf

  // Pass 2: normalize, round, quantize, store.
  const uint32_t lane_in_group = threadIdx.x & (p.tpg - 1);
  const int64_t row_offset = static_cast<int64_t>(m) * p.H;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const uint32_t first = it * kThreads;
    if (first + warp * kWarpSize >= p.chunks) break;  // warp-uniform, and so are later iterations
    const uint32_t c = first + threadIdx.x;

    float f[kChunk], wf[kChunk], h[kChunk], y[kChunk];
    to_float8(xv[it], f);
    to_float8(wv[it], wf);
#pragma unroll
    for (int k = 0; k < kChunk; ++k) h[k] = __fmul_rn(f[k], r);
    to_float8(Round8<T>::apply(h), h);  // hidden.to(input_dtype)
#pragma unroll
    for (int k = 0; k < kChunk; ++k) y[k] = __fmul_rn(wf[k], h[k]);
    const Vec8<T> yv = Round8<T>::apply(y);  // weight * hidden, in the input dtype

    const uint32_t amax_bits = group_max(abs_max_bits8(yv), p.tpg);
    const GroupScale gs = group_scale<T>(amax_bits, p.eps, Out::kQmax, p.scale_ue8m0);
    if (c >= p.chunks) continue;

    to_float8(yv, y);
    uint32_t qw[2];
    quantize_chunk<Out, kChunk>(y, gs.inv, gs.nonfinite, qw);
    store_q8(p.q + row_offset + static_cast<int64_t>(c) * kChunk, qw, p.q_aligned);
    if (p.normed != nullptr) {
      store8<T>(static_cast<T*>(p.normed) + row_offset + static_cast<int64_t>(c) * kChunk, yv, p.normed_aligned);
    }
    if (lane_in_group == 0) store_scale<kPacked>(p.s, m, c >> p.tpg_log2, gs);
  }
}

// ------------------------------------------------------------------------------------------------
// Host side: the instantiation, the grid, a launch on the given stream.
// ------------------------------------------------------------------------------------------------

template <typename T, typename Out, bool kPacked>
void launch_silu(const SiluParams& p, cudaStream_t stream) {
  silu_and_mul_quant_kernel<T, Out, kPacked><<<silu_grid(p.num_slots), kSiluThreads, 0, stream>>>(p);
  check_cuda(cudaGetLastError(), "silu_and_mul_quant_ launch");
}

template <typename T, typename Out, int kIters, bool kPacked>
void launch_rms_iters(const RmsParams& p, uint32_t rows, cudaStream_t stream) {
  rmsnorm_quant_kernel<T, Out, kIters, kPacked><<<rows, kThreads, 0, stream>>>(p);
  check_cuda(cudaGetLastError(), "rmsnorm_quant_ launch");
}

template <typename T, typename Out, bool kPacked>
void launch_rms(const RmsParams& p, uint32_t rows, cudaStream_t stream) {
  const uint32_t iters = ceil_div<uint32_t>(p.chunks, kThreads);
  if (iters <= 1) return launch_rms_iters<T, Out, 1, kPacked>(p, rows, stream);
  if (iters <= 2) return launch_rms_iters<T, Out, 2, kPacked>(p, rows, stream);
  if (iters <= 4) return launch_rms_iters<T, Out, 4, kPacked>(p, rows, stream);
  require(iters <= 8, "rmsnorm_quant_: H=", p.H, " is wider than 16384");
  return launch_rms_iters<T, Out, 8, kPacked>(p, rows, stream);
}

template <typename T>
struct Tag {
  using type = T;
};

// Dispatch on (input dtype, output dtype, packed): Launch<T, Out, kPacked>::run(p, args...).
template <template <typename, typename, bool> class Launch, typename Params, typename... Args>
void dispatch(DType x_dtype, DType q_dtype, bool packed, const Params& p, Args... args) {
  auto by_out = [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (q_dtype == DType::kFloat8E4M3) {
      if (packed) return Launch<T, OutFp8E4M3, true>::run(p, args...);
      return Launch<T, OutFp8E4M3, false>::run(p, args...);
    }
    require(!packed, "layout 'ue8m0_packed' is for fp8 output only; q is int8");
    return Launch<T, OutInt8, false>::run(p, args...);
  };
  switch (x_dtype) {
    case DType::kBFloat16: return by_out(Tag<__nv_bfloat16>{});
    case DType::kFloat16: return by_out(Tag<__half>{});
    default: return by_out(Tag<float>{});
  }
}

template <typename T, typename Out, bool kPacked>
struct SiluLaunch {
  static void run(const SiluParams& p, cudaStream_t stream) { launch_silu<T, Out, kPacked>(p, stream); }
};

template <typename T, typename Out, bool kPacked>
struct RmsLaunch {
  static void run(const RmsParams& p, uint32_t rows, cudaStream_t stream) { launch_rms<T, Out, kPacked>(p, rows, stream); }
};

ScaleOut scale_out(const ScaleArgs& s, int64_t G) {
  ScaleOut out;
  out.s = s.s;
  out.stride_row = s.stride_row;
  out.stride_col = s.stride_col;
  out.groups = static_cast<uint32_t>(G);
  return out;
}

int64_t element_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

}  // namespace
}  // namespace fused

void launch_silu_and_mul_quant(const SiluAndMulQuantArgs& a, cudaStream_t stream) {
  using namespace fused;
  SiluParams p;
  p.x = a.x;
  p.q = static_cast<uint8_t*>(a.q);
  p.s = scale_out(a.s, a.cols / a.group_size);
  silu_set_sizes(p, a.rows, a.cols, a.group_size);
  p.x_stride_row = a.x_stride_row;
  p.eps = a.eps;
  p.scale_ue8m0 = a.scale_ue8m0;
  const int64_t elem = element_size(a.x_dtype);
  p.vec = aligned_to(p.x, 16) && (p.x_stride_row * elem) % 16 == 0 && (a.cols * elem) % 16 == 0;
  p.q_aligned = aligned_to(p.q, kSiluSlotElems);  // q is contiguous: every slot is then aligned
  dispatch<SiluLaunch>(a.x_dtype, a.q_dtype, a.packed, p, stream);
}

void launch_rmsnorm_quant(const RmsNormQuantArgs& a, cudaStream_t stream) {
  using namespace fused;
  RmsParams p;
  p.x = a.x;
  p.weight = a.weight;
  p.q = static_cast<uint8_t*>(a.q);
  p.normed = a.normed;
  p.s = scale_out(a.s, a.cols / a.group_size);
  p.H = static_cast<uint32_t>(a.cols);
  p.chunks = static_cast<uint32_t>(a.cols / kChunk);
  p.tpg = static_cast<int>(a.group_size / kChunk);
  p.tpg_log2 = ceil_log2(static_cast<uint64_t>(p.tpg));
  p.x_stride_row = a.x_stride_row;
  p.rms_eps = a.rms_eps;
  p.eps = a.eps;
  p.scale_ue8m0 = a.scale_ue8m0;
  const int64_t elem = element_size(a.x_dtype);
  p.vec = aligned_to(p.x, 16) && (p.x_stride_row * elem) % 16 == 0 && aligned_to(p.weight, 16);
  p.q_aligned = aligned_to(p.q, 8);
  p.normed_aligned = p.normed != nullptr && aligned_to(p.normed, 16);
  dispatch<RmsLaunch>(a.x_dtype, a.q_dtype, a.packed, p, static_cast<uint32_t>(a.rows), stream);
}

}  // namespace fp8linear
