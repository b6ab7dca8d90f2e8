// The host entry points of fp8linear's CUDA translation units, as bindings.cpp (and sm90_bindings.cpp) call
// them once the torch-side arguments are checked: pointers, sizes, strides and a stream, no torch types. Plain
// C++ (no device code), so the host compiler reads it in the bindings and nvcc in the kernels' files, as
// DeepGEMM's csrc/apis declare what its kernels' launchers take.
//
// Each launcher checks what only it knows (its instantiations, its limits) and raises std::runtime_error
// (launch_utils.h fail), which torch turns into a Python RuntimeError as it does TORCH_CHECK's errors.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include <cuda_runtime_api.h>

namespace fp8linear {

// Element types that cross this boundary (bindings.h maps torch's ScalarType onto them).
enum class DType : int { kBFloat16, kFloat16, kFloat32, kFloat8E4M3, kInt8 };

// Device memory a launcher asks of the torch side (bindings.h: torch's caching allocator, on the launch's
// stream, alive until the op call returns).
class Workspace {
 public:
  virtual ~Workspace() = default;
  virtual void* empty(size_t bytes) = 0;  // uninitialized
  virtual void* zeros(size_t bytes) = 0;  // zero-filled before the launch
  // `count` int32 counters that are zero when the launch starts and that it leaves zero (small_m's split
  // arrivals): one buffer per stream reused by eager launches, a fresh zeroed one under graph capture.
  virtual int* arrival_counters(int count) = 0;
};

// ---- kernels/per_token_group_quant.cu ---------------------------------------------------------------------
struct QuantArgs {
  // pointers
  const void* x;  // [B, M, K] in x_dtype, element (b, m, k) at b * x_stride_batch + m * x_stride_row + k
  void* q;        // [B, M, K] contiguous, q_dtype (fp8 e4m3 or int8)
  void* s;        // fp32 scales (row, col) or int32 words of UE8M0 bytes (packed)
  DType x_dtype, q_dtype;
  // sizes (B * M * K / group_size < 2^31)
  int64_t batches, rows, cols, group_size;
  // strides, in elements of x and of s; 0 for a dimension of size 1
  int64_t x_stride_batch, x_stride_row;
  int64_t s_stride_batch, s_stride_row, s_stride_col;
  // semantics
  bool packed;  // the `ue8m0_packed` layout (fp8 only)
  float eps;
  bool scale_ue8m0;
};
void launch_per_token_group_quant(const QuantArgs& args, int device, cudaStream_t stream);

// ---- kernels/fused_quant.cu ---------------------------------------------------------------------------------
// Where a fused op writes its scales: fp32 (row, col) or int32 words (packed), element (m, j) at
// m * stride_row + j * stride_col (0 for a dimension of size 1).
struct ScaleArgs {
  void* s;
  int64_t stride_row, stride_col;
};

struct SiluAndMulQuantArgs {
  const void* x;  // [M, 2I] = [gate | up] in x_dtype, rows x_stride_row elements apart (0 when M == 1)
  void* q;        // [M, I] contiguous
  ScaleArgs s;
  DType x_dtype, q_dtype;
  int64_t rows, cols, group_size;  // M, I, g (M * I / 8 < 2^31)
  int64_t x_stride_row;
  bool packed;
  float eps;
  bool scale_ue8m0;
};
void launch_silu_and_mul_quant(const SiluAndMulQuantArgs& args, cudaStream_t stream);

struct RmsNormQuantArgs {
  const void* x;       // [M, H] in x_dtype, rows x_stride_row elements apart (0 when M == 1)
  const void* weight;  // [H] contiguous, x_dtype
  void* q;             // [M, H] contiguous
  void* normed;        // [M, H] contiguous in x_dtype, or nullptr
  ScaleArgs s;
  DType x_dtype, q_dtype;
  int64_t rows, cols, group_size;  // M, H (<= 16384), g
  int64_t x_stride_row;
  bool packed;
  float rms_eps, eps;
  bool scale_ue8m0;
};
void launch_rmsnorm_quant(const RmsNormQuantArgs& args, cudaStream_t stream);

// ---- kernels/small_m_linear.cu ------------------------------------------------------------------------------
struct SmallMLinearArgs {
  const void* x;  // [M, K] in x_dtype, 16-byte aligned rows x_stride_row elements apart
  int64_t x_stride_row;
  const void* weight;             // [N, K] contiguous, 16-byte aligned, weight_dtype (fp8 e4m3 or int8)
  const float* weight_scale_inv;  // [ceil(N/128), K/128] contiguous
  const void* bias;               // [N] in bias_dtype, or nullptr
  void* y;                        // [M, N] contiguous, x_dtype
  const void* q;                  // x quantized ahead ([M, K] row-major, weight_dtype), or nullptr
  const float* qs;                // its `row` scales [M, K/128], with q
  DType x_dtype, weight_dtype, bias_dtype;
  int64_t M, N, K;  // M <= 16, K % 128 == 0
  float eps;
  bool scale_ue8m0;
};
// Whether the op quantizes x with the quant kernel ahead of the GEMV for this shape (small_m_linear.cu's
// head says when that pays); the caller then passes q and qs.
bool small_m_quantizes_ahead(int64_t M, int64_t N, int64_t K);
void launch_small_m_linear(const SmallMLinearArgs& args, int device, cudaStream_t stream, Workspace& workspace);

// ---- kernels/cublaslt_gemm.cu -------------------------------------------------------------------------------
// "" when fp8linear can call cuBLASLt itself; else why not.
std::string cublaslt_unavailable_reason();
// y [M, N] bf16 = q [M, K] fp8 x b [K, N] fp8 (the weight [N, K] row-major) with s the `col` scales of q
// (M % 4 == 0) and sb the weight's scales padded to [ceil(N/128), L4] row-major (kernels/cublaslt_gemm.cu).
struct CublasLtGemmArgs {
  const void* q;
  const float* s;
  const void* b;
  const float* sb;
  void* y;
  int64_t M, N, K;
};
void launch_cublaslt_gemm(const CublasLtGemmArgs& args, int device, cudaStream_t stream, Workspace& workspace);

// ---- kernels/deepgemm_launch.cu -----------------------------------------------------------------------------
// DeepGEMM's compiled kernel (a CUkernel handle) and the tile configuration it was built with.
struct DeepGemmArgs {
  const void* q;                  // [M, K] fp8 contiguous
  const float* s;                 // `col` scales: K/128 columns of m_aligned = ceil(M/4)*4 floats
  const void* weight;             // [N, K] fp8 contiguous
  const float* weight_scale_inv;  // [ceil(N/128), K/128] contiguous
  void* y;                        // [M, N] bf16 contiguous
  int64_t M, N, K;
  int64_t kernel, num_sms, block_m, block_n, smem_size, swizzle_d, multicast;
};
void launch_deepgemm_gemm(const DeepGemmArgs& args, int device, cudaStream_t stream);

// ---- kernels/sm90_linear.cu (the second library, fp8linear._build.ensure_loaded("sm90")) ---------------
struct Sm90LinearArgs {
  const void* x;  // [M, K] in dtype, 16-byte aligned rows x_stride elements apart (quantize only)
  int64_t x_stride;
  void* q;                        // [M, K] row-major in weight_dtype: written when quantize, else read
  float* s;                       // `col` scales: K/128 columns of m_pad = ceil(M/4)*4 floats
  const void* weight;             // [N, K] contiguous, 16-byte aligned, weight_dtype (fp8 e4m3 or int8)
  const float* weight_scale_inv;  // [ceil(N/128), K/128] contiguous
  const void* bias;               // [N] in bias_dtype, or nullptr
  void* y;                        // [M, N] in dtype
  DType dtype, weight_dtype, bias_dtype;  // dtype: x's and y's, bf16 or fp16
  int64_t M, N, K;
  float eps;
  bool scale_ue8m0;
  bool quantize;  // quantize x inside the kernel, or multiply the given q and s
  int64_t block_m, cluster;  // 0: the launcher picks; else 128 or 256, and 1 or 2
};
void launch_sm90_linear(const Sm90LinearArgs& args, int device, cudaStream_t stream, Workspace& workspace);

}  // namespace fp8linear
