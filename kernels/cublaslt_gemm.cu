// fp8linear's own call of cuBLASLt's blockwise FP8 GEMM (fp8linear/backends/cublaslt.py):
// `fp8linear::cublaslt_gemm` on quantized operands, and `fp8linear::cublaslt_linear`, which quantizes x first in
// the same op call.
//
// Why: the cublas backend reached cuBLASLt through torch._scaled_mm_v2, whose every call builds the matmul and
// layout descriptors anew and asks cuBLASLt's heuristic for a kernel: 28-57 us of host time per call on the
// lent H100's host, 60-125 us for a whole eager FP8Linear forward against 20-28 us for a bf16 F.linear
// (docs/benchmarks.md). Here the descriptors and the heuristic's answer are kept per shape, so a call sets two
// scale pointers and launches. DeepGEMM is not on PyPI: most users run this backend.
//
// The GEMM is the one torch asks for (aten/src/ATen/cuda/CUDABlas.cpp, scaled_gemm, as torch's scaled-mm op
// calls it for BlockWise1x128 x BlockWise128x128): in cuBLASLt's column-major terms
//   D [N, M] = A^T [N, K] . B [K, M]     A = the weight [N, K] row-major (K x N column-major, TRANSA = T)
//                                        B = q [M, K] row-major (K x M column-major, TRANSB = N)
//                                        D = y [M, N] row-major (N x M column-major), bf16
// with A's scales per 128x128 block (BLK128x128_32F: weight_scale_inv padded to [ceil(N/128), L4] row-major,
// L4 = ceil(ceil(K/128) / 4) * 4) and B's per 1x128 group (VEC128_32F: s as ceil(K/128) columns of M floats, the
// `col` layout), fp32 compute, no fast accumulation, alpha 1, beta 0, and the heuristic asked under torch's
// default workspace limit (CUBLASLT_WORKSPACE_SIZE, 1024 KiB unless set), so that it names the kernel torch's
// call would run (tests/test_cublaslt_launch.py compares the two bit for bit).
//
// cuBLASLt is the copy torch loaded (dlopen with RTLD_NOLOAD first), reached through kernels/cublaslt_abi.h.

#include <dlfcn.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>

#include <cuda_runtime.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cublaslt_abi.h"
#include "launch_utils.h"
#include "quant_ops.h"

