// Host-side access to the CUDA driver API for fp8linear's launchers (kernels/deepgemm_launch.cu,
// kernels/sm90_linear.cu): entry points resolved through cudaGetDriverEntryPointByVersion (so the extension
// links no libcuda), driver results checked with their names, and 2-D TMA descriptors. Torch-free: errors are
// launch_utils.h's.
#pragma once

#include <cstdint>
#include <mutex>

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include "launch_utils.h"

namespace fp8linear {

// The driver's `symbol` at ABI `version`, as a function pointer of type Fn; `op` prefixes the error and
// `remedy` ends it.
template <typename Fn>
Fn driver_entry_point(const char* symbol, unsigned int version, const char* op,
                      const char* remedy = "update the NVIDIA driver") {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
  check_cuda(cudaGetDriverEntryPointByVersion(symbol, &fn, version, cudaEnableDefault, &status),
             "cudaGetDriverEntryPointByVersion");
  require(status == cudaDriverEntryPointSuccess && fn != nullptr, op, ": the CUDA driver has no ", symbol,
          " (version ", version, "); ", remedy);
  return reinterpret_cast<Fn>(fn);
}

// Raises "<op>: <what> failed: <the result's name>" unless `result` is CUDA_SUCCESS.
inline void check_driver(CUresult result, const char* op, const char* what) {
  if (result == CUDA_SUCCESS) return;
  static PFN_cuGetErrorName_v6000 error_name = nullptr;
  static std::once_flag once;
  std::call_once(once, [op] { error_name = driver_entry_point<PFN_cuGetErrorName_v6000>("cuGetErrorName", 6000, op); });
  const char* name = nullptr;
  error_name(result, &name);
  fail(op, ": ", what, " failed: ", name ? name : "unknown CUresult ", static_cast<int>(result));
}

// A 2-D tiled TMA descriptor over `base`: `inner` contiguous elements per line, `outer` lines `stride_bytes`
// apart, boxes of box_inner x box_outer elements, 256-byte L2 promotion; out-of-bounds elements read as zeros.
inline CUtensorMap tensor_map_2d(const char* op, CUtensorMapDataType type, const void* base, uint64_t inner,
                                 uint64_t outer, uint64_t stride_bytes, uint32_t box_inner, uint32_t box_outer,
                                 CUtensorMapSwizzle swizzle) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  static std::once_flag once;
  std::call_once(once, [op] {
    encode = driver_entry_point<PFN_cuTensorMapEncodeTiled_v12000>("cuTensorMapEncodeTiled", 12000, op);
  });
  CUtensorMap map;
  const cuuint64_t dims[2] = {inner, outer};
  const cuuint64_t strides[1] = {stride_bytes};
  const cuuint32_t box[2] = {box_inner, box_outer};
  const cuuint32_t element_strides[2] = {1, 1};
  check_driver(encode(&map, type, 2, const_cast<void*>(base), dims, strides, box, element_strides,
                      CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE),
               op, "cuTensorMapEncodeTiled");
  return map;
}

}  // namespace fp8linear
