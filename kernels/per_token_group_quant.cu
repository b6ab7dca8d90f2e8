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
// The kernel takes plain pointers, sizes and strides; the torch glue is the launcher at the bottom.

#include <algorithm>
#include <cstdint>
#include <tuple>

#include <cuda_runtime.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch_utils.h"
#include "per_token_group_quant.cuh"
#include "quant_ops.h"

namespace fp8linear {

// ------------------------------------------------------------------------------------------------
// Host side: pick the instantiation, size the grid, launch on the current stream.
// ------------------------------------------------------------------------------------------------

template <typename T, typename Out, int kGroup, bool kPacked, bool kVec>
void launch(const QuantParams& p, int device, cudaStream_t stream) {
  const auto kernel = per_token_group_quant_kernel<T, Out, kGroup, kPacked, kVec>;
  static const int blocks_per_sm = [&] {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0));
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
    default: TORCH_CHECK(false, "per_token_group_quant_: group_size must be one of 16, 32, 64, 128, 256; got ", group_size);
  }
}

template <typename T, typename Out>
void dispatch_layout(bool packed, bool vec, int64_t group_size, const QuantParams& p, int device, cudaStream_t stream) {
  if (packed) {
    if constexpr (std::is_same_v<Out, OutFp8E4M3>) {
      return vec ? dispatch_group<T, Out, true, true>(group_size, p, device, stream)
                 : dispatch_group<T, Out, true, false>(group_size, p, device, stream);
    } else {
      TORCH_CHECK(false, "per_token_group_quant_: layout 'ue8m0_packed' is for fp8 output only; q is int8");
    }
  }
  return vec ? dispatch_group<T, Out, false, true>(group_size, p, device, stream)
             : dispatch_group<T, Out, false, false>(group_size, p, device, stream);
}

template <typename T>
void dispatch_output(at::ScalarType q_dtype, bool packed, bool vec, int64_t group_size, const QuantParams& p,
                     int device, cudaStream_t stream) {
  if (q_dtype == at::ScalarType::Float8_e4m3fn) {
    return dispatch_layout<T, OutFp8E4M3>(packed, vec, group_size, p, device, stream);
  }
  return dispatch_layout<T, OutInt8>(packed, vec, group_size, p, device, stream);
}

// The CUDA kernel of the schema in fp8linear/ops.py:
//   per_token_group_quant_(Tensor x, Tensor(a!) q, Tensor(b!) s, int group_size, bool scale_ue8m0,
//                          float eps, str layout) -> ()
// The public wrapper (fp8linear.per_token_group_quant) has validated everything already; these
// checks only keep a direct call of the op from writing out of bounds, and cost a few branches.
void per_token_group_quant_cuda(const at::Tensor& x, at::Tensor& q, at::Tensor& s, int64_t group_size,
                                bool scale_ue8m0, double eps, c10::string_view layout) {
  const bool packed = layout == "ue8m0_packed";
  TORCH_CHECK(packed || layout == "row" || layout == "col",
              "per_token_group_quant_: layout must be 'row', 'col' or 'ue8m0_packed'; got '", layout, "'");
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "per_token_group_quant_: x must be [M, K] or [E, M, K]; got ", x.sizes());
  TORCH_CHECK(x.is_cuda() && q.device() == x.device() && s.device() == x.device(),
              "per_token_group_quant_: x, q and s must be on the same CUDA device; got ", x.device(), ", ",
              q.device(), ", ", s.device());
  const at::ScalarType x_dtype = x.scalar_type();
  TORCH_CHECK(x_dtype == at::ScalarType::BFloat16 || x_dtype == at::ScalarType::Half || x_dtype == at::ScalarType::Float,
              "per_token_group_quant_: x must be bfloat16, float16 or float32; got ", x_dtype);
  TORCH_CHECK(q.scalar_type() == at::ScalarType::Float8_e4m3fn || q.scalar_type() == at::ScalarType::Char,
              "per_token_group_quant_: q must be float8_e4m3fn or int8; got ", q.scalar_type());
  TORCH_CHECK(s.scalar_type() == (packed ? at::ScalarType::Int : at::ScalarType::Float),
              "per_token_group_quant_: s must be ", packed ? "int32" : "float32", " for layout '", layout, "'; got ",
              s.scalar_type());
  TORCH_CHECK(group_size == 16 || group_size == 32 || group_size == 64 || group_size == 128 || group_size == 256,
              "per_token_group_quant_: group_size must be one of 16, 32, 64, 128, 256; got ", group_size);
  const bool batched = x.dim() == 3;
  const int64_t B = batched ? x.size(0) : 1;
  const int64_t M = x.size(-2);
  const int64_t K = x.size(-1);
  TORCH_CHECK(K % group_size == 0, "per_token_group_quant_: K=", K, " must be divisible by group_size=", group_size);
  const int64_t G = K / group_size;
  TORCH_CHECK(q.sizes() == x.sizes() && q.is_contiguous(),
              "per_token_group_quant_: q must be contiguous with x's shape ", x.sizes(), "; got ", q.sizes(),
              " with strides ", q.strides());
  TORCH_CHECK(s.dim() == x.dim() && s.size(-2) == M && s.size(-1) == (packed ? (G + 3) / 4 : G) &&
                  (!batched || s.size(0) == B),
              "per_token_group_quant_: s has shape ", s.sizes(), ", which does not fit x of shape ", x.sizes(),
              " with group_size=", group_size, " and layout '", layout, "'");
  if (x.numel() == 0) return;
  TORCH_CHECK(x.stride(-1) == 1, "per_token_group_quant_: x's last dim must be contiguous; got strides ", x.strides());
  TORCH_CHECK(B * M * G < (int64_t{1} << 31), "per_token_group_quant_: at most 2^31 - 1 groups per call; got ",
              B * M * G);

  const c10::cuda::CUDAGuard guard(x.device());
  const int device = x.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device);

  QuantParams p;
  p.x = x.data_ptr();
  p.q = static_cast<uint8_t*>(q.data_ptr());
  p.s = s.data_ptr();
  p.num_groups = static_cast<uint32_t>(B * M * G);
  p.groups_per_row = FastDivmod(static_cast<uint32_t>(G));
  p.rows = FastDivmod(static_cast<uint32_t>(M));
  // Strides of size-1 dims never address anything: zero them so they cannot spoil the alignment test.
  p.x_stride_batch = (batched && B > 1) ? x.stride(0) : 0;
  p.x_stride_row = M > 1 ? x.stride(-2) : 0;
  p.s_stride_batch = (batched && B > 1) ? s.stride(0) : 0;
  p.s_stride_row = M > 1 ? s.stride(-2) : 0;
  p.s_stride_col = s.size(-1) > 1 ? s.stride(-1) : 0;
  p.eps = static_cast<float>(eps);  // round to nearest, as the reference's full_like(amax, eps)
  p.scale_ue8m0 = scale_ue8m0;
  p.q_aligned = aligned_to(p.q, 16);

  const int64_t elem = x.element_size();
  const bool vec = aligned_to(p.x, 16) && p.q_aligned && (p.x_stride_row * elem) % 16 == 0 &&
                   (p.x_stride_batch * elem) % 16 == 0;

  switch (x_dtype) {
    case at::ScalarType::BFloat16:
      return dispatch_output<__nv_bfloat16>(q.scalar_type(), packed, vec, group_size, p, device, stream);
    case at::ScalarType::Half:
      return dispatch_output<__half>(q.scalar_type(), packed, vec, group_size, p, device, stream);
    default:
      return dispatch_output<float>(q.scalar_type(), packed, vec, group_size, p, device, stream);
  }
}


