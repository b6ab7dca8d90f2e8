// Per-token-group 8-bit quantization: the CUDA implementation of `fp8linear::per_token_group_quant_`.
//
// What it computes (DESIGN.md "Quantization semantics", bit for bit as fp8linear/reference.py):
//   for every row r of x [B, M, K] and group j of g consecutive elements (G = K / g groups per row):
//     amax = max(max|x[r, jg : jg+g]|, eps); scale = amax / QMAX (448 fp8 e4m3fn, 127 int8);
//     optionally scale = 2^ceil(log2 scale); q = x * (1 / scale), saturated to fp8 / rounded to int8.
//   A group holding a NaN or Inf gets scale NaN (UE8M0 byte 0xFF) and fp8 bytes 0x7F / int8 bytes 0.
// and where it writes (DESIGN.md "Scale layouts"):
//   q: contiguous [B, M, K]; s: fp32 at s[b*sb + m*sr + j*sc] for `row` and `col` (the strides come
//   from the tensor), or for `ue8m0_packed` byte j%4 of int32 word (b, m, j/4), the bytes of groups
//   >= G in a row's last word written as 0. Padding rows M..M_pad-1 are never touched.
//
// Thread-to-data mapping. A chunk is 16 bytes of input (8 bf16/fp16 or 4 fp32). A group of g elements is C =
// g / chunk chunks, owned by a sub-warp of TPG = min(C / 2, 32) adjacent lanes (at least 1); lane i loads the
// two adjacent chunks 2i and 2i + 1 (g = 256 fp32 too, whose 64 chunks fill a warp), so a lane handles 16
// bf16 elements and stores its 16 quantized bytes at once, and a warp's two LDG.128 read 1 KB of contiguous
// input between them. The group amax is a max over unsigned abs-bit patterns (exact, NaN-ordering; see
// common.cuh) reduced by log2(TPG) xor-shuffles inside the sub-warp; every lane then computes the same scale
// and quantizes its own chunks; lane 0 of the sub-warp writes the scale. Against one chunk per lane (the
// layout before a64c170), the shuffles, the scale and the index math run once per 16 elements instead of 8:
// 2-4% faster at every shape of scripts/kernel_microbench.sh (H100,
// docs/runs/2026-11-25-kernel-microbench-5-h100.md).
//
// Work: the flattened groups 0 .. B*M*G-1 (in memory order of q) are cut into tiles of one group per sub-warp
// of a block (256 threads: 256 / TPG groups per tile). Block b takes tiles b, b + grid, b + 2 grid, ... and
// handles kLoadsPerThread / (chunks per lane) of them per iteration (one: 2 x 16 bytes in flight per thread),
// loading all of them before reducing any. The grid gives every block one iteration once the tensor fills a
// resident wave and one tile each before that, so a decode-sized call (M <= 16) launches a few blocks doing
// one tile each (per_token_group_quant.cuh: the launch shape, and the persistent grid it beat).
//
// Launch: with programmatic dependent launch on sm_90+ (launch_utils.h launch_kernel): the grid may be
// scheduled while the kernel ahead of it in the stream finishes, and griddep_wait() at the top of the kernel
// holds every global access until that kernel's memory is visible. SGLang's kernels launch this way too; in
// CUDA-graph replay at M <= 128 they ran 1.07-1.50 us per launch against our 1.40-2.15 without it
// (bench_quant, 7f9eb48).
//
// Bytes moved per element: sizeof(x) read + 1 written + 4/g for the scale: about 3.03 B for bf16 ->
// fp8 at g = 128. Floor at the H100's 3.0 TB/s copy bandwidth (read + write): 4096 x 7168 bf16 moves
// 89 MB, about 30 us; 16384 x 7168 about 119 us.
//
// Build: torch.utils.cpp_extension via fp8linear/_build.py, for the device's own arch, no fast math.
// Torch-free: the launcher below takes pointers, sizes and strides (launchers.h QuantArgs); the op's torch
// glue (argument checks, the stream, quant_for_gemm's allocation) is in bindings.cpp.

#include <algorithm>
#include <cstdint>

#include <cuda_runtime.h>

#include "launch_utils.h"
#include "launchers.h"
#include "per_token_group_quant.cuh"

