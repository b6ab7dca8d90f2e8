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
// Torch-free: the launcher takes pointers and sizes (launchers.h CublasLtGemmArgs); the ops' argument checks,
// allocations and the quantization of cublaslt_linear are in bindings.cpp.

#include <dlfcn.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>

#include <cuda_runtime.h>

#include "cublaslt_abi.h"
#include "launch_utils.h"
#include "launchers.h"

namespace fp8linear {
namespace cublaslt {

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
  fail("cublaslt_gemm: ", what, " failed: ", name ? name : "cublasStatus ", status);
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
  require(device >= 0 && device < 64, "cublaslt_gemm: device index ", device, " is out of range");
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
  require(returned > 0, "cublaslt_gemm: cuBLASLt has no blockwise FP8 kernel for M=", key.M, ", N=", key.N, ", K=",
          key.K, " on this GPU");
  plan.algo = result.algo;
  plan.workspace = result.workspace_size;
  return state.plans.emplace(key, plan).first->second;
}

}  // namespace cublaslt

std::string cublaslt_unavailable_reason() { return cublaslt::library().error; }

// The GEMM of the file's head on operands bindings.cpp checked (cublaslt_gemm's schema there): q [M, K] with
// M % 4 == 0, s the `col` scales (strides (1, M)), b [K, N] the weight transposed, sb the padded weight scales
// transposed, y [M, N] bf16; every pointer 16-byte aligned.
void launch_cublaslt_gemm(const CublasLtGemmArgs& a, int device, cudaStream_t stream, Workspace& workspace) {
  using namespace cublaslt;
  const Library& lib = library();
  require(lib.error.empty(), "cublaslt_gemm: ", lib.error, "; the cublaslt backend needs cuBLASLt >= 12.9 (backend='auto' picks another)");
  const Handle handle = handle_for(device);
  const Key key{device, a.M, a.N, a.K, alignment_of(a.q), alignment_of(a.b), alignment_of(a.y)};
  const Plan& plan = plan_for(key, handle, a.sb, a.s);
  set_desc(plan.desc, kDescAScalePointer, static_cast<const void*>(a.sb), "setting A_SCALE_POINTER");
  set_desc(plan.desc, kDescBScalePointer, static_cast<const void*>(a.s), "setting B_SCALE_POINTER");
  void* work = plan.workspace > 0 ? workspace.empty(plan.workspace) : nullptr;
  const float alpha = 1.0f, beta = 0.0f;
  check(lib.matmul(handle, plan.desc, &alpha, a.b, plan.a, a.q, plan.b, &beta, a.y, plan.d, a.y, plan.d, &plan.algo,
                   work, plan.workspace, stream),
        "cublasLtMatmul");
}

}  // namespace fp8linear
