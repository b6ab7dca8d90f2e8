// The torch side of fp8linear's CUDA library: each op's CUDA implementation under the schema fp8linear's Python
// modules define (fp8linear/ops.py, fused.py, small_m.py, backends/cublaslt.py, backends/deepgemm.py), and the one
// TORCH_LIBRARY_IMPL block that registers them when the library loads.
//
// Each implementation checks the tensors (the public Python wrappers have validated everything already; these
// checks keep a direct call of an op from reading or writing out of bounds), allocates what it returns, takes
// the current stream from c10, and hands pointers, sizes and strides to the torch-free launchers of the kernels'
// translation units (launchers.h). The kernels' files include no torch header: they compile in seconds, and an
// edit of one rebuilds that file alone (fp8linear/_build.py). sm90's ops live in sm90_bindings.cpp, the second
// library's twin of this file.
//
// Only c10's CUDA headers, not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers that a machine
// with torch's CPU wheel lacks (CI compiles this file there: DESIGN.md "Building the kernel").

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "bindings.h"
#include "launchers.h"

namespace fp8linear {
namespace {

constexpr int64_t kGroup = 128;  // the GEMMs' activation groups and weight blocks along K

// ---- per_token_group_quant_ and quant_for_gemm (fp8linear/ops.py; kernels/per_token_group_quant.cu) --------

//   per_token_group_quant_(Tensor x, Tensor(a!) q, Tensor(b!) s, int group_size, bool scale_ue8m0,
//                          float eps, str layout) -> ()
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
  QuantArgs a;
  a.x = x.data_ptr();
  a.q = q.data_ptr();
  a.s = s.data_ptr();
  a.x_dtype = dtype_of(x_dtype);
  a.q_dtype = dtype_of(q.scalar_type());
  a.batches = B;
  a.rows = M;
  a.cols = K;
  a.group_size = group_size;
  // Strides of size-1 dims never address anything: zero them so they cannot spoil the alignment test.
  a.x_stride_batch = (batched && B > 1) ? x.stride(0) : 0;
  a.x_stride_row = M > 1 ? x.stride(-2) : 0;
  a.s_stride_batch = (batched && B > 1) ? s.stride(0) : 0;
  a.s_stride_row = M > 1 ? s.stride(-2) : 0;
  a.s_stride_col = s.size(-1) > 1 ? s.stride(-1) : 0;
  a.packed = packed;
  a.eps = static_cast<float>(eps);  // round to nearest, as the reference's full_like(amax, eps)
  a.scale_ue8m0 = scale_ue8m0;
  launch_per_token_group_quant(a, device, current_stream(device));
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

// ---- silu_and_mul_quant_ and rmsnorm_quant_ (fp8linear/fused.py; kernels/fused_quant.cu) ------------------

// Checks shared by both fused ops.
void check_fused(const char* op, const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, int64_t group_size,
                 c10::string_view layout, int64_t width, bool* packed) {
  *packed = layout == "ue8m0_packed";
  TORCH_CHECK(*packed || layout == "row" || layout == "col", op, ": layout must be 'row', 'col' or 'ue8m0_packed'; got '",
              layout, "'");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D; got ", x.sizes());
  TORCH_CHECK(x.is_cuda() && q.device() == x.device() && s.device() == x.device(), op,
              ": x, q and s must be on the same CUDA device; got ", x.device(), ", ", q.device(), ", ", s.device());
  const at::ScalarType x_dtype = x.scalar_type();
  TORCH_CHECK(x_dtype == at::ScalarType::BFloat16 || x_dtype == at::ScalarType::Half || x_dtype == at::ScalarType::Float,
              op, ": x must be bfloat16, float16 or float32; got ", x_dtype);
  TORCH_CHECK(q.scalar_type() == at::ScalarType::Float8_e4m3fn || q.scalar_type() == at::ScalarType::Char, op,
              ": q must be float8_e4m3fn or int8; got ", q.scalar_type());
  TORCH_CHECK(s.scalar_type() == (*packed ? at::ScalarType::Int : at::ScalarType::Float), op, ": s must be ",
              *packed ? "int32" : "float32", " for layout '", layout, "'; got ", s.scalar_type());
  TORCH_CHECK(group_size == 16 || group_size == 32 || group_size == 64 || group_size == 128 || group_size == 256, op,
              ": group_size must be one of 16, 32, 64, 128, 256; got ", group_size);
  TORCH_CHECK(width % group_size == 0, op, ": width ", width, " must be divisible by group_size=", group_size);
  const int64_t M = x.size(0);
  const int64_t G = width / group_size;
  TORCH_CHECK(q.dim() == 2 && q.size(0) == M && q.size(1) == width && q.is_contiguous(), op,
              ": q must be contiguous [", M, ", ", width, "]; got ", q.sizes(), " with strides ", q.strides());
  TORCH_CHECK(s.dim() == 2 && s.size(0) == M && s.size(1) == (*packed ? (G + 3) / 4 : G), op, ": s has shape ",
              s.sizes(), ", which does not fit ", M, " rows of ", G, " groups in layout '", layout, "'");
  TORCH_CHECK(M * width / 8 < (int64_t{1} << 31), op, ": at most 2^31 - 1 chunks of 8 per call; got ", M * width / 8);
}

ScaleArgs scale_args(const at::Tensor& s) {
  ScaleArgs out;
  out.s = s.data_ptr();
  // Strides of size-1 dims never address anything.
  out.stride_row = s.size(0) > 1 ? s.stride(0) : 0;
  out.stride_col = s.size(1) > 1 ? s.stride(1) : 0;
  return out;
}

// silu_and_mul_quant_(Tensor x, Tensor(a!) q, Tensor(b!) s, int group_size, bool scale_ue8m0, float eps,
//                     str layout) -> ()
void silu_and_mul_quant_cuda(const at::Tensor& x, at::Tensor& q, at::Tensor& s, int64_t group_size, bool scale_ue8m0,
                             double eps, c10::string_view layout) {
  constexpr const char* op = "silu_and_mul_quant_";
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, op, ": x must be [M, 2I]; got ", x.sizes());
  const int64_t I = x.size(1) / 2;
  bool packed = false;
  check_fused(op, x, q, s, group_size, layout, I, &packed);
  const int64_t M = x.size(0);
  if (M == 0 || I == 0) return;
  TORCH_CHECK(x.stride(1) == 1, op, ": x's last dim must be contiguous; got strides ", x.strides());