namespace fp8linear {

// ------------------------------------------------------------------------------------------------
// Host side: pick the instantiation, size the grid, launch on the given stream.
// ------------------------------------------------------------------------------------------------

template <typename T, typename Out, int kGroup, bool kPacked, bool kVec>
void launch(const QuantParams& p, int device, cudaStream_t stream) {
  const auto kernel = per_token_group_quant_kernel<T, Out, kGroup, kPacked, kVec>;
  static const int blocks_per_sm = [&] {
    int n = 0;
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0),
               "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    return n > 0 ? n : 1;
  }();
  const uint32_t wave = static_cast<uint32_t>(device_sm_count(device) * blocks_per_sm);
  const uint32_t grid = quant_grid<T, kGroup>(p.num_groups, wave);
  launch_kernel(kernel, dim3(grid), dim3(kThreads), stream, pdl_enabled(device), p);
}

template <typename T, typename Out, bool kPacked, bool kVec>
void dispatch_group(int64_t group_size, const QuantParams& p, int device, cudaStream_t stream) {
  switch (group_size) {
    case 16: return launch<T, Out, 16, kPacked, kVec>(p, device, stream);
    case 32: return launch<T, Out, 32, kPacked, kVec>(p, device, stream);
    case 64: return launch<T, Out, 64, kPacked, kVec>(p, device, stream);
    case 128: return launch<T, Out, 128, kPacked, kVec>(p, device, stream);
    case 256: return launch<T, Out, 256, kPacked, kVec>(p, device, stream);
    default: fail("per_token_group_quant_: group_size must be one of 16, 32, 64, 128, 256; got ", group_size);
  }
}

template <typename T, typename Out>
void dispatch_layout(bool packed, bool vec, int64_t group_size, const QuantParams& p, int device, cudaStream_t stream) {
  if (packed) {
    if constexpr (std::is_same_v<Out, OutFp8E4M3>) {
      return vec ? dispatch_group<T, Out, true, true>(group_size, p, device, stream)
                 : dispatch_group<T, Out, true, false>(group_size, p, device, stream);
    } else {
      fail("per_token_group_quant_: layout 'ue8m0_packed' is for fp8 output only; q is int8");
    }
  }
  return vec ? dispatch_group<T, Out, false, true>(group_size, p, device, stream)
             : dispatch_group<T, Out, false, false>(group_size, p, device, stream);
}

template <typename T>
void dispatch_output(DType q_dtype, bool packed, bool vec, int64_t group_size, const QuantParams& p, int device,
                     cudaStream_t stream) {
  if (q_dtype == DType::kFloat8E4M3) {
    return dispatch_layout<T, OutFp8E4M3>(packed, vec, group_size, p, device, stream);
  }
  return dispatch_layout<T, OutInt8>(packed, vec, group_size, p, device, stream);
}

void launch_per_token_group_quant(const QuantArgs& a, int device, cudaStream_t stream) {
  const int64_t G = a.cols / a.group_size;
  QuantParams p;
  p.x = a.x;
  p.q = static_cast<uint8_t*>(a.q);
  p.s = a.s;
  p.num_groups = static_cast<uint32_t>(a.batches * a.rows * G);
  p.groups_per_row = FastDivmod(static_cast<uint32_t>(G));
  p.rows = FastDivmod(static_cast<uint32_t>(a.rows));
  p.x_stride_batch = a.x_stride_batch;
  p.x_stride_row = a.x_stride_row;
  p.s_stride_batch = a.s_stride_batch;
  p.s_stride_row = a.s_stride_row;
  p.s_stride_col = a.s_stride_col;
  p.eps = a.eps;
  p.scale_ue8m0 = a.scale_ue8m0;
  p.q_aligned = aligned_to(p.q, 16);

  const int64_t elem = a.x_dtype == DType::kFloat32 ? 4 : 2;
  const bool vec = aligned_to(p.x, 16) && p.q_aligned && (p.x_stride_row * elem) % 16 == 0 &&
                   (p.x_stride_batch * elem) % 16 == 0;

  switch (a.x_dtype) {
    case DType::kBFloat16:
      return dispatch_output<__nv_bfloat16>(a.q_dtype, a.packed, vec, a.group_size, p, device, stream);
    case DType::kFloat16:
      return dispatch_output<__half>(a.q_dtype, a.packed, vec, a.group_size, p, device, stream);
    default:
      return dispatch_output<float>(a.q_dtype, a.packed, vec, a.group_size, p, device, stream);
  }
}

}  // namespace fp8linear
