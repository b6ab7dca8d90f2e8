// Host-side helpers shared by the torch launchers of kernels/*.cu (not by the kernels themselves, which stay
// free of torch types): the device's SM count, cached, and pointer alignment.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>

namespace fp8linear {

// Multiprocessors of `device`, asked of the driver once per device (launchers size their grids by it on
// every call). The cache is written with the same value by whichever thread gets there first.
inline int device_sm_count(int device) {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {};
  const bool cached = device >= 0 && device < kMaxDevices;
  int n = cached ? __atomic_load_n(&cache[device], __ATOMIC_RELAXED) : 0;
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    if (cached) __atomic_store_n(&cache[device], n, __ATOMIC_RELAXED);
  }
  return n;
}

inline bool aligned_to(const void* ptr, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

}  // namespace fp8linear