  const c10::cuda::CUDAGuard guard(x.device());
  SiluAndMulQuantArgs a;
  a.x = x.data_ptr();
  a.q = q.data_ptr();
  a.s = scale_args(s);
  a.x_dtype = dtype_of(x.scalar_type());
  a.q_dtype = dtype_of(q.scalar_type());
  a.rows = M;
  a.cols = I;
  a.group_size = group_size;
  a.x_stride_row = M > 1 ? x.stride(0) : 0;
  a.packed = packed;
  a.eps = static_cast<float>(eps);
  a.scale_ue8m0 = scale_ue8m0;
  launch_silu_and_mul_quant(a, current_stream(x.get_device()));
}

// rmsnorm_quant_(Tensor x, Tensor weight, Tensor(a!) q, Tensor(b!) s, Tensor(c!)? normed, float rms_eps,
//                int group_size, bool scale_ue8m0, float eps, str layout) -> ()
void rmsnorm_quant_cuda(const at::Tensor& x, const at::Tensor& weight, at::Tensor& q, at::Tensor& s,
                        const std::optional<at::Tensor>& normed, double rms_eps, int64_t group_size, bool scale_ue8m0,
                        double eps, c10::string_view layout) {
  constexpr const char* op = "rmsnorm_quant_";
  TORCH_CHECK(x.dim() == 2, op, ": x must be [M, H]; got ", x.sizes());
  const int64_t H = x.size(1);
  bool packed = false;
  check_fused(op, x, q, s, group_size, layout, H, &packed);
  TORCH_CHECK(H <= 16384, op, ": H=", H, " is wider than 16384");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == H && weight.is_contiguous() &&
                  weight.scalar_type() == x.scalar_type() && weight.device() == x.device(),
              op, ": weight must be contiguous [", H, "] in x's dtype on x's device; got ", weight.sizes(), " ",
              weight.scalar_type(), " on ", weight.device());
  const bool has_normed = normed.has_value() && normed->defined();
  if (has_normed) {
    TORCH_CHECK(normed->sizes() == x.sizes() && normed->is_contiguous() && normed->scalar_type() == x.scalar_type() &&
                    normed->device() == x.device(),
                op, ": normed must be contiguous ", x.sizes(), " in x's dtype on x's device; got ", normed->sizes(),
                " ", normed->scalar_type());
  }
  const int64_t M = x.size(0);
  if (M == 0 || H == 0) return;
  TORCH_CHECK(x.stride(1) == 1, op, ": x's last dim must be contiguous; got strides ", x.strides());
  TORCH_CHECK(M < (int64_t{1} << 31), op, ": at most 2^31 - 1 rows; got ", M);

