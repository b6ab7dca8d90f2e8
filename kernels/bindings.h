// Torch-side helpers of the two binding files (bindings.cpp, sm90_bindings.cpp): torch's dtypes as launchers.h's,
// the current stream from c10, and the launchers' Workspace on torch's caching allocator.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "launchers.h"

namespace fp8linear {

// A dtype the ops checked as one their kernels take, as launchers.h's DType.
inline DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::ScalarType::BFloat16: return DType::kBFloat16;
    case at::ScalarType::Half: return DType::kFloat16;
    case at::ScalarType::Float: return DType::kFloat32;
    case at::ScalarType::Float8_e4m3fn: return DType::kFloat8E4M3;
    case at::ScalarType::Char: return DType::kInt8;
    default: break;
  }
  TORCH_CHECK(false, "fp8linear: no CUDA kernel takes ", t);
  return DType::kFloat32;  // not reached
}

inline bool aligned_to(const void* ptr, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

inline cudaStream_t current_stream(int device) { return c10::cuda::getCurrentCUDAStream(device).stream(); }

// A launcher's scratch memory from torch's caching allocator, on the op's stream; held until the op returns
// (the allocator's stream order keeps it valid for the launches queued before).
class TorchWorkspace final : public Workspace {
 public:
  TorchWorkspace(const at::Tensor& like, cudaStream_t stream) : options_(like.options()), stream_(stream) {}

  void* empty(size_t bytes) override { return hold(at::empty({static_cast<int64_t>(bytes)}, options_.dtype(at::kByte))); }
  void* zeros(size_t bytes) override { return hold(at::zeros({static_cast<int64_t>(bytes)}, options_.dtype(at::kByte))); }

  // Eager launches share one buffer per (device, stream), zeroed once: launches on a stream run in order, the
  // kernel leaves the counters zero, and a buffer per stream keeps concurrent streams apart. A launch captured
  // into a CUDA graph gets counters of its own instead, zeroed by a memset node of the graph: a buffer made
  // during capture holds no zeros until the graph runs.
  int* arrival_counters(int count) override {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream_, &capture));
    if (capture != cudaStreamCaptureStatusNone) {
      int* counters = static_cast<int*>(hold(at::empty({count}, options_.dtype(at::kInt))));
      C10_CUDA_CHECK(cudaMemsetAsync(counters, 0, sizeof(int) * count, stream_));
      return counters;
    }
    constexpr int kCounters = 1024;
    TORCH_CHECK(count <= kCounters, "small_m_linear: ", count, " split row blocks (at most ", kCounters, ")");
    static std::mutex mutex;
    static auto* buffers = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();  // never freed: outlives exit
    const std::lock_guard<std::mutex> lock(mutex);
    at::Tensor& buffer = (*buffers)[{options_.device().index(), stream_}];
    if (!buffer.defined()) buffer = at::zeros({kCounters}, options_.dtype(at::kInt));
    return buffer.data_ptr<int>();
  }

 private:
  void* hold(at::Tensor t) {
    held_.push_back(std::move(t));
    return held_.back().data_ptr();
  }

  at::TensorOptions options_;
  cudaStream_t stream_;
  std::vector<at::Tensor> held_;
};

}  // namespace fp8linear
