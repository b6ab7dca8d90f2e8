// The torch side of the sm90 library (fp8linear._build.ensure_loaded("sm90"), built apart from the default one
// the first time the sm90 backend runs): sm90_linear and sm90_gemm under the schemas of fp8linear/sm90.py, as
// bindings.cpp is for the default library. The kernel and its launcher are in sm90_linear.cu, torch-free.

#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "bindings.h"
#include "launchers.h"

namespace fp8linear {
namespace {

constexpr int64_t kBlockK = 128;  // the scale group along K
constexpr int64_t kBlockN = 128;  // the weight's scale blocks along N

void check_weight(const at::Tensor& weight, const at::Tensor& weight_scale_inv, int64_t K, const char* op) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K &&
                  (weight.scalar_type() == at::ScalarType::Float8_e4m3fn || weight.scalar_type() == at::kChar) &&
                  weight.is_contiguous() && aligned_to(weight.data_ptr(), 16),
              op, ": weight must be contiguous, 16-byte aligned float8_e4m3fn or int8 [N, ", K, "]; got ",
              weight.scalar_type(), " ", weight.sizes());
  const int64_t N = weight.size(0);
  TORCH_CHECK(N > 0 && N % 8 == 0, op, ": needs N % 8 == 0; got N=", N);
  TORCH_CHECK(K > 0 && K % kBlockK == 0, op, ": needs K % 128 == 0; got K=", K);
  TORCH_CHECK(weight_scale_inv.scalar_type() == at::kFloat && weight_scale_inv.is_contiguous() &&
                  weight_scale_inv.dim() == 2 && weight_scale_inv.size(0) == (N + kBlockN - 1) / kBlockN &&
                  weight_scale_inv.size(1) == K / kBlockK,
              op, ": weight_scale_inv must be contiguous fp32 [", (N + kBlockN - 1) / kBlockN, ", ", K / kBlockK,
              "]; got ", weight_scale_inv.scalar_type(), " ", weight_scale_inv.sizes());
  TORCH_CHECK(weight.is_cuda() && weight_scale_inv.device() == weight.device(), op,
              ": weight and weight_scale_inv must be on one CUDA device");
}

void check_sizes(int64_t M, int64_t N, int64_t K) {
  TORCH_CHECK(M < (int64_t{1} << 31) / kBlockK && N < (int64_t{1} << 24) && M * N < (int64_t{1} << 62) &&
                  K < (int64_t{1} << 24),
              "sm90_linear: shape too large: M=", M, ", N=", N, ", K=", K);
}

// The weight, its scales and the bias into `a` (the launcher's checks come on top of these).
void set_weight(Sm90LinearArgs& a, const at::Tensor& weight, const at::Tensor& weight_scale_inv,
                const std::optional<at::Tensor>& bias, const char* op) {
  a.weight = weight.data_ptr();
  a.weight_dtype = dtype_of(weight.scalar_type());
  a.weight_scale_inv = weight_scale_inv.data_ptr<float>();
  a.bias = nullptr;
  a.bias_dtype = DType::kFloat32;
  if (!bias.has_value()) return;
  const at::Tensor& b = *bias;
  TORCH_CHECK(b.dim() == 1 && b.size(0) == weight.size(0) && b.is_contiguous() && b.device() == weight.device(), op,
              ": bias must be a contiguous [", weight.size(0), "] tensor on the weight's device; got ", b.sizes());
  const at::ScalarType t = b.scalar_type();
  TORCH_CHECK(t == at::ScalarType::BFloat16 || t == at::ScalarType::Half || t == at::ScalarType::Float, op,
              ": bias must be bfloat16, float16 or float32; got ", t);
  a.bias = b.data_ptr();
  a.bias_dtype = dtype_of(t);
}