  const c10::cuda::CUDAGuard guard(x.device());
  RmsNormQuantArgs a;
  a.x = x.data_ptr();
  a.weight = weight.data_ptr();
  a.q = q.data_ptr();
  a.normed = has_normed ? normed->data_ptr() : nullptr;
  a.s = scale_args(s);
  a.x_dtype = dtype_of(x.scalar_type());
  a.q_dtype = dtype_of(q.scalar_type());
  a.rows = M;
  a.cols = H;
  a.group_size = group_size;
  a.x_stride_row = M > 1 ? x.stride(0) : 0;
  a.packed = packed;
  a.rms_eps = static_cast<float>(rms_eps);  // round to nearest, as the reference's fp32 tensor
  a.eps = static_cast<float>(eps);
  a.scale_ue8m0 = scale_ue8m0;
  launch_rmsnorm_quant(a, current_stream(x.get_device()));
}

// ---- small_m_linear (fp8linear/small_m.py; kernels/small_m_linear.cu) --------------------------------------

//   small_m_linear(Tensor x, Tensor weight, Tensor weight_scale_inv, Tensor? bias, bool scale_ue8m0,
//                  float eps) -> Tensor
// x [..., K] with at most 16 rows in all (the leading dims are flattened); y [..., N].
at::Tensor small_m_linear_cuda(const at::Tensor& x_any, const at::Tensor& weight, const at::Tensor& weight_scale_inv,
                               const std::optional<at::Tensor>& bias, bool scale_ue8m0, double eps) {
  constexpr int64_t kMaxM = 16;
  TORCH_CHECK(x_any.dim() >= 2, "small_m_linear: x must be [..., M, K]; got ", x_any.sizes());
  TORCH_CHECK(weight.dim() == 2, "small_m_linear: weight must be [N, K]; got ", weight.sizes());
  const int64_t K = x_any.size(-1), N = weight.size(0);
  // Leading dims flattened here rather than in Python: a view for the usual [B, S, K] (host time per call).
  at::Tensor x_in = x_any.dim() == 2 ? x_any : x_any.reshape({-1, K});
  if (x_in.stride(1) != 1) x_in = x_in.contiguous();  // the kernel reads rows with unit element stride
  const int64_t M = x_in.size(0);
  std::vector<int64_t> y_shape(x_any.sizes().begin(), x_any.sizes().end());
  y_shape.back() = N;
  const at::ScalarType x_dtype = x_in.scalar_type();
  TORCH_CHECK(x_dtype == at::ScalarType::BFloat16 || x_dtype == at::ScalarType::Half || x_dtype == at::ScalarType::Float,
              "small_m_linear: x must be bfloat16, float16 or float32; got ", x_dtype);
  TORCH_CHECK(M <= kMaxM, "small_m_linear: at most ", kMaxM, " rows; got M=", M);
  TORCH_CHECK(K % kGroup == 0 && K > 0, "small_m_linear: K must be a positive multiple of 128; got ", K);
  TORCH_CHECK(weight.size(1) == K, "small_m_linear: weight must be [N, ", K, "]; got ", weight.sizes());
  const bool int8 = weight.scalar_type() == at::ScalarType::Char;
  TORCH_CHECK(int8 || weight.scalar_type() == at::ScalarType::Float8_e4m3fn,
              "small_m_linear: weight must be float8_e4m3fn or int8; got ", weight.scalar_type());
  TORCH_CHECK(weight.is_contiguous() && aligned_to(weight.data_ptr(), 16),
              "small_m_linear: weight must be contiguous and 16-byte aligned; got strides ", weight.strides(),
              " at address offset ", reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16, " mod 16");
  const int64_t G = K / kGroup;
  TORCH_CHECK(weight_scale_inv.scalar_type() == at::ScalarType::Float && weight_scale_inv.is_contiguous() &&
                  weight_scale_inv.dim() == 2 && weight_scale_inv.size(0) == (N + kGroup - 1) / kGroup &&
                  weight_scale_inv.size(1) == G,
              "small_m_linear: weight_scale_inv must be contiguous fp32 [", (N + kGroup - 1) / kGroup, ", ", G,
              "]; got ", weight_scale_inv.scalar_type(), " ", weight_scale_inv.sizes());
  TORCH_CHECK(x_in.device() == weight.device() && weight_scale_inv.device() == weight.device() && x_in.is_cuda(),
              "small_m_linear: x, weight and weight_scale_inv must be on one CUDA device; got ", x_in.device(), ", ",
              weight.device(), ", ", weight_scale_inv.device());
  TORCH_CHECK(N < (int64_t{1} << 31) / 64 && M * N < (int64_t{1} << 31), "small_m_linear: N=", N, " too large");
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == N && b.is_contiguous() && b.device() == weight.device(),
                "small_m_linear: bias must be a contiguous [", N, "] tensor on the weight's device; got ", b.sizes(),
                " with strides ", b.strides(), " on ", b.device());
    const at::ScalarType t = b.scalar_type();
    TORCH_CHECK(t == at::ScalarType::BFloat16 || t == at::ScalarType::Half || t == at::ScalarType::Float,
                "small_m_linear: bias must be bfloat16, float16 or float32; got ", t);
  }

  const c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor y = at::empty(y_shape, x_in.options());
  if (M == 0 || N == 0) return y;
  // 16-byte loads need aligned rows; a slice at an odd offset is copied (it is M <= 16 rows).
  at::Tensor x = x_in;
  const int64_t row_bytes = (M > 1 ? x_in.stride(0) : K) * x_in.element_size();
  if (!aligned_to(x_in.data_ptr(), 16) || row_bytes % 16 != 0) {
    x = at::empty({M, K}, x_in.options());
    x.copy_(x_in);
  }
  SmallMLinearArgs a;
  a.x = x.data_ptr();
  a.x_stride_row = M > 1 ? x.stride(0) : K;
  a.weight = weight.data_ptr();
  a.weight_scale_inv = weight_scale_inv.data_ptr<float>();
  a.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.q = nullptr;
  a.qs = nullptr;
  a.x_dtype = dtype_of(x_dtype);
  a.weight_dtype = dtype_of(weight.scalar_type());
  a.bias_dtype = bias.has_value() ? dtype_of(bias->scalar_type()) : DType::kFloat32;
  a.M = M;
  a.N = N;
  a.K = K;
  a.eps = static_cast<float>(eps);
  a.scale_ue8m0 = scale_ue8m0;
  // Quantize x once with the quant kernel (the same bits) instead of in every block, where that costs less
  // than the second launch (small_m_linear.cu's head). q and s stay alive until the launch below is queued.
  at::Tensor q_pre, s_pre;
  if (small_m_quantizes_ahead(M, N, K)) {
    std::tie(q_pre, s_pre) = quant_for_gemm_cuda(x, kGroup, weight.scalar_type(), scale_ue8m0, eps, "row", 1);
    a.q = q_pre.data_ptr();
    a.qs = s_pre.data_ptr<float>();
  }
  const int device = x.get_device();
  const cudaStream_t stream = current_stream(device);
  TorchWorkspace workspace(y, stream);
  launch_small_m_linear(a, device, stream, workspace);
  return y;
}

