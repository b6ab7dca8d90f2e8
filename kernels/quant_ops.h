// The quant op's host entry points (kernels/per_token_group_quant.cu), for the launchers in other files that
// quantize before a GEMM inside one op call (kernels/deepgemm_launch.cu).
#pragma once

#include <cstdint>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace fp8linear {

// fp8linear::quant_for_gemm: x [M, K] -> q [M_pad, K] and s over M_pad = ceil(M / row_align) * row_align rows in
// `layout` ('row', 'col' or 'ue8m0_packed'), rows M.. allocated and unwritten.
std::tuple<at::Tensor, at::Tensor> quant_for_gemm_cuda(const at::Tensor& x, int64_t group_size, at::ScalarType dtype,
                                                       bool scale_ue8m0, double eps, c10::string_view layout,
                                                       int64_t row_align);

}  // namespace fp8linear
