// A C++ launch path for DeepGEMM's legacy SM90 FP8 GEMM (fp8linear/backends/deepgemm.py): `fp8linear::deepgemm_gemm`
// on quantized operands, and `fp8linear::deepgemm_linear`, which quantizes x first in the same op call.
//
// Why: DeepGEMM's legacy API (`deep_gemm.gemm_fp8_fp8_bf16_nt`, the sgl-kernel 0.1-0.2 build) launches its
// JIT-compiled kernel from Python. Per call it builds four TMA descriptors and a launch config through
// cuda-python, sorts and formats a dict of template keys, and allocates an empty tensor. An eager FP8Linear
// forward through it cost 127-133 us of host time at M <= 512 on the lent H100's host, against 45-51 us with
// this launch (two op calls; one call: 35 us against 116 on another machine instance) and 20-28 us for a
// bf16 F.linear (scripts/profile_linear.py, docs/benchmarks.md): eager layers were host-bound up to M of a
// few thousand.
//
// What runs here is DeepGEMM's own compiled kernel, unchanged: fp8linear.backends.deepgemm lets DeepGEMM
// compile, tune and run the first call of each (M, N, K), then reads back the kernel handle (a CUkernel
// from cuLibraryLoadFromFile) and the tile configuration DeepGEMM chose, and passes them to this op. The op
// rebuilds the launch exactly as deep_gemm/jit_kernels/runtime.py does (FP8GemmRuntime.launch and the
// make_2d_tma_*_desc helpers), so its output is bit for bit DeepGEMM's (tests/test_deepgemm_launch.py).
//
// The kernel's parameters (fp8_gemm_kernel in deep_gemm/include/deep_gemm/fp8_gemm.cuh):
//   (bf16* gmem_d, float* scales_b, int* grouped_layout, uint32_t shape_m,
//    CUtensorMap a, CUtensorMap b, CUtensorMap scales_a, CUtensorMap d)     the maps by value (__grid_constant__)
// N, K, the tile sizes, stages and multicast are template parameters baked into the kernel handle.
// Launch: grid = num_sms persistent blocks, 128 TMA threads + 128 per math warpgroup (1 for BLOCK_M 64,
// else 2), the dynamic shared memory DeepGEMM computed, a cluster of `multicast` blocks along x.
//
// The driver API (tensor maps, CUkernel launch) is reached through cudaGetDriverEntryPointByVersion
// (kernels/tensor_map.h), so the extension links no libcuda.

#include <cstdint>
#include <mutex>

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch_utils.h"
#include "quant_ops.h"
#include "tensor_map.h"