// ---- cublaslt_gemm, cublaslt_linear (fp8linear/backends/cublaslt.py; kernels/cublaslt_gemm.cu) -------------

// "" when fp8linear can call cuBLASLt itself; else why not (fp8linear/backends/cublaslt.py then keeps torch's
// call and logs the reason once). `like` only routes the op to this CUDA implementation.
std::string cublaslt_unavailable_reason_cuda(const at::Tensor& like) {
  (void)like;
  return cublaslt_unavailable_reason();
}

//   cublaslt_gemm(Tensor q, Tensor s, Tensor b, Tensor sb) -> Tensor
// q fp8 e4m3 [M, K] contiguous, M % 4 == 0; s fp32 [M, K/128] with strides (1, M) (the `col` layout);
// b fp8 e4m3 [K, N] with strides (1, K) (the weight [N, K] row-major, transposed); sb fp32 [L4, ceil(N/128)] with
// strides (1, L4) (weight_scale_inv zero-padded to L4 columns, transposed) -> y bf16 [M, N].
at::Tensor cublaslt_gemm_cuda(const at::Tensor& q, const at::Tensor& s, const at::Tensor& b, const at::Tensor& sb) {
  TORCH_CHECK(q.dim() == 2 && b.dim() == 2 && s.dim() == 2 && sb.dim() == 2,
              "cublaslt_gemm: q, s, b and sb must be 2-D; got ", q.sizes(), ", ", s.sizes(), ", ", b.sizes(), " and ",
              sb.sizes());
  TORCH_CHECK(q.scalar_type() == at::ScalarType::Float8_e4m3fn && b.scalar_type() == at::ScalarType::Float8_e4m3fn,
              "cublaslt_gemm: q and b must be float8_e4m3fn; got ", q.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(s.scalar_type() == at::kFloat && sb.scalar_type() == at::kFloat,
              "cublaslt_gemm: s and sb must be float32; got ", s.scalar_type(), " and ", sb.scalar_type());
  TORCH_CHECK(q.is_cuda() && s.device() == q.device() && b.device() == q.device() && sb.device() == q.device(),
              "cublaslt_gemm: every tensor must be on the same CUDA device; got q on ", q.device(), ", s on ",
              s.device(), ", b on ", b.device(), ", sb on ", sb.device());
  const int64_t M = q.size(0), K = q.size(1), N = b.size(1);
  TORCH_CHECK(M > 0 && M % 4 == 0 && M < (int64_t{1} << 31),
              "cublaslt_gemm: q must have a positive multiple of 4 rows (the scales' 16-byte columns); got M=", M);
  TORCH_CHECK(K > 0 && K % kGroup == 0 && N > 0 && N % 16 == 0,
              "cublaslt_gemm: needs K % 128 == 0 and N % 16 == 0; got N=", N, ", K=", K);
  TORCH_CHECK(q.is_contiguous(), "cublaslt_gemm: q must be contiguous; got strides ", q.strides());
  TORCH_CHECK(b.size(0) == K && b.stride(0) == 1 && (N == 1 || b.stride(1) == K),
              "cublaslt_gemm: b must be [K, N] = [", K, ", ", N,
              "] with strides (1, K) (the [N, K] weight transposed); got ", b.sizes(), " with strides ", b.strides());
  const int64_t G = K / kGroup, NB = (N + kGroup - 1) / kGroup, L4 = (G + 3) / 4 * 4;
  TORCH_CHECK(s.size(0) == M && s.size(1) == G && s.stride(0) == 1 && (G == 1 || s.stride(1) == M),
              "cublaslt_gemm: s must be [M, K/128] = [", M, ", ", G, "] with strides (1, ", M,
              ") (the 'col' layout); got ", s.sizes(), " with strides ", s.strides());
  TORCH_CHECK(sb.size(0) == L4 && sb.size(1) == NB && sb.stride(0) == 1 && (NB == 1 || sb.stride(1) == L4),
              "cublaslt_gemm: sb must be [L4, ceil(N/128)] = [", L4, ", ", NB, "] with strides (1, ", L4,
              ") (weight_scale_inv padded to a multiple of 4 K blocks, transposed); got ", sb.sizes(),
              " with strides ", sb.strides());
  TORCH_CHECK(aligned_to(q.data_ptr(), 16) && aligned_to(b.data_ptr(), 16) && aligned_to(s.data_ptr(), 16) &&
                  aligned_to(sb.data_ptr(), 16),
              "cublaslt_gemm: q, s, b and sb must start on 16-byte boundaries");

  const c10::cuda::CUDAGuard guard(q.device());
  const int device = q.get_device();
  at::Tensor y = at::empty({M, N}, q.options().dtype(at::kBFloat16));
  CublasLtGemmArgs a;
  a.q = q.data_ptr();
  a.s = s.data_ptr<float>();
  a.b = b.data_ptr();
  a.sb = sb.data_ptr<float>();
  a.y = y.data_ptr();
  a.M = M;
  a.N = N;
  a.K = K;
  const cudaStream_t stream = current_stream(device);
  TorchWorkspace workspace(q, stream);
  launch_cublaslt_gemm(a, device, stream, workspace);
  return y;
}

// The whole forward of an FP8Linear served by cuBLASLt in one op call (fp8linear/backends/cublaslt.py):
//   cublaslt_linear(Tensor x, Tensor b, Tensor sb, bool scale_ue8m0, float eps) -> Tensor
// x [M, K] (bf16, fp16 or fp32, unit stride along K) is quantized per 1x128 group into the `col` layout over
// ceil(M / 4) * 4 rows, exactly as fp8linear::quant_for_gemm does, then multiplied as cublaslt_gemm does ->
// y bf16 [M, N] (the padding rows' outputs dropped).
at::Tensor cublaslt_linear_cuda(const at::Tensor& x, const at::Tensor& b, const at::Tensor& sb, bool scale_ue8m0,
                                double eps) {
  const auto [q, s] = quant_for_gemm_cuda(x, kGroup, at::ScalarType::Float8_e4m3fn, scale_ue8m0, eps, "col", 4);
  at::Tensor y = cublaslt_gemm_cuda(q, s, b, sb);
  const int64_t M = x.size(0);
  return y.size(0) == M ? y : y.narrow(0, 0, M);
}

// ---- deepgemm_gemm, deepgemm_linear (fp8linear/backends/deepgemm.py; kernels/deepgemm_launch.cu) ------------

//   deepgemm_gemm(Tensor q, Tensor s, Tensor weight, Tensor weight_scale_inv, int kernel, int num_sms,
//                 int block_m, int block_n, int smem_size, int swizzle_d, int multicast) -> Tensor
// q fp8 [M, K] contiguous; s fp32 [M, K/128] with strides (1, ceil(M/4)*4) (the `col` layout); weight fp8
// [N, K] contiguous; weight_scale_inv fp32 [ceil(N/128), K/128] contiguous -> y bf16 [M, N]. The kernel handle
// and tile configuration are checked by the launcher.
at::Tensor deepgemm_gemm_cuda(const at::Tensor& q, const at::Tensor& s, const at::Tensor& weight,
                              const at::Tensor& weight_scale_inv, int64_t kernel, int64_t num_sms, int64_t block_m,
                              int64_t block_n, int64_t smem_size, int64_t swizzle_d, int64_t multicast) {
  TORCH_CHECK(q.dim() == 2 && weight.dim() == 2, "deepgemm_gemm: q and weight must be 2-D; got ", q.sizes(), " and ",
              weight.sizes());
  const int64_t M = q.size(0), K = q.size(1), N = weight.size(0);
  const int64_t G = K / kGroup;
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
  TORCH_CHECK(K > 0 && K % kGroup == 0 && N > 0 && N % 64 == 0,
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

  const c10::cuda::CUDAGuard guard(q.device());
  const int device = q.get_device();
  at::Tensor y = at::empty({M, N}, q.options().dtype(at::kBFloat16));
  DeepGemmArgs a;
  a.q = q.data_ptr();
  a.s = s.data_ptr<float>();
  a.weight = weight.data_ptr();
  a.weight_scale_inv = weight_scale_inv.data_ptr<float>();
  a.y = y.data_ptr();
  a.M = M;
  a.N = N;
  a.K = K;
  a.kernel = kernel;
  a.num_sms = num_sms;
  a.block_m = block_m;
  a.block_n = block_n;
  a.smem_size = smem_size;
  a.swizzle_d = swizzle_d;
  a.multicast = multicast;
  launch_deepgemm_gemm(a, device, current_stream(device));
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
  const auto [q, s] = quant_for_gemm_cuda(x, kGroup, at::ScalarType::Float8_e4m3fn, scale_ue8m0, eps, "col", 1);
  return deepgemm_gemm_cuda(q, s, weight, weight_scale_inv, kernel, num_sms, block_m, block_n, smem_size, swizzle_d,
                            multicast);
}

}  // namespace
}  // namespace fp8linear

TORCH_LIBRARY_IMPL(fp8linear, CUDA, m) {
  m.impl("per_token_group_quant_", &fp8linear::per_token_group_quant_cuda);
  m.impl("quant_for_gemm", &fp8linear::quant_for_gemm_cuda);
  m.impl("silu_and_mul_quant_", &fp8linear::silu_and_mul_quant_cuda);
  m.impl("rmsnorm_quant_", &fp8linear::rmsnorm_quant_cuda);
  m.impl("small_m_linear", &fp8linear::small_m_linear_cuda);
  m.impl("cublaslt_gemm", &fp8linear::cublaslt_gemm_cuda);
  m.impl("cublaslt_linear", &fp8linear::cublaslt_linear_cuda);
  m.impl("cublaslt_unavailable_reason", &fp8linear::cublaslt_unavailable_reason_cuda);
  m.impl("deepgemm_gemm", &fp8linear::deepgemm_gemm_cuda);
  m.impl("deepgemm_linear", &fp8linear::deepgemm_linear_cuda);
}
