// The part of cuBLASLt's C ABI that kernels/cublaslt_gemm.cu calls, declared here rather than taken from
// <cublasLt.h>: the CUDA toolkit on CI and on some GPU hosts ships without cuBLAS headers (torch's wheels
// bring the library, not its headers), and the library itself is found at run time among the ones torch
// has loaded (dlopen), so nothing here links against it.
//
// Every value below is cuBLASLt's, unchanged from 12.9 (the first release with blockwise FP8 scaling on
// SM90) to 13.x. Where <cublasLt.h> is on the include path the static_asserts at the end check each one.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>
#include <library_types.h>  // cudaDataType_t: CUDA_R_8F_E4M3, CUDA_R_16BF, CUDA_R_32F

namespace fp8linear {
namespace cublaslt {

using Status = int;  // cublasStatus_t
constexpr Status kStatusSuccess = 0;

struct Context;  // cublasLtContext
using Handle = Context*;
using MatmulDesc = void*;  // cublasLtMatmulDesc_t
using Layout = void*;      // cublasLtMatrixLayout_t
using Preference = void*;  // cublasLtMatmulPreference_t

struct Algo {  // cublasLtMatmulAlgo_t
  uint64_t data[8];
};

struct HeuristicResult {  // cublasLtMatmulHeuristicResult_t
  Algo algo;
  size_t workspace_size;
  Status state;
  float waves_count;
  int reserved[4];
};

constexpr int32_t kComputeF32 = 68;  // cublasComputeType_t CUBLAS_COMPUTE_32F
constexpr int32_t kOpN = 0;          // cublasOperation_t
constexpr int32_t kOpT = 1;

// cublasLtMatmulDescAttributes_t
constexpr int32_t kDescTransA = 3;
constexpr int32_t kDescTransB = 4;
constexpr int32_t kDescAScalePointer = 17;
constexpr int32_t kDescBScalePointer = 18;
constexpr int32_t kDescFastAccum = 25;
constexpr int32_t kDescAScaleMode = 31;
constexpr int32_t kDescBScaleMode = 32;

// cublasLtMatmulPreferenceAttributes_t
constexpr int32_t kPrefMaxWorkspaceBytes = 1;
constexpr int32_t kPrefMinAlignmentA = 5;
constexpr int32_t kPrefMinAlignmentB = 6;
constexpr int32_t kPrefMinAlignmentC = 7;
constexpr int32_t kPrefMinAlignmentD = 8;

// cublasLtMatmulMatrixScale_t
constexpr int32_t kScaleVec128F32 = 4;     // one fp32 per 128 consecutive elements along K (1x128 groups)
constexpr int32_t kScaleBlk128x128F32 = 5;  // one fp32 per 128x128 block

// The entry points, as function pointer types (CUBLASWINAPI is empty on Linux).
using CreateFn = Status (*)(Handle*);
using GetVersionFn = size_t (*)();
using GetStatusNameFn = const char* (*)(Status);
using MatmulDescCreateFn = Status (*)(MatmulDesc*, int32_t compute_type, cudaDataType_t scale_type);
using MatmulDescDestroyFn = Status (*)(MatmulDesc);
using MatmulDescSetAttributeFn = Status (*)(MatmulDesc, int32_t attr, const void* buf, size_t size);
using MatrixLayoutCreateFn = Status (*)(Layout*, cudaDataType_t type, uint64_t rows, uint64_t cols, int64_t ld);
using MatrixLayoutDestroyFn = Status (*)(Layout);
using PreferenceCreateFn = Status (*)(Preference*);
using PreferenceDestroyFn = Status (*)(Preference);
using PreferenceSetAttributeFn = Status (*)(Preference, int32_t attr, const void* buf, size_t size);
using AlgoGetHeuristicFn = Status (*)(Handle, MatmulDesc, Layout a, Layout b, Layout c, Layout d, Preference,
                                      int requested, HeuristicResult* results, int* returned);
using MatmulFn = Status (*)(Handle, MatmulDesc, const void* alpha, const void* a, Layout a_layout, const void* b,
                            Layout b_layout, const void* beta, const void* c, Layout c_layout, void* d,
                            Layout d_layout, const Algo* algo, void* workspace, size_t workspace_size,
                            cudaStream_t stream);

}  // namespace cublaslt
}  // namespace fp8linear

#if defined(__has_include)
#if __has_include(<cublasLt.h>)
#include <cublasLt.h>
namespace fp8linear {
namespace cublaslt {
static_assert(kStatusSuccess == CUBLAS_STATUS_SUCCESS, "cuBLASLt ABI");
static_assert(kComputeF32 == CUBLAS_COMPUTE_32F && kOpN == CUBLAS_OP_N && kOpT == CUBLAS_OP_T, "cuBLASLt ABI");
static_assert(kDescTransA == CUBLASLT_MATMUL_DESC_TRANSA && kDescTransB == CUBLASLT_MATMUL_DESC_TRANSB &&
                  kDescAScalePointer == CUBLASLT_MATMUL_DESC_A_SCALE_POINTER &&
                  kDescBScalePointer == CUBLASLT_MATMUL_DESC_B_SCALE_POINTER &&
                  kDescFastAccum == CUBLASLT_MATMUL_DESC_FAST_ACCUM &&
                  kDescAScaleMode == CUBLASLT_MATMUL_DESC_A_SCALE_MODE &&
                  kDescBScaleMode == CUBLASLT_MATMUL_DESC_B_SCALE_MODE,
              "cuBLASLt ABI");
static_assert(kPrefMaxWorkspaceBytes == CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES &&
                  kPrefMinAlignmentA == CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES &&
                  kPrefMinAlignmentB == CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES &&
                  kPrefMinAlignmentC == CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES &&
                  kPrefMinAlignmentD == CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
              "cuBLASLt ABI");
static_assert(kScaleVec128F32 == CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F &&
                  kScaleBlk128x128F32 == CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F,
              "cuBLASLt ABI");
static_assert(sizeof(Algo) == sizeof(cublasLtMatmulAlgo_t), "cuBLASLt ABI");
static_assert(sizeof(HeuristicResult) == sizeof(cublasLtMatmulHeuristicResult_t) &&
                  offsetof(HeuristicResult, workspace_size) == offsetof(cublasLtMatmulHeuristicResult_t, workspaceSize) &&
                  offsetof(HeuristicResult, state) == offsetof(cublasLtMatmulHeuristicResult_t, state),
              "cuBLASLt ABI");
}  // namespace cublaslt
}  // namespace fp8linear
#endif
#endif