namespace fp8linear {
namespace deepgemm {

constexpr int64_t kBlockK = 128;            // DeepGEMM's K tile = the scale group
constexpr int kTmaThreads = 128;            // one producer warpgroup
constexpr int kMathThreadsPerGroup = 128;   // per consumer warpgroup
constexpr int64_t kMaxSmemBytes = 232448;   // SM90's opt-in maximum (DeepGEMM's sm90_capacity)

constexpr const char* kOp = "deepgemm_gemm";
constexpr const char* kRemedy = "update the NVIDIA driver or use backend='cublas'";

// The launch entry points this file needs beyond kernels/tensor_map.h's, resolved once per process.
struct Driver {
  PFN_cuLaunchKernelEx_v11060 launch_ex = nullptr;
  PFN_cuKernelSetAttribute_v12000 kernel_set_attribute = nullptr;
};

const Driver& driver() {
  static Driver d;
  static std::once_flag once;
  std::call_once(once, [] {
    d.launch_ex = driver_entry_point<PFN_cuLaunchKernelEx_v11060>("cuLaunchKernelEx", 11060, kOp, kRemedy);
    d.kernel_set_attribute =
        driver_entry_point<PFN_cuKernelSetAttribute_v12000>("cuKernelSetAttribute", 12000, kOp, kRemedy);
  });
  return d;
}

// A 2-D tiled TMA descriptor as DeepGEMM's runtime builds them (tensor_map.h's settings are DeepGEMM's).
CUtensorMap tensor_map(CUtensorMapDataType type, void* base, uint64_t inner, uint64_t outer, uint64_t stride_bytes,
                       uint32_t box_inner, uint32_t box_outer, CUtensorMapSwizzle swizzle) {
  return tensor_map_2d(kOp, type, base, inner, outer, stride_bytes, box_inner, box_outer, swizzle);
}

CUtensorMapSwizzle swizzle_of(int64_t bytes) {
  switch (bytes) {
    case 0: return CU_TENSOR_MAP_SWIZZLE_NONE;
    case 32: return CU_TENSOR_MAP_SWIZZLE_32B;
    case 64: return CU_TENSOR_MAP_SWIZZLE_64B;
    case 128: return CU_TENSOR_MAP_SWIZZLE_128B;
    default: TORCH_CHECK(false, "deepgemm_gemm: swizzle_d must be 0, 32, 64 or 128 (bytes); got ", bytes);
  }
}

// The schema (fp8linear/backends/deepgemm.py):
//   deepgemm_gemm(Tensor q, Tensor s, Tensor weight, Tensor weight_scale_inv, int kernel, int num_sms,
//                 int block_m, int block_n, int smem_size, int swizzle_d, int multicast) -> Tensor
// q fp8 [M, K] contiguous; s fp32 [M, K/128] with strides (1, ceil(M/4)*4) (the `col` layout); weight fp8
// [N, K] contiguous; weight_scale_inv fp32 [ceil(N/128), K/128] contiguous -> y bf16 [M, N].
// `kernel` and the tile configuration must be those DeepGEMM compiled for this N and K: the Python side
// takes them from DeepGEMM itself; the checks below keep a wrong call from reading or writing out of bounds
// through the tensor maps, not from running a kernel built for another shape.
at::Tensor deepgemm_gemm_cuda(const at::Tensor& q, const at::Tensor& s, const at::Tensor& weight,
                              const at::Tensor& weight_scale_inv, int64_t kernel, int64_t num_sms, int64_t block_m,
                              int64_t block_n, int64_t smem_size, int64_t swizzle_d, int64_t multicast) {
  TORCH_CHECK(q.dim() == 2 && weight.dim() == 2, "deepgemm_gemm: q and weight must be 2-D; got ", q.sizes(), " and ",
              weight.sizes());
  const int64_t M = q.size(0), K = q.size(1), N = weight.size(0);
  const int64_t G = K / kBlockK;
  TORCH_CHECK(q.scalar_type() == at::ScalarType::Float8_e4m3fn && weight.scalar_type() == at::ScalarType::Float8_e4m3fn,
              "deepgemm_gemm: q and weight must be float8_e4m3fn; got ", q.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(s.scalar_type() == at::kFloat && weight_scale_inv.scalar_type() == at::kFloat,
              "deepgemm_gemm: s and weight_scale_inv must be float32; got ", s.scalar_type(), " and ",
              weight_scale_inv.scalar_type());
  TORCH_CHECK(q.is_cuda() && s.device() == q.device() && weight.device() == q.device() &&
                  weight_scale_inv.device() == q.device(),
              "deepgemm_gemm: every tensor must be on the same CUDA device; got q on ", q.device(), ", s on ",
              s.device(), ", weight on ", weight.device(), ", weight_scale_inv on ", weight_scale_inv.device());
  TORCH_CHECK(weight.size(1) == K, "deepgemm_gemm: weight must be [N, K] with K = q.size(1) = ", K, "; got ",
              weight.sizes());
  TORCH_CHECK(K > 0 && K % kBlockK == 0 && N > 0 && N % 64 == 0,
              "deepgemm_gemm: needs K % 128 == 0 and N % 64 == 0; got N=", N, ", K=", K);
  TORCH_CHECK(M > 0 && M < (int64_t{1} << 31), "deepgemm_gemm: needs 0 < M < 2^31; got M=", M);
  TORCH_CHECK(q.is_contiguous() && weight.is_contiguous() && weight_scale_inv.is_contiguous(),
              "deepgemm_gemm: q, weight and weight_scale_inv must be contiguous");
  TORCH_CHECK(weight_scale_inv.dim() == 2 && weight_scale_inv.size(0) == (N + 127) / 128 && weight_scale_inv.size(1) == G,
              "deepgemm_gemm: weight_scale_inv must be [", (N + 127) / 128, ", ", G, "]; got ", weight_scale_inv.sizes());
  const int64_t m_aligned = (M + 3) / 4 * 4;  // TMA needs 16-byte column strides: rows padded to 4 floats
  TORCH_CHECK(s.dim() == 2 && s.size(0) == M && s.size(1) == G && (M == 1 || s.stride(0) == 1) &&
                  (G == 1 || s.stride(1) == m_aligned),
              "deepgemm_gemm: s must be [M, K/128] = [", M, ", ", G, "] with strides (1, ", m_aligned,
              ") (the 'col' layout); got ", s.sizes(), " with strides ", s.strides());
  TORCH_CHECK(s.storage().nbytes() >= static_cast<size_t>((s.storage_offset() + G * m_aligned) * 4),
              "deepgemm_gemm: s's storage must hold ", G, " columns of ", m_aligned, " rows (the padded 'col' layout)");
  TORCH_CHECK(aligned_to(q.data_ptr(), 16) && aligned_to(s.data_ptr(), 16) && aligned_to(weight.data_ptr(), 16),
              "deepgemm_gemm: q, s and weight must start on 16-byte boundaries (TMA)");
  TORCH_CHECK(kernel != 0, "deepgemm_gemm: kernel must be a CUkernel handle from DeepGEMM; got 0");
  TORCH_CHECK(block_m == 64 || block_m == 128 || block_m == 256, "deepgemm_gemm: block_m must be 64, 128 or 256; got ",
              block_m);
  TORCH_CHECK(block_n >= 16 && block_n <= 256 && block_n % 8 == 0,
              "deepgemm_gemm: block_n must be a multiple of 8 in [16, 256]; got ", block_n);
  TORCH_CHECK(multicast == 1 || multicast == 2, "deepgemm_gemm: multicast must be 1 or 2; got ", multicast);
  TORCH_CHECK(smem_size > 0 && smem_size <= kMaxSmemBytes, "deepgemm_gemm: smem_size must be in (0, ", kMaxSmemBytes,
              "]; got ", smem_size);
  const CUtensorMapSwizzle swizzle = swizzle_of(swizzle_d);

  const c10::cuda::CUDAGuard guard(q.device());
  const int device = q.get_device();
  TORCH_CHECK(num_sms > 0 && num_sms <= device_sm_count(device) && num_sms % multicast == 0,
              "deepgemm_gemm: num_sms must be a multiple of multicast=", multicast, " in [1, ",
              device_sm_count(device), "]; got ", num_sms);
  at::Tensor y = at::empty({M, N}, q.options().dtype(at::kBFloat16));

  // The four maps, as deep_gemm/jit_kernels/runtime.py builds them (row-major A and D, "column-major" B,
  // i.e. [N, K] with K contiguous, and the scales of A as K/128 columns of m_aligned floats).
  const uint32_t box_d_inner = static_cast<uint32_t>(swizzle_d == 0 ? block_n : swizzle_d / 2);
  CUtensorMap map_a = tensor_map(CU_TENSOR_MAP_DATA_TYPE_UINT8, q.data_ptr(), K, M, K, kBlockK, block_m,
                                 CU_TENSOR_MAP_SWIZZLE_128B);
  CUtensorMap map_b = tensor_map(CU_TENSOR_MAP_DATA_TYPE_UINT8, weight.data_ptr(), K, N, K, kBlockK, block_n,
                                 CU_TENSOR_MAP_SWIZZLE_128B);
  CUtensorMap map_scales_a = tensor_map(CU_TENSOR_MAP_DATA_TYPE_FLOAT32, s.data_ptr(), m_aligned, G, m_aligned * 4,
                                        block_m, 1, CU_TENSOR_MAP_SWIZZLE_NONE);
  CUtensorMap map_d = tensor_map(CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, y.data_ptr(), N, M, N * 2, box_d_inner, block_m,
                                 swizzle);

  const Driver& drv = driver();
  const auto handle = reinterpret_cast<CUkernel>(static_cast<uintptr_t>(kernel));
  check_driver(drv.kernel_set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, static_cast<int>(smem_size),
                                        handle, static_cast<CUdevice>(device)),
               kOp, "cuKernelSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)");

  CUlaunchAttribute cluster = {};
  cluster.id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
  cluster.value.clusterDim.x = static_cast<unsigned>(multicast);
  cluster.value.clusterDim.y = 1;
  cluster.value.clusterDim.z = 1;
  CUlaunchConfig config = {};
  config.gridDimX = static_cast<unsigned>(num_sms);
  config.gridDimY = 1;
  config.gridDimZ = 1;
  config.blockDimX = kTmaThreads + (block_m == 64 ? 1 : 2) * kMathThreadsPerGroup;
  config.blockDimY = 1;
  config.blockDimZ = 1;
  config.sharedMemBytes = static_cast<unsigned>(smem_size);
  config.hStream = c10::cuda::getCurrentCUDAStream(device).stream();
  config.attrs = &cluster;
  config.numAttrs = 1;

  void* gmem_d = y.data_ptr();
  void* scales_b = weight_scale_inv.data_ptr();
  void* grouped_layout = nullptr;  // read only by the grouped GEMM types
  uint32_t shape_m = static_cast<uint32_t>(M);
  void* args[] = {&gmem_d, &scales_b, &grouped_layout, &shape_m, &map_a, &map_b, &map_scales_a, &map_d};
  check_driver(drv.launch_ex(&config, reinterpret_cast<CUfunction>(handle), args, nullptr), kOp, "cuLaunchKernelEx");
  return y;
}

// The whole forward of an FP8Linear served by DeepGEMM in one op call (fp8linear/backends/deepgemm.py):
//   deepgemm_linear(Tensor x, Tensor weight, Tensor weight_scale_inv, bool scale_ue8m0, float eps, int kernel,
//                   int num_sms, int block_m, int block_n, int smem_size, int swizzle_d, int multicast) -> Tensor
// x [M, K] (bf16, fp16 or fp32, unit stride along K) is quantized per 1x128 group into the `col` layout, exactly
// as fp8linear::quant_for_gemm does, then multiplied as deepgemm_gemm does -> y bf16 [M, N]. One op call
// instead of two: on the lent H100's host each op call from Python costs 10-20 us.
at::Tensor deepgemm_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale_inv,
                                bool scale_ue8m0, double eps, int64_t kernel, int64_t num_sms, int64_t block_m,
                                int64_t block_n, int64_t smem_size, int64_t swizzle_d, int64_t multicast) {
  const auto [q, s] = quant_for_gemm_cuda(x, kBlockK, at::ScalarType::Float8_e4m3fn, scale_ue8m0, eps, "col", 1);
  return deepgemm_gemm_cuda(q, s, weight, weight_scale_inv, kernel, num_sms, block_m, block_n, smem_size, swizzle_d,
                            multicast);
}

}  // namespace deepgemm
}  // namespace fp8linear

TORCH_LIBRARY_IMPL(fp8linear, CUDA, m) {
  m.impl("deepgemm_gemm", &fp8linear::deepgemm::deepgemm_gemm_cuda);
  m.impl("deepgemm_linear", &fp8linear::deepgemm::deepgemm_linear_cuda);
}