// sm90_linear(Tensor x, Tensor weight, Tensor weight_scale_inv, Tensor? bias, bool scale_ue8m0, float eps,
//             int block_m=0, int cluster=0) -> (Tensor y, Tensor q, Tensor s)
// x [M, K] bf16/fp16, unit stride along K -> y [M, N] in x's dtype, q [M, K] fp8, s [M, K/128] in the `col` layout
// (strides (1, m_pad)). The wrapper (fp8linear/sm90.py) checks everything a user can get wrong first.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sm90_linear_cuda(const at::Tensor& x_in, const at::Tensor& weight,
                                                                const at::Tensor& weight_scale_inv,
                                                                const std::optional<at::Tensor>& bias,
                                                                bool scale_ue8m0, double eps, int64_t block_m,
                                                                int64_t cluster) {
  constexpr const char* op = "sm90_linear";
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be 2-D; got ", x_in.sizes());
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 || x_in.scalar_type() == at::kHalf, op,
              ": x must be bfloat16 or float16; got ", x_in.scalar_type());
  const int64_t M = x_in.size(0), K = x_in.size(1);
  check_weight(weight, weight_scale_inv, K, op);
  TORCH_CHECK(x_in.device() == weight.device(), op, ": x is on ", x_in.device(), ", weight on ", weight.device());
  const int64_t N = weight.size(0);
  check_sizes(M, N, K);
  const int64_t m_pad = (M + 3) / 4 * 4;
  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor y = at::empty({M, N}, x_in.options());
  at::Tensor q = at::empty({M, K}, x_in.options().dtype(weight.scalar_type()));  // fp8 or int8, as the weight
  at::Tensor s_storage = at::empty({K / kBlockK, m_pad}, x_in.options().dtype(at::kFloat));
  at::Tensor s = s_storage.t().narrow(0, 0, M);
  if (M == 0) return {y, q, s};
  at::Tensor x = x_in;
  const int64_t row_stride = M > 1 ? x_in.stride(0) : K;
  if (x_in.stride(1) != 1 || !aligned_to(x_in.data_ptr(), 16) || (row_stride * 2) % 16 != 0) x = x_in.contiguous();
  Sm90LinearArgs a;
  a.x = x.data_ptr();
  a.x_stride = M > 1 ? x.stride(0) : K;
  a.q = q.data_ptr();
  a.s = s_storage.data_ptr<float>();
  set_weight(a, weight, weight_scale_inv, bias, op);
  a.y = y.data_ptr();
  a.dtype = dtype_of(x_in.scalar_type());
  a.M = M;
  a.N = N;
  a.K = K;
  a.eps = static_cast<float>(eps);
  a.scale_ue8m0 = scale_ue8m0;
  a.quantize = true;
  a.block_m = block_m;
  a.cluster = cluster;
  const int device = x_in.get_device();
  const cudaStream_t stream = current_stream(device);
  TorchWorkspace workspace(x_in, stream);
  launch_sm90_linear(a, device, stream, workspace);
  return {y, q, s};
}

// sm90_gemm(Tensor q, Tensor s, Tensor weight, Tensor weight_scale_inv, Tensor? bias, ScalarType out_dtype,
//           int block_m=0, int cluster=0) -> Tensor
// The same kernel on given operands: q [M, K] fp8 contiguous, s fp32 [M, K/128] in the `col` layout with
// storage for m_pad rows per column -> y [M, N] in out_dtype (bf16 or fp16).
at::Tensor sm90_gemm_cuda(const at::Tensor& q, const at::Tensor& s, const at::Tensor& weight,
                          const at::Tensor& weight_scale_inv, const std::optional<at::Tensor>& bias,
                          at::ScalarType out_dtype, int64_t block_m, int64_t cluster) {
  constexpr const char* op = "sm90_gemm";
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == weight.scalar_type() && q.is_contiguous() &&
                  aligned_to(q.data_ptr(), 16),
              op, ": q must be contiguous, 16-byte aligned [M, K] of the weight's type (", weight.scalar_type(),
              "); got ", q.scalar_type(), " ", q.sizes());
  const int64_t M = q.size(0), K = q.size(1);
  check_weight(weight, weight_scale_inv, K, op);
  TORCH_CHECK(out_dtype == at::kBFloat16 || out_dtype == at::kHalf, op, ": out_dtype must be bfloat16 or float16");
  TORCH_CHECK(q.device() == weight.device() && s.device() == weight.device(), op,
              ": q, s and weight must be on one device");
  const int64_t N = weight.size(0);
  check_sizes(M, N, K);
  const int64_t G = K / kBlockK, m_pad = (M + 3) / 4 * 4;
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.dim() == 2 && s.size(0) == M && s.size(1) == G &&
                  (M <= 1 || s.stride(0) == 1) && (G == 1 || s.stride(1) == m_pad) && aligned_to(s.data_ptr(), 16) &&
                  s.storage().nbytes() >= static_cast<size_t>((s.storage_offset() + G * m_pad) * 4),
              op, ": s must be fp32 [", M, ", ", G, "] in the 'col' layout (strides (1, ", m_pad, "), storage for ",
              m_pad, " rows per column, 16-byte aligned); got ", s.sizes(), " with strides ", s.strides());
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor y = at::empty({M, N}, q.options().dtype(out_dtype));
  if (M == 0) return y;
  Sm90LinearArgs a;
  a.x = nullptr;
  a.x_stride = 0;
  a.q = q.data_ptr();
  a.s = s.data_ptr<float>();
  set_weight(a, weight, weight_scale_inv, bias, op);
  a.y = y.data_ptr();
  a.dtype = dtype_of(out_dtype);
  a.M = M;
  a.N = N;
  a.K = K;
  a.eps = 0.0f;
  a.scale_ue8m0 = false;
  a.quantize = false;
  a.block_m = block_m;
  a.cluster = cluster;
  const int device = q.get_device();
  const cudaStream_t stream = current_stream(device);
  TorchWorkspace workspace(q, stream);
  launch_sm90_linear(a, device, stream, workspace);
  return y;
}

}  // namespace
}  // namespace fp8linear

TORCH_LIBRARY_IMPL(fp8linear, CUDA, m) {
  m.impl("sm90_linear", &fp8linear::sm90_linear_cuda);
  m.impl("sm90_gemm", &fp8linear::sm90_gemm_cuda);
}