namespace fp8linear {
namespace cublaslt {

constexpr int64_t kGroup = 128;          // activation groups and weight blocks along K
constexpr size_t kMinVersion = 120900;   // cuBLASLt 12.9: blockwise FP8 scaling on SM90
constexpr size_t kMaxPlans = 1024;       // per thread; a serving loop sees one M per prompt length

// The entry points, resolved once per process; `error` says why cuBLASLt cannot be used (empty when it can).
struct Library {
  std::string error;
  CreateFn create = nullptr;
  GetVersionFn get_version = nullptr;
  GetStatusNameFn status_name = nullptr;
  MatmulDescCreateFn desc_create = nullptr;
  MatmulDescDestroyFn desc_destroy = nullptr;
  MatmulDescSetAttributeFn desc_set = nullptr;
  MatrixLayoutCreateFn layout_create = nullptr;
  MatrixLayoutDestroyFn layout_destroy = nullptr;
  PreferenceCreateFn pref_create = nullptr;
  PreferenceDestroyFn pref_destroy = nullptr;
  PreferenceSetAttributeFn pref_set = nullptr;
  AlgoGetHeuristicFn heuristic = nullptr;
  MatmulFn matmul = nullptr;
};

Library load_library() {
  Library lib;
  // The soname of the CUDA major torch was built with first: that is the copy already in the process.
  const char* names[] = {"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"};
  void* handle = nullptr;
  for (const int flags : {RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD, RTLD_NOW | RTLD_LOCAL}) {
    for (const char* name : names) {
      if ((handle = dlopen(name, flags)) != nullptr) break;
    }
    if (handle != nullptr) break;
  }
  if (handle == nullptr) {
    const char* why = dlerror();
    lib.error = std::string("cannot load cuBLASLt (libcublasLt.so.13 or .12): ") + (why ? why : "not found");
    return lib;
  }
  bool ok = true;
  auto resolve = [&](const char* symbol, auto* out) {
    void* fn = dlsym(handle, symbol);
    if (fn == nullptr && ok) {
      ok = false;
      lib.error = std::string("cuBLASLt has no ") + symbol;
    }
    *out = reinterpret_cast<std::remove_reference_t<decltype(*out)>>(fn);
  };
  resolve("cublasLtCreate", &lib.create);
  resolve("cublasLtGetVersion", &lib.get_version);
  resolve("cublasLtGetStatusName", &lib.status_name);
  resolve("cublasLtMatmulDescCreate", &lib.desc_create);
  resolve("cublasLtMatmulDescDestroy", &lib.desc_destroy);
  resolve("cublasLtMatmulDescSetAttribute", &lib.desc_set);
  resolve("cublasLtMatrixLayoutCreate", &lib.layout_create);
  resolve("cublasLtMatrixLayoutDestroy", &lib.layout_destroy);
  resolve("cublasLtMatmulPreferenceCreate", &lib.pref_create);
  resolve("cublasLtMatmulPreferenceDestroy", &lib.pref_destroy);
  resolve("cublasLtMatmulPreferenceSetAttribute", &lib.pref_set);
  resolve("cublasLtMatmulAlgoGetHeuristic", &lib.heuristic);
  resolve("cublasLtMatmul", &lib.matmul);
  if (ok && lib.get_version() < kMinVersion) {
    lib.error = "cuBLASLt " + std::to_string(lib.get_version()) + " predates blockwise FP8 scaling (needs >= " +
                std::to_string(kMinVersion) + ")";
  }
  return lib;
}

const Library& library() {
  static const Library lib = load_library();  // thread-safe static initialisation
  return lib;
}

void check(Status status, const char* what) {
  if (status == kStatusSuccess) return;
  const char* name = library().status_name ? library().status_name(status) : nullptr;
  TORCH_CHECK(false, "cublaslt_gemm: ", what, " failed: ", name ? name : "cublasStatus ", status);
}

// torch's default limit for the workspace of its cuBLASLt calls (CUBLASLT_WORKSPACE_SIZE in KiB, else 1024 KiB):
// the heuristic's choice depends on it.
size_t workspace_limit() {
  static const size_t bytes = [] {
    size_t kib = 1024;
    if (const char* v = std::getenv("CUBLASLT_WORKSPACE_SIZE")) {
      char* end = nullptr;
      const unsigned long long parsed = std::strtoull(v, &end, 10);
      if (end != v && *end == '\0') kib = static_cast<size_t>(parsed);
    }
    return kib * 1024;
  }();
  return bytes;
}

// The largest power of two up to 256 that divides the address (the heuristic's alignment preferences).
uint32_t alignment_of(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  uint32_t alignment = 256;
  while (alignment > 1 && address % alignment != 0) alignment /= 2;
  return alignment;
}

struct Key {
  int device;
  int64_t M, N, K;
  uint32_t align_q, align_w, align_y;
  bool operator==(const Key& o) const {
    return device == o.device && M == o.M && N == o.N && K == o.K && align_q == o.align_q && align_w == o.align_w &&
           align_y == o.align_y;
  }
};

struct KeyHash {
  size_t operator()(const Key& k) const {
    size_t h = std::hash<int64_t>()(k.M);
    for (const int64_t v : {int64_t{k.device}, k.N, k.K, int64_t{k.align_q}, int64_t{k.align_w}, int64_t{k.align_y}}) {
      h = h * 1000003u ^ std::hash<int64_t>()(v);
    }
    return h;
  }
};

// What a shape needs on every call: the descriptors (scale pointers set per call) and the heuristic's kernel.
struct Plan {
  MatmulDesc desc = nullptr;
  Layout a = nullptr, b = nullptr, d = nullptr;
  Algo algo{};
  size_t workspace = 0;
};

// Per thread, so that setting a cached descriptor's scale pointers never races another thread's call.
struct ThreadState {
  std::array<Handle, 64> handles{};
  std::unordered_map<Key, Plan, KeyHash> plans;
  void clear_plans() {
    const Library& lib = library();
    for (auto& [key, plan] : plans) {
      lib.desc_destroy(plan.desc);
      lib.layout_destroy(plan.a);
      lib.layout_destroy(plan.b);
      lib.layout_destroy(plan.d);
    }
    plans.clear();
  }
};

ThreadState& thread_state() {
  static thread_local ThreadState state;
  return state;
}

Handle handle_for(int device) {
  const Library& lib = library();
  TORCH_CHECK(device >= 0 && device < 64, "cublaslt_gemm: device index ", device, " is out of range");
  Handle& handle = thread_state().handles[device];
  if (handle == nullptr) check(lib.create(&handle), "cublasLtCreate");
  return handle;
}

template <typename T>
void set_desc(MatmulDesc desc, int32_t attr, const T& value, const char* what) {
  check(library().desc_set(desc, attr, &value, sizeof(value)), what);
}

const Plan& plan_for(const Key& key, Handle handle, const void* scale_w, const void* scale_q) {
  ThreadState& state = thread_state();
  const auto found = state.plans.find(key);
  if (found != state.plans.end()) return found->second;
  if (state.plans.size() >= kMaxPlans) state.clear_plans();

  const Library& lib = library();
  Plan plan;
  check(lib.desc_create(&plan.desc, kComputeF32, CUDA_R_32F), "cublasLtMatmulDescCreate");
  set_desc(plan.desc, kDescTransA, kOpT, "setting TRANSA");
  set_desc(plan.desc, kDescTransB, kOpN, "setting TRANSB");
  set_desc(plan.desc, kDescAScalePointer, scale_w, "setting A_SCALE_POINTER");
  set_desc(plan.desc, kDescBScalePointer, scale_q, "setting B_SCALE_POINTER");
  set_desc(plan.desc, kDescFastAccum, int8_t{0}, "setting FAST_ACCUM");
  set_desc(plan.desc, kDescAScaleMode, kScaleBlk128x128F32, "setting A_SCALE_MODE");
  set_desc(plan.desc, kDescBScaleMode, kScaleVec128F32, "setting B_SCALE_MODE");
  check(lib.layout_create(&plan.a, CUDA_R_8F_E4M3, key.K, key.N, key.K), "cublasLtMatrixLayoutCreate(A)");
  check(lib.layout_create(&plan.b, CUDA_R_8F_E4M3, key.K, key.M, key.K), "cublasLtMatrixLayoutCreate(B)");
  check(lib.layout_create(&plan.d, CUDA_R_16BF, key.N, key.M, key.N), "cublasLtMatrixLayoutCreate(D)");

  Preference pref = nullptr;
  check(lib.pref_create(&pref), "cublasLtMatmulPreferenceCreate");
  const uint64_t limit = workspace_limit();
  HeuristicResult result{};
  int returned = 0;
  Status status = lib.pref_set(pref, kPrefMaxWorkspaceBytes, &limit, sizeof(limit));
  for (const auto& [attr, value] : {std::pair<int32_t, uint32_t>{kPrefMinAlignmentA, key.align_w},
                                    {kPrefMinAlignmentB, key.align_q}, {kPrefMinAlignmentC, key.align_y},
                                    {kPrefMinAlignmentD, key.align_y}}) {
    if (status == kStatusSuccess) status = lib.pref_set(pref, attr, &value, sizeof(value));
  }
  if (status == kStatusSuccess) {
    status = lib.heuristic(handle, plan.desc, plan.a, plan.b, plan.d, plan.d, pref, 1, &result, &returned);
  }
  lib.pref_destroy(pref);
  check(status, "cublasLtMatmulAlgoGetHeuristic");
  TORCH_CHECK(returned > 0, "cublaslt_gemm: cuBLASLt has no blockwise FP8 kernel for M=", key.M, ", N=", key.N,
              ", K=", key.K, " on this GPU");
  plan.algo = result.algo;
  plan.workspace = result.workspace_size;
  return state.plans.emplace(key, plan).first->second;
}

// "" when fp8linear can call cuBLASLt itself; else why not (fp8linear/backends/cublaslt.py then keeps torch's
// call and logs the reason once). `like` only routes the op to this CUDA implementation.
std::string unavailable_reason(const at::Tensor& like) {
  (void)like;
  return library().error;
}

// The schema (fp8linear/backends/cublaslt.py), with the operands torch's scaled-mm op takes:
//   cublaslt_gemm(Tensor q, Tensor s, Tensor b, Tensor sb) -> Tensor
// q fp8 e4m3 [M, K] contiguous, M % 4 == 0; s fp32 [M, K/128] with strides (1, M) (the `col` layout);
// b fp8 e4m3 [K, N] with strides (1, K) (the weight [N, K] row-major, transposed); sb fp32 [L4, ceil(N/128)] with
// strides (1, L4) (weight_scale_inv zero-padded to L4 columns, transposed) -> y bf16 [M, N].
at::Tensor gemm_cuda(const at::Tensor& q, const at::Tensor& s, const at::Tensor& b, const at::Tensor& sb) {
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
  const Library& lib = library();
  TORCH_CHECK(lib.error.empty(), "cublaslt_gemm: ", lib.error, "; set FP8LINEAR_CUBLAS_LAUNCH=torch to use torch's call");

  const c10::cuda::CUDAGuard guard(q.device());
  const int device = q.get_device();
  at::Tensor y = at::empty({M, N}, q.options().dtype(at::kBFloat16));
  const Handle handle = handle_for(device);
  const Key key{device, M, N, K, alignment_of(q.data_ptr()), alignment_of(b.data_ptr()), alignment_of(y.data_ptr())};
  const Plan& plan = plan_for(key, handle, sb.data_ptr(), s.data_ptr());
  set_desc(plan.desc, kDescAScalePointer, sb.data_ptr(), "setting A_SCALE_POINTER");
  set_desc(plan.desc, kDescBScalePointer, s.data_ptr(), "setting B_SCALE_POINTER");
  at::Tensor workspace;
  if (plan.workspace > 0) {
    workspace = at::empty({static_cast<int64_t>(plan.workspace)}, q.options().dtype(at::kByte));
  }
  const float alpha = 1.0f, beta = 0.0f;
  check(lib.matmul(handle, plan.desc, &alpha, b.data_ptr(), plan.a, q.data_ptr(), plan.b, &beta, y.data_ptr(), plan.d,
                   y.data_ptr(), plan.d, &plan.algo, plan.workspace > 0 ? workspace.data_ptr() : nullptr,
                   plan.workspace, c10::cuda::getCurrentCUDAStream(device).stream()),
        "cublasLtMatmul");
  return y;
}

// The whole forward of an FP8Linear served by cuBLASLt in one op call (fp8linear/backends/cublaslt.py):
//   cublaslt_linear(Tensor x, Tensor b, Tensor sb, bool scale_ue8m0, float eps) -> Tensor
// x [M, K] (bf16, fp16 or fp32, unit stride along K) is quantized per 1x128 group into the `col` layout over
// ceil(M / 4) * 4 rows, exactly as fp8linear::quant_for_gemm does, then multiplied as cublaslt_gemm does ->
// y bf16 [M, N] (the padding rows' outputs dropped).
at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& b, const at::Tensor& sb, bool scale_ue8m0, double eps) {
  const auto [q, s] = quant_for_gemm_cuda(x, kGroup, at::ScalarType::Float8_e4m3fn, scale_ue8m0, eps, "col", 4);
  at::Tensor y = gemm_cuda(q, s, b, sb);
  const int64_t M = x.size(0);
  return y.size(0) == M ? y : y.narrow(0, 0, M);
}

}  // namespace cublaslt
}  // namespace fp8linear

TORCH_LIBRARY_IMPL(fp8linear, CUDA, m) {
  m.impl("cublaslt_gemm", &fp8linear::cublaslt::gemm_cuda);
  m.impl("cublaslt_linear", &fp8linear::cublaslt::linear_cuda);
  m.impl("cublaslt_unavailable_reason", &fp8linear::cublaslt::unavailable_reason);
}