// The allocating variant FP8Linear's forward calls: one op call instead of two allocations, a strided
// view, two slices and the out-variant from Python (host time per forward, docs/benchmarks.md).
//   quant_for_gemm(Tensor x, int group_size, ScalarType dtype, bool scale_ue8m0, float eps, str layout,
//                  int row_align) -> (Tensor q, Tensor s)
// x [M, K] -> q [M_pad, K] and s [M_pad, G or ceil(G/4)] in `layout` (fp8linear.layouts: `col` and
// `ue8m0_packed` with strides (1, ceil(M_pad/4)*4)), M_pad = ceil(M / row_align) * row_align. Rows
// M..M_pad-1 of q and s are allocated, never written: a GEMM that needs whole 4-row tiles reads them
// and its caller drops those output rows.
std::tuple<at::Tensor, at::Tensor> quant_for_gemm_cuda(const at::Tensor& x, int64_t group_size, at::ScalarType dtype,
                                                       bool scale_ue8m0, double eps, c10::string_view layout,
                                                       int64_t row_align) {
  TORCH_CHECK(x.dim() == 2, "quant_for_gemm: x must be [M, K]; got ", x.sizes());
  TORCH_CHECK(row_align >= 1, "quant_for_gemm: row_align must be >= 1; got ", row_align);
  TORCH_CHECK(group_size > 0 && x.size(1) % group_size == 0, "quant_for_gemm: K=", x.size(1),
              " must be divisible by group_size=", group_size);
  const bool packed = layout == "ue8m0_packed";
  const int64_t M = x.size(0), K = x.size(1), G = K / group_size;
  const int64_t M_pad = (M + row_align - 1) / row_align * row_align;
  at::Tensor q = at::empty({M_pad, K}, x.options().dtype(dtype));
  at::Tensor s;
  if (layout == "row") {
    s = at::empty({M_pad, G}, x.options().dtype(at::kFloat));
  } else {
    const int64_t cols = packed ? (G + 3) / 4 : G;
    const int64_t rows = (M_pad + 3) / 4 * 4;  // fp8linear.layouts.tma_aligned_rows
    s = at::empty({cols * rows}, x.options().dtype(packed ? at::kInt : at::kFloat)).as_strided({M_pad, cols}, {1, rows});
  }
  if (M == 0) return {q, s};
  at::Tensor q_rows = M_pad == M ? q : q.narrow(0, 0, M);
  at::Tensor s_rows = M_pad == M ? s : s.narrow(0, 0, M);
  per_token_group_quant_cuda(x, q_rows, s_rows, group_size, scale_ue8m0 || packed, eps, layout);
  return {q, s};
}

}  // namespace fp8linear

TORCH_LIBRARY_IMPL(fp8linear, CUDA, m) {
  m.impl("per_token_group_quant_", &fp8linear::per_token_group_quant_cuda);
  m.impl("quant_for_gemm", &fp8linear::quant_for_gemm_cuda);
}
