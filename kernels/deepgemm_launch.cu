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
// (kernels/tensor_map.h), so the extension links no libcuda. Torch-free: the launcher takes pointers, sizes and
// the tile configuration (launchers.h DeepGemmArgs); the ops' tensor checks, y's allocation and the
// quantization of deepgemm_linear are in bindings.cpp.

#include <cstdint>
#include <mutex>

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include "launch_utils.h"
#include "launchers.h"
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
CUtensorMap tensor_map(CUtensorMapDataType type, const void* base, uint64_t inner, uint64_t outer, uint64_t stride_bytes,
                       uint32_t box_inner, uint32_t box_outer, CUtensorMapSwizzle swizzle) {
  return tensor_map_2d(kOp, type, base, inner, outer, stride_bytes, box_inner, box_outer, swizzle);
}

CUtensorMapSwizzle swizzle_of(int64_t bytes) {
  switch (bytes) {
    case 0: return CU_TENSOR_MAP_SWIZZLE_NONE;
    case 32: return CU_TENSOR_MAP_SWIZZLE_32B;
    case 64: return CU_TENSOR_MAP_SWIZZLE_64B;
    case 128: return CU_TENSOR_MAP_SWIZZLE_128B;
    default: fail("deepgemm_gemm: swizzle_d must be 0, 32, 64 or 128 (bytes); got ", bytes);
  }
}

}  // namespace deepgemm

// The launch of the file's head on operands bindings.cpp checked (deepgemm_gemm's schema there). `kernel` and the
// tile configuration must be those DeepGEMM compiled for this N and K: the Python side takes them from DeepGEMM
// itself; the checks below keep a wrong call from reading or writing out of bounds through the tensor maps, not
// from running a kernel built for another shape.
void launch_deepgemm_gemm(const DeepGemmArgs& a, int device, cudaStream_t stream) {
  using namespace deepgemm;
  require(a.kernel != 0, "deepgemm_gemm: kernel must be a CUkernel handle from DeepGEMM; got 0");
  require(a.block_m == 64 || a.block_m == 128 || a.block_m == 256, "deepgemm_gemm: block_m must be 64, 128 or 256; got ",
          a.block_m);
  require(a.block_n >= 16 && a.block_n <= 256 && a.block_n % 8 == 0,
          "deepgemm_gemm: block_n must be a multiple of 8 in [16, 256]; got ", a.block_n);
  require(a.multicast == 1 || a.multicast == 2, "deepgemm_gemm: multicast must be 1 or 2; got ", a.multicast);
  require(a.smem_size > 0 && a.smem_size <= kMaxSmemBytes, "deepgemm_gemm: smem_size must be in (0, ", kMaxSmemBytes,
          "]; got ", a.smem_size);
  const CUtensorMapSwizzle swizzle = swizzle_of(a.swizzle_d);
  require(a.num_sms > 0 && a.num_sms <= device_sm_count(device) && a.num_sms % a.multicast == 0,
          "deepgemm_gemm: num_sms must be a multiple of multicast=", a.multicast, " in [1, ", device_sm_count(device),
          "]; got ", a.num_sms);
  const int64_t M = a.M, N = a.N, K = a.K, G = K / kBlockK;
  const int64_t m_aligned = (M + 3) / 4 * 4;  // TMA needs 16-byte column strides: rows padded to 4 floats

  // The four maps, as deep_gemm/jit_kernels/runtime.py builds them (row-major A and D, "column-major" B,
  // i.e. [N, K] with K contiguous, and the scales of A as K/128 columns of m_aligned floats).
  const uint32_t box_d_inner = static_cast<uint32_t>(a.swizzle_d == 0 ? a.block_n : a.swizzle_d / 2);
  CUtensorMap map_a =
      tensor_map(CU_TENSOR_MAP_DATA_TYPE_UINT8, a.q, K, M, K, kBlockK, a.block_m, CU_TENSOR_MAP_SWIZZLE_128B);
  CUtensorMap map_b =
      tensor_map(CU_TENSOR_MAP_DATA_TYPE_UINT8, a.weight, K, N, K, kBlockK, a.block_n, CU_TENSOR_MAP_SWIZZLE_128B);
  CUtensorMap map_scales_a = tensor_map(CU_TENSOR_MAP_DATA_TYPE_FLOAT32, a.s, m_aligned, G, m_aligned * 4, a.block_m,
                                        1, CU_TENSOR_MAP_SWIZZLE_NONE);
  CUtensorMap map_d =
      tensor_map(CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, a.y, N, M, N * 2, box_d_inner, a.block_m, swizzle);

  const Driver& drv = driver();
  const auto handle = reinterpret_cast<CUkernel>(static_cast<uintptr_t>(a.kernel));
  check_driver(drv.kernel_set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, static_cast<int>(a.smem_size),
                                        handle, static_cast<CUdevice>(device)),
               kOp, "cuKernelSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)");

  CUlaunchAttribute cluster = {};
  cluster.id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
  cluster.value.clusterDim.x = static_cast<unsigned>(a.multicast);
  cluster.value.clusterDim.y = 1;
  cluster.value.clusterDim.z = 1;
  CUlaunchConfig config = {};
  config.gridDimX = static_cast<unsigned>(a.num_sms);
  config.gridDimY = 1;
  config.gridDimZ = 1;
  config.blockDimX = kTmaThreads + (a.block_m == 64 ? 1 : 2) * kMathThreadsPerGroup;
  config.blockDimY = 1;
  config.blockDimZ = 1;
  config.sharedMemBytes = static_cast<unsigned>(a.smem_size);
  config.hStream = stream;
  config.attrs = &cluster;
  config.numAttrs = 1;

  void* gmem_d = a.y;
  void* scales_b = const_cast<float*>(a.weight_scale_inv);
  void* grouped_layout = nullptr;  // read only by the grouped GEMM types
  uint32_t shape_m = static_cast<uint32_t>(M);
  void* args[] = {&gmem_d, &scales_b, &grouped_layout, &shape_m, &map_a, &map_b, &map_scales_a, &map_d};
  check_driver(drv.launch_ex(&config, reinterpret_cast<CUfunction>(handle), args, nullptr), kOp, "cuLaunchKernelEx");
}

}  // namespace fp8linear
