// Host-side helpers shared by the launchers of kernels/*.cu, torch-free like the kernels themselves: errors
// raised as std::runtime_error (torch hands it to Python as a RuntimeError, as it does TORCH_CHECK's), CUDA
// results checked with their names, the device's SM count, cached, pointer alignment, a launch with
// programmatic dependent launch where the device has it, and the GEMM kernels' bias kinds.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <utility>

#include <cuda_runtime.h>

#include "launchers.h"

namespace fp8linear {

// Raises std::runtime_error with the parts streamed one after another, as TORCH_CHECK(false, parts...) does.
template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream message;
  (message << ... << parts);
  throw std::runtime_error(message.str());
}

template <typename... Parts>
inline void require(bool ok, const Parts&... parts) {
  if (!ok) fail(parts...);
}

// Raises "<what> failed: <CUDA's message>" unless `status` is cudaSuccess; clears the (non-sticky) error
// first, so that the next CUDA call does not report it again.
inline void check_cuda(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  (void)cudaGetLastError();
  fail(what, " failed: ", cudaGetErrorName(status), " (", cudaGetErrorString(status), ")");
}

// cudaDeviceGetAttribute(kAttr, device), asked of the driver once per device (launchers read these on every
// call). The cache is written with the same value by whichever thread gets there first; 0 marks "not yet
// asked" (no attribute read through here is 0 on a real device).
template <cudaDeviceAttr kAttr>
inline int device_attribute(int device) {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {};
  const bool cached = device >= 0 && device < kMaxDevices;
  int v = cached ? __atomic_load_n(&cache[device], __ATOMIC_RELAXED) : 0;
  if (v == 0) {
    check_cuda(cudaDeviceGetAttribute(&v, kAttr, device), "cudaDeviceGetAttribute");
    if (cached) __atomic_store_n(&cache[device], v, __ATOMIC_RELAXED);
  }
  return v;
}

// Multiprocessors of `device` (launchers size their grids by it).
inline int device_sm_count(int device) { return device_attribute<cudaDevAttrMultiProcessorCount>(device); }

// Whether launches on `device` use programmatic dependent launch: compute capability >= 9.0. The kernels
// wait for the grids ahead of them before touching memory (griddep_wait, common.cuh), so the bytes are those
// of a plain launch; only the launch overlaps the previous kernel's tail (docs/benchmarks.md, "16 elements per
// lane, PDL").
inline bool pdl_enabled(int device) { return device_attribute<cudaDevAttrComputeCapabilityMajor>(device) >= 9; }

// kernel<<<grid, block, smem_bytes, stream>>>(args...), with the programmatic-stream-serialization attribute
// when `pdl`: the kernel must then call griddep_wait() (common.cuh) before it reads anything the kernels ahead
// of it write, and before its first global store.
template <typename... Params, typename... Args>
void launch_kernel_smem(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                        bool pdl, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = pdl ? 1 : 0;
  check_cuda(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...), "cudaLaunchKernelEx");
}

// The same without dynamic shared memory; the kernel calls griddep_wait() before its first global access.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, bool pdl, Args&&... args) {
  launch_kernel_smem(kernel, grid, block, 0, stream, pdl, std::forward<Args>(args)...);
}

inline bool aligned_to(const void* ptr, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// The bias a GEMM kernel adds (small_m, sm90), a run-time branch in the kernel: none, or [N] in one of three
// dtypes.
enum BiasKind : int { kNoBias = 0, kBiasBf16 = 1, kBiasFp16 = 2, kBiasFp32 = 3 };

inline BiasKind bias_kind(const void* bias, DType dtype) {
  if (bias == nullptr) return kNoBias;
  return dtype == DType::kBFloat16 ? kBiasBf16 : dtype == DType::kFloat16 ? kBiasFp16 : kBiasFp32;
}

}  // namespace fp8linear
