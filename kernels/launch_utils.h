// Host-side helpers shared by the torch launchers of kernels/*.cu (not by the kernels themselves, which stay
// free of torch types): the device's SM count, cached, pointer alignment, and a launch with programmatic
// dependent launch where the device has it.
#pragma once

#include <cstdint>

#include <utility>

#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>

namespace fp8linear {

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
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, kAttr, device));
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
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

// The same without dynamic shared memory; the kernel calls griddep_wait() before its first global access.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, bool pdl, Args&&... args) {
  launch_kernel_smem(kernel, grid, block, 0, stream, pdl, std::forward<Args>(args)...);
}

inline bool aligned_to(const void* ptr, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

}  // namespace fp8linear
